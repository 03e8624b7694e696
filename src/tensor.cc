#include "tensor.h"

#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/InferenceMode.h>

#include "errors.h"
#include "workers.h"

namespace df {

std::string DTypeName(c10::ScalarType t) {
  switch (t) {
    case c10::kFloat: return "float32";
    case c10::kHalf: return "float16";
    case c10::kBFloat16: return "bfloat16";
    case c10::kDouble: return "float64";
    case c10::kLong: return "int64";
    case c10::kInt: return "int32";
    case c10::kShort: return "int16";
    case c10::kChar: return "int8";
    case c10::kByte: return "uint8";
    case c10::kBool: return "bool";
    default: return c10::toString(t);
  }
}

c10::ScalarType ParseDType(Napi::Env env, const std::string& n) {
  if (n == "float32") return c10::kFloat;
  if (n == "float16") return c10::kHalf;
  if (n == "bfloat16") return c10::kBFloat16;
  if (n == "float64") return c10::kDouble;
  if (n == "int64") return c10::kLong;
  if (n == "int32") return c10::kInt;
  if (n == "int16") return c10::kShort;
  if (n == "int8") return c10::kChar;
  if (n == "uint8") return c10::kByte;
  if (n == "bool") return c10::kBool;
  throw MakeError(env, "unknown dtype '" + n + "' (expected float32, float16, bfloat16, float64, int64, int32, uint8 or bool)",
                  "E_INVALID_ARGUMENT");
}

c10::Device ParseDevice(Napi::Env env, const std::string& name) {
  try {
    return c10::Device(name);
  } catch (const std::exception& e) {
    throw MakeError(env, "invalid device '" + name + "' (expected cpu, cuda or cuda:N)", "E_INVALID_ARGUMENT");
  }
}

static std::string ShapeString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

static std::vector<int64_t> ParseShape(Napi::Env env, const Napi::Value& v) {
  if (!v.IsArray()) throw MakeError(env, "shape must be an array of non-negative integers", "E_INVALID_ARGUMENT");
  Napi::Array a = v.As<Napi::Array>();
  std::vector<int64_t> shape;
  shape.reserve(a.Length());
  for (uint32_t i = 0; i < a.Length(); ++i) {
    Napi::Value e = a.Get(i);
    double d = e.IsNumber() ? e.As<Napi::Number>().DoubleValue() : -1;
    // (range first: casting a double beyond int64 to an integer is undefined behaviour)
    if (!(d >= 0 && d <= 9007199254740991.0) || std::floor(d) != d)
      throw MakeError(env, "shape must be an array of non-negative integers (bad entry at " + std::to_string(i) + ")",
                      "E_INVALID_ARGUMENT");
    shape.push_back(static_cast<int64_t>(d));
  }
  if (shape.size() > 64) throw MakeError(env, "shape has more than 64 dimensions", "E_INVALID_ARGUMENT");
  int64_t numel = 1;
  for (int64_t s : shape) {
    if (__builtin_mul_overflow(numel, s, &numel) || numel > (int64_t{1} << 56))
      throw MakeError(env, "shape " + ShapeString(shape) + " has more elements than can be allocated", "E_OUT_OF_MEMORY");
  }
  return shape;
}

// ------------------------------------------------------------------------------------------ class
Napi::Function TensorWrap::Init(Napi::Env env) {
  Napi::Function ctor = DefineClass(env, "RawTensor",
      {StaticMethod("fromTypedArray", &TensorWrap::FromTypedArray),
       StaticMethod("randn", &TensorWrap::Randn),
       InstanceMethod("shape", &TensorWrap::Shape),
       InstanceMethod("dtype", &TensorWrap::DType),
       InstanceMethod("device", &TensorWrap::Device),
       InstanceMethod("disposed", &TensorWrap::Disposed),
       InstanceMethod("to", &TensorWrap::To),
       InstanceMethod("toFloat32Array", &TensorWrap::ToFloat32Array),
       InstanceMethod("toArray", &TensorWrap::ToArray),
       InstanceMethod("sameStorage", &TensorWrap::SameStorage),
       InstanceMethod("dispose", &TensorWrap::Dispose)});
  Data(env).tensorCtor = Napi::Persistent(ctor);
  return ctor;
}

// JS-side construction is only done through NewInstance (an External carries the tensor).
TensorWrap::TensorWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<TensorWrap>(info) {
  Napi::Env env = info.Env();
  if (info.Length() != 1 || !info[0].IsExternal())
    throw MakeError(env, "RawTensor cannot be constructed directly; use the Tensor factory functions", "E_INVALID_ARGUMENT");
  t_ = *info[0].As<Napi::External<at::Tensor>>().Data();
  if (t_.defined() && t_.device().is_cpu()) {
    accounted_ = static_cast<int64_t>(t_.numel() * t_.element_size());
    if (accounted_ > 0) Napi::MemoryManagement::AdjustExternalMemory(env, accounted_);
  }
}

TensorWrap::~TensorWrap() {
  // Finalizer (GC) path: the JS object is gone; drop our reference to the storage.
  if (accounted_ > 0) {
    int64_t adjusted;
    napi_adjust_external_memory(Env(), -accounted_, &adjusted);
    accounted_ = 0;
  }
}

void TensorWrap::Release() {
  if (accounted_ > 0) Napi::MemoryManagement::AdjustExternalMemory(Env(), -accounted_);
  accounted_ = 0;
  t_ = at::Tensor();
  disposed_ = true;
}

Napi::Object TensorWrap::NewInstance(Napi::Env env, at::Tensor t) {
  at::Tensor holder = std::move(t);
  // The External only lives for the duration of the constructor call, pointing at `holder` on our stack.
  Napi::External<at::Tensor> ext = Napi::External<at::Tensor>::New(env, &holder);
  return Data(env).tensorCtor.New({ext});
}

bool TensorWrap::IsInstance(Napi::Env env, const Napi::Value& v) {
  return v.IsObject() && v.As<Napi::Object>().InstanceOf(Data(env).tensorCtor.Value());
}

const at::Tensor& TensorWrap::From(Napi::Env env, const Napi::Value& v, const std::string& what) {
  if (!IsInstance(env, v)) throw MakeError(env, what + " must be a Tensor", "E_INVALID_ARGUMENT");
  return Unwrap(v.As<Napi::Object>())->tensor(env);
}

const at::Tensor& TensorWrap::tensor(Napi::Env env) const {
  if (disposed_ || !t_.defined())
    throw MakeError(env, "Tensor has been disposed (use after dispose())", "E_DISPOSED");
  return t_;
}

// ------------------------------------------------------------------------------------------ factories
Napi::Value TensorWrap::FromTypedArray(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 3 || !info[0].IsTypedArray() || !info[2].IsString())
    throw MakeError(env, "fromTypedArray(data, shape, dtype): bad arguments", "E_INVALID_ARGUMENT");
  Napi::TypedArray ta = info[0].As<Napi::TypedArray>();
  std::vector<int64_t> shape = ParseShape(env, info[1]);
  c10::ScalarType dt = ParseDType(env, info[2].As<Napi::String>().Utf8Value());
  napi_typedarray_type want;
  switch (dt) {
    case c10::kFloat: want = napi_float32_array; break;
    case c10::kDouble: want = napi_float64_array; break;
    case c10::kLong: want = napi_bigint64_array; break;
    case c10::kInt: want = napi_int32_array; break;
    case c10::kByte: want = napi_uint8_array; break;
    case c10::kBool: want = napi_uint8_array; break;
    default: throw MakeError(env, "fromTypedArray: unsupported dtype " + DTypeName(dt), "E_INVALID_ARGUMENT");
  }
  if (ta.TypedArrayType() != want && !(want == napi_uint8_array && ta.TypedArrayType() == napi_uint8_clamped_array))
    throw MakeError(env, "fromTypedArray: typed array kind does not match dtype " + DTypeName(dt), "E_INVALID_ARGUMENT");
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;  // cannot overflow: checked by ParseShape
  if (static_cast<int64_t>(ta.ElementLength()) != numel) {
    throw MakeError(env, "data has " + std::to_string(ta.ElementLength()) + " elements but shape " + ShapeString(shape) +
                    " needs " + std::to_string(numel), "E_INVALID_ARGUMENT");
  }
  at::Tensor t = Guard(env, "Tensor.from", [&] {
    c10::InferenceMode guard;
    at::Tensor out = at::empty(shape, at::TensorOptions().dtype(dt));
    size_t bytes = ta.ByteLength();
    if (bytes) {
      const uint8_t* src = static_cast<const uint8_t*>(ta.ArrayBuffer().Data()) + ta.ByteOffset();
      std::memcpy(out.data_ptr(), src, bytes);
    }
    return out;
  });
  return NewInstance(env, std::move(t));
}

Napi::Value TensorWrap::Randn(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 4 || !info[1].IsBigInt() || !info[2].IsString())
    throw MakeError(env, "randn(shape, seed: bigint, device, dtype): bad arguments", "E_INVALID_ARGUMENT");
  std::vector<int64_t> shape = ParseShape(env, info[0]);
  bool lossless = false;
  uint64_t seed = info[1].As<Napi::BigInt>().Uint64Value(&lossless);
  if (!lossless) throw MakeError(env, "randn: seed must fit in an unsigned 64-bit integer", "E_INVALID_ARGUMENT");
  c10::Device device = ParseDevice(env, info[2].As<Napi::String>().Utf8Value());
  c10::ScalarType dt = info[3].IsString() ? ParseDType(env, info[3].As<Napi::String>().Utf8Value()) : c10::kFloat;
  auto out = std::make_shared<at::Tensor>();
  return PromiseWorker::Run(
      env, "Tensor.randn",
      [=] {
        // Always drawn on a CPU generator in float32, then moved: the same seed gives the same values everywhere.
        at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
        at::Tensor t = at::randn(shape, gen, at::TensorOptions().dtype(at::kFloat));
        *out = t.to(device, dt);
      },
      [out](Napi::Env env) -> Napi::Value { return NewInstance(env, std::move(*out)); });
}

// ------------------------------------------------------------------------------------------ instance
Napi::Value TensorWrap::Shape(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const at::Tensor& t = tensor(env);
  Napi::Array a = Napi::Array::New(env, t.dim());
  for (int64_t i = 0; i < t.dim(); ++i) a.Set(static_cast<uint32_t>(i), Napi::Number::New(env, static_cast<double>(t.size(i))));
  return a;
}

Napi::Value TensorWrap::DType(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), DTypeName(tensor(info.Env()).scalar_type()));
}

Napi::Value TensorWrap::Device(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), tensor(info.Env()).device().str());
}

Napi::Value TensorWrap::Disposed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), disposed_); }

Napi::Value TensorWrap::Dispose(const Napi::CallbackInfo& info) {
  Release();
  return info.Env().Undefined();
}

Napi::Value TensorWrap::SameStorage(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const at::Tensor& a = tensor(env);
  const at::Tensor& b = From(env, info[0], "sameStorage(other)");
  return Napi::Boolean::New(env, a.data_ptr() == b.data_ptr());
}

Napi::Value TensorWrap::To(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  at::Tensor t = tensor(env);
  if (info.Length() < 1 || !info[0].IsString()) throw MakeError(env, "to(device, dtype?): device must be a string", "E_INVALID_ARGUMENT");
  c10::Device device = ParseDevice(env, info[0].As<Napi::String>().Utf8Value());
  c10::ScalarType dt = info.Length() > 1 && info[1].IsString() ? ParseDType(env, info[1].As<Napi::String>().Utf8Value())
                                                               : t.scalar_type();
  auto out = std::make_shared<at::Tensor>();
  return PromiseWorker::Run(
      env, "Tensor.to(" + device.str() + ", " + DTypeName(dt) + ")", [=] { *out = t.to(device, dt); },
      [out](Napi::Env env) -> Napi::Value { return NewInstance(env, std::move(*out)); });
}

// The finalizer of an external ArrayBuffer: releases the heap-held at::Tensor that owns its memory.
struct HeldTensor {
  at::Tensor tensor;
  int64_t accounted;  // bytes reported to V8 for this buffer
};

static void FinalizeHeldTensor(napi_env env, void* /*data*/, void* hint) {
  std::unique_ptr<HeldTensor> held(static_cast<HeldTensor*>(hint));
  int64_t adjusted;
  if (held->accounted > 0) napi_adjust_external_memory(env, -held->accounted, &adjusted);
}

Napi::Value TensorWrap::ToFloat32Array(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const at::Tensor& t = tensor(env);
  bool zeroCopy = false;
  at::Tensor src = Guard(env, "Tensor.toFloat32Array", [&] {
    c10::InferenceMode guard;
    if (t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous()) {
      zeroCopy = true;
      return t;
    }
    if (t.is_cuda()) {
      // One copy, device -> pinned host memory (cast on the device first when needed).
      at::Tensor f = t.scalar_type() == at::kFloat ? t : t.to(at::kFloat);
      at::Tensor host = at::empty(f.sizes(), at::TensorOptions().dtype(at::kFloat).pinned_memory(true));
      host.copy_(f);
      return host;
    }
    return t.to(at::kFloat).contiguous();
  });
  size_t n = static_cast<size_t>(src.numel());
  size_t bytes = n * sizeof(float);
  if (n == 0) return Napi::Float32Array::New(env, 0);
  // Memory of a zero-copy view is already reported to V8 by this tensor's wrapper; a converted copy is new
  // memory and is reported (and un-reported by the finalizer).
  auto held = std::make_unique<HeldTensor>(HeldTensor{src, zeroCopy ? 0 : static_cast<int64_t>(bytes)});
  void* data = src.data_ptr();
  napi_value ab;
  napi_status st = napi_create_external_arraybuffer(env, data, bytes, FinalizeHeldTensor, held.get(), &ab);
  if (st == napi_ok) {
    int64_t accounted = held->accounted;
    held.release();  // now owned by the ArrayBuffer's finalizer
    int64_t adjusted;
    if (accounted > 0) napi_adjust_external_memory(env, accounted, &adjusted);
    return Napi::Float32Array::New(env, n, Napi::ArrayBuffer(env, ab), 0);
  }
  if (st != napi_no_external_buffers_allowed) NAPI_THROW(Napi::Error::New(env), Napi::Value());
  // The runtime forbids external buffers (e.g. Electron with the V8 sandbox): one copy.
  Napi::Float32Array out = Napi::Float32Array::New(env, n);
  std::memcpy(out.Data(), data, bytes);
  return out;
}

Napi::Value TensorWrap::ToArray(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const at::Tensor& t = tensor(env);
  at::Tensor c = Guard(env, "Tensor.toArray", [&] {
    c10::InferenceMode guard;
    return t.to(at::kCPU, at::kDouble).contiguous();
  });
  size_t n = static_cast<size_t>(c.numel());
  Napi::Array a = Napi::Array::New(env, n);
  const double* p = c.data_ptr<double>();
  for (size_t i = 0; i < n; ++i) a.Set(static_cast<uint32_t>(i), Napi::Number::New(env, p[i]));
  return a;
}

}  // namespace df
