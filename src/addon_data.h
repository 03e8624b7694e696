// Per-env state of the addon (napi instance data).
#pragma once
#include <napi.h>

namespace df {

struct EnvChannel;  // workers.cc

struct AddonData {
  Napi::FunctionReference tensorCtor;
  Napi::FunctionReference moduleCtor;
  EnvChannel* channel = nullptr;
};

inline AddonData& Data(Napi::Env env) { return *env.GetInstanceData<AddonData>(); }

}  // namespace df
