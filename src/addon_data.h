// Per-env state of the addon (napi instance data): one per JS thread (main thread, each Worker).
#pragma once
#include <memory>

#include <napi.h>

namespace df {

struct EnvChannel;  // workers.cc

struct AddonData {
  Napi::FunctionReference tensorCtor;
  Napi::FunctionReference moduleCtor;
  // Delivery of finished jobs to this env; shared with its jobs in flight, which may outlive the env.
  std::shared_ptr<EnvChannel> channel;
};

inline AddonData& Data(Napi::Env env) { return *env.GetInstanceData<AddonData>(); }

}  // namespace df
