#include "module.h"

#include <fstream>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/jit/serialization/import.h>

#include "convert.h"
#include "errors.h"
#include "tensor.h"
#include "workers.h"

namespace df {

Napi::Function ModuleWrap::Init(Napi::Env env) {
  Napi::Function ctor = DefineClass(env, "RawModule",
      {InstanceMethod("call", &ModuleWrap::Call),
       InstanceMethod("methods", &ModuleWrap::Methods),
       InstanceMethod("schema", &ModuleWrap::Schema),
       InstanceMethod("parameters", &ModuleWrap::Parameters),
       InstanceMethod("buffers", &ModuleWrap::Buffers),
       InstanceMethod("getParameter", &ModuleWrap::GetParameter),
       InstanceMethod("setParameter", &ModuleWrap::SetParameter),
       InstanceMethod("device", &ModuleWrap::Device),
       InstanceMethod("dtype", &ModuleWrap::DType),
       InstanceMethod("path", &ModuleWrap::Path),
       InstanceMethod("disposed", &ModuleWrap::Disposed),
       InstanceMethod("dispose", &ModuleWrap::Dispose)});
  Data(env).moduleCtor = Napi::Persistent(ctor);
  return ctor;
}

ModuleWrap::ModuleWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<ModuleWrap>(info) {
  Napi::Env env = info.Env();
  if (info.Length() != 1 || !info[0].IsExternal())
    throw MakeError(env, "RawModule cannot be constructed directly; use loadModule()", "E_INVALID_ARGUMENT");
  state_ = *info[0].As<Napi::External<std::shared_ptr<ModuleState>>>().Data();
}

std::shared_ptr<ModuleState> ModuleWrap::state(Napi::Env env) const {
  if (!state_) throw MakeError(env, "ScriptModule has been disposed (use after dispose())", "E_DISPOSED");
  return state_;
}

// Moves every parameter and buffer to `device`; casts only floating-point ones to `dtype` (like
// nn.Module.to). set_data keeps the module's tensors the same objects, so they stay updatable.
static void MoveModule(torch::jit::Module& m, c10::Device device, std::optional<c10::ScalarType> dtype) {
  auto move = [&](at::Tensor t) {
    c10::ScalarType target = dtype && t.is_floating_point() ? *dtype : t.scalar_type();
    if (t.device() != device || t.scalar_type() != target) t.set_data(t.to(device, target));
  };
  for (const auto& p : m.named_parameters(/*recurse=*/true)) move(p.value);
  for (const auto& b : m.named_buffers(/*recurse=*/true)) move(b.value);
}

Napi::Value ModuleWrap::Load(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsString())
    throw MakeError(env, "loadModule(path, device, dtype?): bad arguments", "E_INVALID_ARGUMENT");
  std::string path = info[0].As<Napi::String>().Utf8Value();
  c10::Device device = ParseDevice(env, info[1].As<Napi::String>().Utf8Value());
  std::optional<c10::ScalarType> dtype;
  if (info.Length() > 2 && info[2].IsString()) dtype = ParseDType(env, info[2].As<Napi::String>().Utf8Value());
  std::shared_ptr<CancelFlag> cancel = info.Length() > 3 ? CancelFlagOf(env, info[3]) : nullptr;
  auto out = std::make_shared<std::shared_ptr<ModuleState>>();
  size_t executor = NextExecutor();
  return PromiseWorker::Run(
      env, "ScriptModule.load(" + path + ")",
      [=] {
        {
          std::ifstream f(path, std::ios::binary);
          if (!f.good()) throw CodedError("E_FILE_NOT_FOUND", "file not found or not readable: " + path);
        }
        torch::jit::Module m;
        try {
          m = torch::jit::load(path, device);
        } catch (const std::exception& e) {
          throw CodedError("E_INVALID_FILE", "not a loadable TorchScript file: " + CleanMessage(e));
        }
        MoveModule(m, device, dtype);
        m.eval();
        auto st = std::make_shared<ModuleState>(std::move(m), device);
        st->dtype = dtype;
        st->path = path;
        st->executor = executor;
        *out = std::move(st);
      },
      [out](Napi::Env env) -> Napi::Value {
        std::shared_ptr<ModuleState> holder = std::move(*out);
        Napi::External<std::shared_ptr<ModuleState>> ext = Napi::External<std::shared_ptr<ModuleState>>::New(env, &holder);
        return Data(env).moduleCtor.New({ext});
      },
      Grad::kNoGrad, executor, std::move(cancel));
}

Napi::Value ModuleWrap::Call(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<ModuleState> st = state(env);
  if (info.Length() < 2 || !info[0].IsString() || !info[1].IsArray())
    throw MakeError(env, "call(method, args[]): bad arguments", "E_INVALID_ARGUMENT");
  std::string name = info[0].As<Napi::String>().Utf8Value();
  auto method = st->module.find_method(name);
  if (!method) {
    std::string known;
    for (const auto& m : st->module.get_methods()) known += (known.empty() ? "" : ", ") + m.name();
    throw MakeError(env, "ScriptModule " + st->path + " has no method '" + name + "' (methods: " + known + ")",
                    "E_INVALID_ARGUMENT");
  }
  const c10::FunctionSchema& schema = method->function().getSchema();
  // Errors name the file as well as the method: "unet.pt: forward(): ...".
  std::string file = st->path.substr(st->path.find_last_of("/\\") == std::string::npos ? 0 : st->path.find_last_of("/\\") + 1);
  std::shared_ptr<std::vector<c10::IValue>> stack;
  try {
    stack = std::make_shared<std::vector<c10::IValue>>(ArgsToStack(env, schema, info[1].As<Napi::Array>()));
  } catch (const Napi::Error& e) {
    Napi::Value code = e.Value().Get("code");
    throw MakeError(env, file + ": " + e.Message(), code.IsString() ? code.As<Napi::String>().Utf8Value().c_str() : "E_INVALID_ARGUMENT");
  } catch (const std::exception& e) {
    throw MakeError(env, file + ": " + name + "(): " + CleanMessage(e), ErrorCodeOf(e));
  }
  std::shared_ptr<CancelFlag> cancel = info.Length() > 2 ? CancelFlagOf(env, info[2]) : nullptr;
  auto result = std::make_shared<c10::IValue>();
  torch::jit::Method m = *method;
  return PromiseWorker::Run(
      env, file + ": " + name + "()",
      [st, m, stack, result]() mutable {
        std::lock_guard<std::mutex> lock(st->mu);
        *result = m(std::move(*stack));
      },
      [result, st](Napi::Env env) -> Napi::Value {
        Napi::Value v = FromIValue(env, *result);
        *result = c10::IValue();
        return v;
      },
      Grad::kInference, st->executor, std::move(cancel));
}

Napi::Value ModuleWrap::Methods(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<ModuleState> st = state(env);
  std::vector<std::string> names;
  for (const auto& m : st->module.get_methods()) names.push_back(m.name());
  Napi::Array a = Napi::Array::New(env, names.size());
  for (size_t i = 0; i < names.size(); ++i) a.Set(static_cast<uint32_t>(i), Napi::String::New(env, names[i]));
  return a;
}

Napi::Value ModuleWrap::Schema(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<ModuleState> st = state(env);
  std::string name = info.Length() > 0 && info[0].IsString() ? info[0].As<Napi::String>().Utf8Value() : "forward";
  auto method = st->module.find_method(name);
  if (!method) throw MakeError(env, "no method '" + name + "'", "E_INVALID_ARGUMENT");
  return Napi::String::New(env, Signature(method->function().getSchema()));
}

template <typename List>
static Napi::Array Describe(Napi::Env env, const List& list) {
  Napi::Array a = Napi::Array::New(env);
  uint32_t i = 0;
  for (const auto& p : list) {
    Napi::Object o = Napi::Object::New(env);
    o.Set("name", p.name);
    Napi::Array shape = Napi::Array::New(env, p.value.dim());
    for (int64_t d = 0; d < p.value.dim(); ++d) shape.Set(static_cast<uint32_t>(d), Napi::Number::New(env, double(p.value.size(d))));
    o.Set("shape", shape);
    o.Set("dtype", DTypeName(p.value.scalar_type()));
    a.Set(i++, o);
  }
  return a;
}

Napi::Value ModuleWrap::Parameters(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<ModuleState> st = state(env);
  return Describe(env, st->module.named_parameters(true));
}

Napi::Value ModuleWrap::Buffers(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<ModuleState> st = state(env);
  return Describe(env, st->module.named_buffers(true));
}

// The parameter (or, failing that, buffer) called `name`; throws a JS Error naming it when unknown.
static at::Tensor FindTensor(Napi::Env env, ModuleState& st, const std::string& name, bool* isParam) {
  for (const auto& p : st.module.named_parameters(true))
    if (p.name == name) { *isParam = true; return p.value; }
  for (const auto& b : st.module.named_buffers(true))
    if (b.name == name) { *isParam = false; return b.value; }
  throw MakeError(env, "ScriptModule " + st.path + " has no parameter or buffer named '" + name + "'", "E_NOT_FOUND");
}

static std::string ShapeStr(c10::IntArrayRef s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

Napi::Value ModuleWrap::GetParameter(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<ModuleState> st = state(env);
  if (info.Length() < 1 || !info[0].IsString()) throw MakeError(env, "getParameter(name): name must be a string", "E_INVALID_ARGUMENT");
  std::string name = info[0].As<Napi::String>().Utf8Value();
  bool isParam;
  at::Tensor p = FindTensor(env, *st, name, &isParam);
  auto out = std::make_shared<at::Tensor>();
  return PromiseWorker::Run(
      env, "getParameter('" + name + "')",
      [st, p, out] {
        std::lock_guard<std::mutex> lock(st->mu);
        *out = p.detach().clone();
      },
      [out](Napi::Env env) -> Napi::Value { return TensorWrap::NewInstance(env, std::move(*out)); },
      Grad::kInference, st->executor);
}

Napi::Value ModuleWrap::SetParameter(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<ModuleState> st = state(env);
  if (info.Length() < 2 || !info[0].IsString()) throw MakeError(env, "setParameter(name, tensor): bad arguments", "E_INVALID_ARGUMENT");
  std::string name = info[0].As<Napi::String>().Utf8Value();
  bool isParam;
  at::Tensor p = FindTensor(env, *st, name, &isParam);
  at::Tensor v = TensorWrap::From(env, info[1], "setParameter('" + name + "', value): value");
  if (p.sizes() != v.sizes())
    throw MakeError(env, "setParameter('" + name + "'): shape mismatch: parameter is " + ShapeStr(p.sizes()) + ", value is " +
                    ShapeStr(v.sizes()), "E_INVALID_ARGUMENT");
  return PromiseWorker::Run(
      env, "setParameter('" + name + "')",
      [st, p, v]() mutable {
        std::lock_guard<std::mutex> lock(st->mu);
        p.copy_(v);  // converts dtype and device to the parameter's
      },
      nullptr, Grad::kNoGrad, st->executor);
}

Napi::Value ModuleWrap::Device(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), state(info.Env())->device.str());
}

Napi::Value ModuleWrap::DType(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<ModuleState> st = state(env);
  if (st->dtype) return Napi::String::New(env, DTypeName(*st->dtype));
  for (const auto& p : st->module.named_parameters(true))
    if (p.value.is_floating_point()) return Napi::String::New(env, DTypeName(p.value.scalar_type()));
  return env.Null();
}

Napi::Value ModuleWrap::Path(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), state(info.Env())->path); }

Napi::Value ModuleWrap::Disposed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), !state_); }

Napi::Value ModuleWrap::Dispose(const Napi::CallbackInfo& info) {
  // In-flight calls hold their own reference; the module is freed when the last one finishes.
  state_.reset();
  return info.Env().Undefined();
}

}  // namespace df
