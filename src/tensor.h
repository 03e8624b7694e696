// The raw Tensor handle exposed to JS: owns one at::Tensor (a reference to libtorch storage).
#pragma once
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <optional>
#include <napi.h>

#include "addon_data.h"

namespace df {


// 'float32' | 'float16' | ... <-> c10::ScalarType. ParseDType throws a JS Error on unknown names.
std::string DTypeName(c10::ScalarType t);
c10::ScalarType ParseDType(Napi::Env env, const std::string& name);
// Parses 'cpu', 'cuda', 'cuda:N' (already resolved on the JS side; 'auto' is not accepted here).
c10::Device ParseDevice(Napi::Env env, const std::string& name);

class TensorWrap : public Napi::ObjectWrap<TensorWrap> {
 public:
  static Napi::Function Init(Napi::Env env);
  static Napi::Object NewInstance(Napi::Env env, at::Tensor t);
  static bool IsInstance(Napi::Env env, const Napi::Value& v);
  // The tensor held by a JS value that must be a live raw Tensor (throws a JS Error naming `what` otherwise).
  static const at::Tensor& From(Napi::Env env, const Napi::Value& v, const std::string& what);

  explicit TensorWrap(const Napi::CallbackInfo& info);
  ~TensorWrap() override;

  const at::Tensor& tensor(Napi::Env env) const;

 private:
  // static constructors
  static Napi::Value FromTypedArray(const Napi::CallbackInfo& info);  // (typedArray, shape, dtype)
  static Napi::Value Randn(const Napi::CallbackInfo& info);           // (shape, seed: bigint, device, dtype) -> Promise
  // instance
  Napi::Value Shape(const Napi::CallbackInfo& info);
  Napi::Value DType(const Napi::CallbackInfo& info);
  Napi::Value Device(const Napi::CallbackInfo& info);
  Napi::Value Disposed(const Napi::CallbackInfo& info);
  Napi::Value To(const Napi::CallbackInfo& info);  // (device, dtype|null) -> Promise<RawTensor>
  Napi::Value ToFloat32Array(const Napi::CallbackInfo& info);
  Napi::Value ToArray(const Napi::CallbackInfo& info);
  Napi::Value Dispose(const Napi::CallbackInfo& info);
  Napi::Value SameStorage(const Napi::CallbackInfo& info);

  void Release();

  at::Tensor t_;
  bool disposed_ = false;
  int64_t accounted_ = 0;  // bytes reported to V8 via AdjustExternalMemory
};

}  // namespace df
