// The raw ScriptModule handle: a TorchScript module plus the mutex that serializes calls into it.
#pragma once
#include <memory>
#include <mutex>
#include <string>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <optional>
#include <napi.h>
#include <torch/csrc/jit/api/module.h>

namespace df {

struct ModuleState {
  ModuleState(torch::jit::Module m, c10::Device d) : module(std::move(m)), device(d) {}
  torch::jit::Module module;
  c10::Device device;
  std::optional<c10::ScalarType> dtype;  // requested cast of floating parameters, if any
  std::string path;
  size_t executor = 0;  // the torch thread this module's calls run on
  std::mutex mu;  // held by every worker that runs or mutates the module
};

class ModuleWrap : public Napi::ObjectWrap<ModuleWrap> {
 public:
  static Napi::Function Init(Napi::Env env);
  // loadModule(path, device, dtype|null) -> Promise<RawModule>
  static Napi::Value Load(const Napi::CallbackInfo& info);

  explicit ModuleWrap(const Napi::CallbackInfo& info);

 private:
  std::shared_ptr<ModuleState> state(Napi::Env env) const;
  Napi::Value Call(const Napi::CallbackInfo& info);  // (method, argsArray) -> Promise<unknown>
  Napi::Value Methods(const Napi::CallbackInfo& info);
  Napi::Value Schema(const Napi::CallbackInfo& info);
  Napi::Value Parameters(const Napi::CallbackInfo& info);
  Napi::Value Buffers(const Napi::CallbackInfo& info);
  Napi::Value GetParameter(const Napi::CallbackInfo& info);
  Napi::Value SetParameter(const Napi::CallbackInfo& info);
  Napi::Value Device(const Napi::CallbackInfo& info);
  Napi::Value DType(const Napi::CallbackInfo& info);
  Napi::Value Path(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value Disposed(const Napi::CallbackInfo& info);

  std::shared_ptr<ModuleState> state_;
};

}  // namespace df
