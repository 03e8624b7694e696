#include "train.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include <unistd.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/jit/api/module.h>
#include <torch/csrc/jit/serialization/import.h>
#include <torch/optim/adam.h>
#include <torch/optim/adamw.h>

#include "convert.h"
#include "errors.h"
#include "tensor.h"
#include "workers.h"

namespace df {

namespace {

struct HeadState {
  HeadState(torch::jit::Module m, c10::Device d) : module(std::move(m)), device(d) {}
  torch::jit::Module module;
  c10::Device device;
  std::string path;
  std::string meta;     // the file's diffusion_features.json extra file (JS thread only)
  size_t executor = 0;  // the torch thread this head's work runs on
  std::mutex mu;        // held by every job that runs or changes the module
};

using HeadPtr = std::shared_ptr<HeadState>;

constexpr const char* kMetaFile = "diffusion_features.json";

std::string ShapeStr(c10::IntArrayRef s) {
  std::string r = "[";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

std::string FileName(const std::string& path) {
  size_t p = path.find_last_of("/\\");
  return p == std::string::npos ? path : path.substr(p + 1);
}

// Constructors per env (the addon's instance data belongs to addon.cc).
std::mutex g_ctor_mu;
std::unordered_map<napi_env, Napi::FunctionReference*> g_ctors;

// An uploaded number as a positive/non-negative integer, with a clear error.
int64_t IntOption(Napi::Env env, const Napi::Object& o, const char* key, int64_t dflt, int64_t min, int64_t max) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return dflt;
  if (!v.IsNumber()) throw MakeError(env, std::string("fit: option '") + key + "' must be a number", "E_INVALID_ARGUMENT");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= static_cast<double>(min)) || d > static_cast<double>(max) || std::floor(d) != d)
    throw MakeError(env, std::string("fit: option '") + key + "' must be an integer in [" + std::to_string(min) + ", " +
                    std::to_string(max) + "], got " + std::to_string(d), "E_INVALID_ARGUMENT");
  return static_cast<int64_t>(d);
}

double NumOption(Napi::Env env, const Napi::Object& o, const char* key, double dflt, double min, double max) {
  Napi::Value v = o.Get(key);
  if (v.IsUndefined() || v.IsNull()) return dflt;
  if (!v.IsNumber()) throw MakeError(env, std::string("fit: option '") + key + "' must be a number", "E_INVALID_ARGUMENT");
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= min && d <= max))
    throw MakeError(env, std::string("fit: option '") + key + "' must be in [" + std::to_string(min) + ", " + std::to_string(max) +
                    "], got " + std::to_string(d), "E_INVALID_ARGUMENT");
  return d;
}

uint64_t SeedArg(Napi::Env env, const Napi::Value& v, const char* what) {
  if (v.IsBigInt()) {
    bool lossless = true;
    uint64_t s = v.As<Napi::BigInt>().Uint64Value(&lossless);
    if (!lossless) throw MakeError(env, std::string(what) + ": seed must fit in 64 bits", "E_INVALID_ARGUMENT");
    return s;
  }
  if (v.IsNumber()) {
    double d = v.As<Napi::Number>().DoubleValue();
    if (!(d >= 0) || d > 9007199254740991.0 || std::floor(d) != d)
      throw MakeError(env, std::string(what) + ": seed must be a non-negative integer", "E_INVALID_ARGUMENT");
    return static_cast<uint64_t>(d);
  }
  if (v.IsUndefined()) return 0;
  throw MakeError(env, std::string(what) + ": seed must be a number or bigint", "E_INVALID_ARGUMENT");
}

torch::jit::Method NeedMethod(const HeadPtr& st, const std::string& name) {
  auto m = st->module.find_method(name);
  if (!m) throw CodedError("E_INVALID_FILE", FileName(st->path) + " has no method '" + name + "' (not a trainable head)");
  return *m;
}

// Replaces the parameter or buffer `name` of the module's top level with `t`.
void ReplaceTensor(torch::jit::Module& m, const std::string& name, at::Tensor t, const std::string& file) {
  auto slot = m.type()->findAttributeSlot(name);
  if (!slot) throw CodedError("E_INVALID_FILE", file + ": the head has no parameter or buffer '" + name + "'");
  if (m.type()->is_parameter(*slot)) {
    m.register_parameter(name, t.detach().requires_grad_(true), /*is_buffer=*/false);
  } else if (m.type()->is_buffer(*slot)) {
    m.register_buffer(name, t.detach());
  } else {
    throw CodedError("E_INVALID_FILE", file + ": '" + name + "' is not a parameter or buffer of the head");
  }
}

// ------------------------------------------------------------------------------ progress to JS
struct ProgressEvent {
  int64_t epoch = 0, step = 0, items = 0;
  double loss = 0, best = 0, seconds = 0;
};

// A JS progress callback reached from the torch thread. Released when the fit job is destroyed. The
// env's cleanup hook closes it first when the env goes away while the job still runs (a terminated
// Worker): afterwards the torch thread neither calls nor releases the thread-safe function.
class ProgressSink {
 public:
  ProgressSink(Napi::Env env, Napi::Function fn) : shared_(std::make_shared<Shared>()) {
    shared_->tsfn = Napi::ThreadSafeFunction::New(env, fn, "diffusion-features-train-progress", 0, 1);
    std::shared_ptr<Shared> sh = shared_;
    env.AddCleanupHook([sh] {
      std::lock_guard<std::mutex> lock(sh->mu);
      sh->closed = true;
    });
  }
  ~ProgressSink() {
    std::lock_guard<std::mutex> lock(shared_->mu);
    if (!shared_->closed) shared_->tsfn.Release();
    shared_->closed = true;
  }
  ProgressSink(const ProgressSink&) = delete;
  ProgressSink& operator=(const ProgressSink&) = delete;

  void Send(const ProgressEvent& e, std::shared_ptr<std::atomic<bool>> abort, std::shared_ptr<std::string> cbError,
            std::shared_ptr<std::mutex> cbMu) {
    std::lock_guard<std::mutex> lock(shared_->mu);
    if (shared_->closed) return;
    auto* data = new ProgressEvent(e);
    napi_status s = shared_->tsfn.NonBlockingCall(data, [abort, cbError, cbMu](Napi::Env env, Napi::Function fn, ProgressEvent* raw) {
      std::unique_ptr<ProgressEvent> ev(raw);
      if (env == nullptr || fn.IsEmpty()) return;
      try {
        Napi::Object o = Napi::Object::New(env);
        o.Set("epoch", static_cast<double>(ev->epoch));
        o.Set("step", static_cast<double>(ev->step));
        o.Set("items", static_cast<double>(ev->items));
        o.Set("loss", ev->loss);
        o.Set("bestLoss", ev->best);
        o.Set("seconds", ev->seconds);
        fn.Call({o});
      } catch (const Napi::Error& err) {
        // A throwing progress callback stops the run; the fit rejects with its message. (Reading the
        // message can itself fail while a Worker is terminated: nothing may leave this callback.)
        std::string msg;
        try {
          msg = err.Message();
        } catch (...) {
          msg = "(message unavailable)";
        }
        std::lock_guard<std::mutex> lock(*cbMu);
        if (cbError->empty()) *cbError = "onProgress threw: " + msg;
        abort->store(true);
      } catch (...) {
        abort->store(true);  // the env is stopping
      }
    });
    if (s != napi_ok) delete data;
  }

 private:
  struct Shared {
    std::mutex mu;
    bool closed = false;
    Napi::ThreadSafeFunction tsfn;
  };
  std::shared_ptr<Shared> shared_;
};

struct FitOptions {
  std::string lossMethod = "loss";
  bool adamw = false;
  double lr = 1e-3, weightDecay = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  int64_t items = 0, batchSize = 64, maxEpochs = 100, maxSteps = 0, earlyStopAfterEpoch = -1, patience = 50;
  int64_t minBatch = 1, progressEvery = 100;
  uint64_t seed = 0;
};

struct FitResult {
  int64_t steps = 0, epochs = 0;
  bool stoppedEarly = false;
  double seconds = 0;
  std::vector<float> losses;
};

// Puts the module back into eval mode and drops gradients whatever way the fit ends.
struct EvalOnExit {
  torch::jit::Module& m;
  ~EvalOnExit() {
    try {
      m.train(false);
      for (at::Tensor p : m.parameters()) p.mutable_grad() = at::Tensor();
    } catch (...) {
    }
  }
};

// A training step allocates and frees dozens of tensors of 16 KiB..1 MiB (activations, gradients, the
// sampled pixel batch). On a torch thread glibc serves them from a thread arena whose freed top is handed
// back to the system (and sizes over the dynamic mmap threshold are mmapped and unmapped), so every step
// page-faults and zero-fills them again: measured 27-34 ms/step instead of 11-14 (bench heads shapes, one
// thread). Fixed thresholds keep them: under 1 MiB from the heap (1 MiB and more go to the caching CPU
// allocator, src/cpu_cache.cc), and up to 64 MiB of free heap kept for reuse. Process-wide, set once.
void KeepSmallAllocations() {
#if defined(__GLIBC__)
  static std::once_flag once;
  std::call_once(once, [] {
    mallopt(M_MMAP_THRESHOLD, 1 << 20);
    mallopt(M_TRIM_THRESHOLD, 64 << 20);
  });
#endif
}

void RunFit(const HeadPtr& st, const FitOptions& o, std::vector<at::Tensor> data, FitResult& res,
            const std::shared_ptr<std::atomic<bool>>& abort, ProgressSink* sink, const std::shared_ptr<std::string>& cbError,
            const std::shared_ptr<std::mutex>& cbMu) {
  std::lock_guard<std::mutex> lock(st->mu);
  KeepSmallAllocations();
  c10::AutoGradMode grad(true);
  torch::jit::Module& m = st->module;
  const std::string file = FileName(st->path);
  torch::jit::Method lossFn = NeedMethod(st, o.lossMethod);
  auto noiseFn = m.find_method("noise_shape");
  auto afterFn = m.find_method("after_step");

  c10::List<at::Tensor> dataList;
  for (auto& t : data) {
    at::Tensor d = t.to(st->device);
    if (d.is_inference()) d = d.clone();  // tensors made under InferenceMode cannot take part in autograd
    dataList.push_back(d);
  }
  data.clear();

  std::vector<at::Tensor> params;
  for (at::Tensor p : m.parameters()) {
    p.requires_grad_(true);
    params.push_back(p);
  }
  if (params.empty()) throw CodedError("E_INVALID_FILE", file + ": the head has no parameters to train");

  std::unique_ptr<torch::optim::Optimizer> opt;
  if (o.adamw) {
    opt = std::make_unique<torch::optim::AdamW>(params, torch::optim::AdamWOptions(o.lr)
                                                            .betas(std::make_tuple(o.beta1, o.beta2))
                                                            .eps(o.eps)
                                                            .weight_decay(o.weightDecay));
  } else {
    opt = std::make_unique<torch::optim::Adam>(params, torch::optim::AdamOptions(o.lr)
                                                           .betas(std::make_tuple(o.beta1, o.beta2))
                                                           .eps(o.eps)
                                                           .weight_decay(o.weightDecay));
  }

  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  EvalOnExit evalOnExit{m};
  m.train(true);
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  double best = std::numeric_limits<double>::infinity();
  int64_t breakCount = 0;
  double last = 0;
  bool stop = false;
  auto report = [&](int64_t epoch) {
    if (!sink) return;
    ProgressEvent e;
    e.epoch = epoch;
    e.step = res.steps;
    e.items = o.items;
    e.loss = last;
    e.best = std::isfinite(best) ? best : last;
    e.seconds = elapsed();
    sink->Send(e, abort, cbError, cbMu);
  };
  for (int64_t epoch = 0; epoch < o.maxEpochs && !stop; ++epoch) {
    at::Tensor perm = at::randperm(o.items, gen, at::TensorOptions().dtype(at::kLong));
    for (int64_t start = 0; start < o.items; start += o.batchSize) {
      if (abort->load()) {
        std::lock_guard<std::mutex> l(*cbMu);
        throw CodedError("E_ABORTED", cbError->empty() ? "training aborted after " + std::to_string(res.steps) + " steps" : *cbError);
      }
      const int64_t n = std::min(o.batchSize, o.items - start);
      if (n < o.minBatch) continue;
      at::Tensor idx = perm.slice(0, start, start + n).to(st->device);
      at::Tensor noise;
      if (noiseFn) {
        std::vector<int64_t> shape = (*noiseFn)({c10::IValue(n)}).toIntVector();
        noise = at::rand(shape, gen, at::TensorOptions().dtype(at::kFloat)).to(st->device);
      } else {
        noise = at::empty({0}, at::TensorOptions().device(st->device));
      }
      opt->zero_grad();
      c10::IValue out = lossFn({c10::IValue(dataList), c10::IValue(idx), c10::IValue(noise)});
      if (!out.isTensor() || out.toTensor().numel() != 1)
        throw CodedError("E_INVALID_FILE", file + ": " + o.lossMethod + "() must return a scalar tensor");
      at::Tensor loss = out.toTensor();
      if (!loss.requires_grad())
        throw CodedError("E_INVALID_FILE", file + ": " + o.lossMethod + "() returned a loss that does not depend on the parameters");
      loss.backward();
      opt->step();
      ++res.steps;
      last = loss.item<double>();
      if (!std::isfinite(last))
        throw CodedError("E_TORCH", file + ": the loss became " + std::to_string(last) + " at step " + std::to_string(res.steps) +
                         " (diverged; lower the learning rate)");
      res.losses.push_back(static_cast<float>(last));
      if (afterFn) {
        at::Tensor u = at::rand({4}, gen, at::TensorOptions().dtype(at::kFloat));
        (*afterFn)({c10::IValue(res.steps), c10::IValue(last), c10::IValue(u)});
      }
      if (o.earlyStopAfterEpoch >= 0 && epoch > o.earlyStopAfterEpoch) {
        if (last < best) {
          best = last;
          breakCount = 0;
        } else if (++breakCount > o.patience) {
          stop = true;
          res.stoppedEarly = true;
        }
      }
      if (o.maxSteps > 0 && res.steps >= o.maxSteps) stop = true;
      if (o.progressEvery > 0 && res.steps % o.progressEvery == 0) report(epoch);
      if (stop) break;
    }
    res.epochs = epoch + 1;
    report(epoch);
  }
  res.seconds = elapsed();
}

class HeadWrap : public Napi::ObjectWrap<HeadWrap> {
 public:
  static Napi::Function Init(Napi::Env env) {
    Napi::Function ctor = DefineClass(env, "RawHead",
        {InstanceMethod("configure", &HeadWrap::Configure),
         InstanceMethod("fit", &HeadWrap::Fit),
         InstanceMethod("call", &HeadWrap::Call),
         InstanceMethod("attributes", &HeadWrap::Attributes),
         InstanceMethod("parameters", &HeadWrap::Parameters),
         InstanceMethod("save", &HeadWrap::Save),
         InstanceMethod("meta", &HeadWrap::Meta),
         InstanceMethod("path", &HeadWrap::Path),
         InstanceMethod("device", &HeadWrap::Device),
         InstanceMethod("disposed", &HeadWrap::Disposed),
         InstanceMethod("dispose", &HeadWrap::Dispose)});
    auto* ref = new Napi::FunctionReference(Napi::Persistent(ctor));
    {
      std::lock_guard<std::mutex> lock(g_ctor_mu);
      g_ctors[env] = ref;
    }
    napi_env raw = env;
    env.AddCleanupHook([raw] {
      std::lock_guard<std::mutex> lock(g_ctor_mu);
      auto it = g_ctors.find(raw);
      if (it != g_ctors.end()) {
        delete it->second;
        g_ctors.erase(it);
      }
    });
    return ctor;
  }

  static Napi::Value New(Napi::Env env, HeadPtr st) {
    Napi::FunctionReference* ref;
    {
      std::lock_guard<std::mutex> lock(g_ctor_mu);
      ref = g_ctors.at(env);
    }
    Napi::External<HeadPtr> ext = Napi::External<HeadPtr>::New(env, &st);
    return ref->New({ext});
  }

  explicit HeadWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<HeadWrap>(info) {
    Napi::Env env = info.Env();
    if (info.Length() != 1 || !info[0].IsExternal())
      throw MakeError(env, "RawHead cannot be constructed directly; use loadHead()", "E_INVALID_ARGUMENT");
    state_ = *info[0].As<Napi::External<HeadPtr>>().Data();
  }

  // loadHead(path, device) -> Promise<RawHead>
  static Napi::Value Load(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 2 || !info[0].IsString() || !info[1].IsString())
      throw MakeError(env, "loadHead(path, device): bad arguments", "E_INVALID_ARGUMENT");
    std::string path = info[0].As<Napi::String>().Utf8Value();
    c10::Device device = ParseDevice(env, info[1].As<Napi::String>().Utf8Value());
    auto out = std::make_shared<HeadPtr>();
    size_t executor = NextExecutor();
    return PromiseWorker::Run(
        env, "loadHead(" + path + ")",
        [=] {
          {
            std::ifstream f(path, std::ios::binary);
            if (!f.good()) throw CodedError("E_FILE_NOT_FOUND", "file not found or not readable: " + path);
          }
          torch::jit::ExtraFilesMap extra{{kMetaFile, ""}};
          torch::jit::Module m;
          try {
            m = torch::jit::load(path, device, extra);
          } catch (const std::exception& e) {
            throw CodedError("E_INVALID_FILE", "not a loadable TorchScript head: " + CleanMessage(e));
          }
          for (const char* need : {"configure", "init_rule"})
            if (!m.find_method(need)) throw CodedError("E_INVALID_FILE", FileName(path) + " is not a head template (no " + need + "())");
          for (at::Tensor p : m.parameters()) p.requires_grad_(false);
          m.train(false);
          auto st = std::make_shared<HeadState>(std::move(m), device);
          st->path = path;
          st->meta = extra[kMetaFile];
          st->executor = executor;
          *out = std::move(st);
        },
        [out](Napi::Env env) -> Napi::Value { return New(env, std::move(*out)); }, Grad::kNoGrad, executor);
  }

  // stackHeads(heads[]) -> Promise<RawHead>: an ensemble whose every tensor is the members' concatenated
  // along dim 0, with the int attribute `members` set to the total.
  static Napi::Value Stack(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    if (info.Length() < 1 || !info[0].IsArray() || info[0].As<Napi::Array>().Length() == 0)
      throw MakeError(env, "stackHeads(heads): heads must be a non-empty array of RawHead", "E_INVALID_ARGUMENT");
    Napi::Array a = info[0].As<Napi::Array>();
    std::vector<HeadPtr> heads;
    for (uint32_t i = 0; i < a.Length(); ++i) {
      Napi::Value v = a.Get(i);
      if (!v.IsObject()) throw MakeError(env, "stackHeads: element " + std::to_string(i) + " is not a RawHead", "E_INVALID_ARGUMENT");
      Napi::Object obj = v.As<Napi::Object>();
      bool isHead = false;
      {
        std::lock_guard<std::mutex> lock(g_ctor_mu);
        auto it = g_ctors.find(env);
        isHead = it != g_ctors.end() && obj.InstanceOf(it->second->Value());
      }
      if (!isHead) throw MakeError(env, "stackHeads: element " + std::to_string(i) + " is not a RawHead", "E_INVALID_ARGUMENT");
      heads.push_back(HeadWrap::Unwrap(obj)->state(env));
    }
    auto out = std::make_shared<HeadPtr>();
    size_t executor = NextExecutor();
    return PromiseWorker::Run(
        env, "stackHeads",
        [heads, out, executor] {
          std::vector<std::unique_lock<std::mutex>> locks;
          for (const auto& h : heads)
            if (locks.empty() || h.get() != heads.front().get()) locks.emplace_back(h->mu);
          torch::jit::Module m = heads.front()->module.clone();
          const std::string file = FileName(heads.front()->path);
          int64_t members = 0;
          std::vector<std::pair<std::string, bool>> names;
          for (const auto& p : m.named_parameters(false)) names.emplace_back(p.name, true);
          for (const auto& b : m.named_buffers(false)) names.emplace_back(b.name, false);
          for (const auto& nb : names) {
            std::vector<at::Tensor> parts;
            for (const auto& h : heads) {
              at::Tensor t = h->module.attr(nb.first).toTensor().detach();
              if (t.dim() == 0) throw CodedError("E_INVALID_ARGUMENT", file + ": '" + nb.first + "' has no member dimension");
              if (!parts.empty() && t.sizes().slice(1) != parts.front().sizes().slice(1))
                throw CodedError("E_INVALID_ARGUMENT", "stackHeads: '" + nb.first + "' differs in shape between members: " +
                                 ShapeStr(parts.front().sizes()) + " vs " + ShapeStr(t.sizes()));
              parts.push_back(t);
            }
            at::Tensor cat = at::cat(parts, 0);
            members = cat.size(0);
            ReplaceTensor(m, nb.first, cat, file);
          }
          if (m.type()->hasAttribute("members")) m.setattr("members", c10::IValue(members));
          for (at::Tensor p : m.parameters()) p.requires_grad_(false);
          m.train(false);
          auto st = std::make_shared<HeadState>(std::move(m), heads.front()->device);
          st->path = heads.front()->path;
          st->executor = executor;
          *out = std::move(st);
        },
        [out](Napi::Env env) -> Napi::Value { return New(env, std::move(*out)); }, Grad::kNoGrad, executor);
  }

 private:
  HeadPtr state(Napi::Env env) const {
    if (!state_) throw MakeError(env, "Head has been disposed (use after dispose())", "E_DISPOSED");
    return state_;
  }

  // configure(cfg: {name: number[]}, seed) -> Promise<void>: shapes and freshly initialises every tensor.
  Napi::Value Configure(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    HeadPtr st = state(env);
    if (info.Length() < 1 || !info[0].IsObject() || info[0].IsArray())
      throw MakeError(env, "configure(cfg, seed): cfg must be an object of integer arrays", "E_INVALID_ARGUMENT");
    auto method = st->module.find_method("configure");
    if (!method) throw MakeError(env, FileName(st->path) + " has no configure()", "E_INVALID_FILE");
    const auto& schema = method->function().getSchema();
    if (schema.arguments().size() != 2)
      throw MakeError(env, FileName(st->path) + ": configure() must take one argument", "E_INVALID_FILE");
    c10::IValue cfg = ToIValue(env, info[0], schema.arguments()[1].type(), "configure(cfg)");
    uint64_t seed = SeedArg(env, info.Length() > 1 ? info[1] : env.Undefined(), "configure");
    return PromiseWorker::Run(
        env, FileName(st->path) + ": configure()",
        [st, cfg, seed] {
          std::lock_guard<std::mutex> lock(st->mu);
          torch::jit::Module& m = st->module;
          const std::string file = FileName(st->path);
          c10::IValue shapes;
          try {
            shapes = m.get_method("configure")({cfg});
          } catch (const std::exception& e) {
            throw CodedError("E_INVALID_ARGUMENT", file + ": configure(): " + CleanMessage(e));
          }
          if (!shapes.isGenericDict()) throw CodedError("E_INVALID_FILE", file + ": configure() must return Dict[str, List[int]]");
          torch::jit::Method rule = m.get_method("init_rule");
          at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
          for (const auto& kv : shapes.toGenericDict()) {
            const std::string name = kv.key().toStringRef();
            std::vector<int64_t> shape = kv.value().toIntVector();
            for (int64_t s : shape)
              if (s < 0 || s > (int64_t(1) << 31)) throw CodedError("E_INVALID_ARGUMENT", file + ": bad size for '" + name + "'");
            auto r = rule({c10::IValue(name)}).toTuple();
            const std::string kind = r->elements()[0].toStringRef();
            const double v = r->elements()[1].toDouble();
            at::Tensor t;
            if (kind == "normal") t = at::empty(shape, at::kFloat).normal_(0.0, v, gen);
            else if (kind == "constant") t = at::full(shape, v, at::kFloat);
            else throw CodedError("E_INVALID_FILE", file + ": init_rule('" + name + "') gave unknown kind '" + kind + "'");
            ReplaceTensor(m, name, t.to(st->device), file);
          }
          for (at::Tensor p : m.parameters()) p.requires_grad_(false);
          m.train(false);
        },
        nullptr, Grad::kNoGrad, st->executor);
  }

  // fit(data: RawTensor[], opts, onProgress?) -> { promise: Promise<FitResult>, abort(): void }
  Napi::Value Fit(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    HeadPtr st = state(env);
    if (info.Length() < 2 || !info[0].IsArray() || !info[1].IsObject())
      throw MakeError(env, "fit(data, opts, onProgress?): bad arguments", "E_INVALID_ARGUMENT");
    Napi::Array arr = info[0].As<Napi::Array>();
    std::vector<at::Tensor> data;
    for (uint32_t i = 0; i < arr.Length(); ++i) data.push_back(TensorWrap::From(env, arr.Get(i), "fit: data[" + std::to_string(i) + "]"));
    Napi::Object o = info[1].As<Napi::Object>();
    FitOptions fo;
    Napi::Value lm = o.Get("lossMethod");
    if (lm.IsString()) fo.lossMethod = lm.As<Napi::String>().Utf8Value();
    else if (!lm.IsUndefined()) throw MakeError(env, "fit: option 'lossMethod' must be a string", "E_INVALID_ARGUMENT");
    if (!st->module.find_method(fo.lossMethod))
      throw MakeError(env, FileName(st->path) + " has no method '" + fo.lossMethod + "'", "E_INVALID_ARGUMENT");
    Napi::Value opt = o.Get("optimizer");
    if (opt.IsString()) {
      std::string s = opt.As<Napi::String>().Utf8Value();
      if (s == "adamw") fo.adamw = true;
      else if (s != "adam") throw MakeError(env, "fit: optimizer must be 'adam' or 'adamw', got '" + s + "'", "E_INVALID_ARGUMENT");
    } else if (!opt.IsUndefined()) {
      throw MakeError(env, "fit: option 'optimizer' must be a string", "E_INVALID_ARGUMENT");
    }
    fo.lr = NumOption(env, o, "lr", fo.lr, 0, 10);
    fo.weightDecay = NumOption(env, o, "weightDecay", fo.adamw ? 0.01 : 0.0, 0, 10);
    fo.beta1 = NumOption(env, o, "beta1", fo.beta1, 0, 1);
    fo.beta2 = NumOption(env, o, "beta2", fo.beta2, 0, 1);
    fo.eps = NumOption(env, o, "eps", fo.eps, 0, 1);
    const int64_t kMax = int64_t(1) << 40;
    fo.items = IntOption(env, o, "items", -1, 1, kMax);
    if (fo.items < 1) throw MakeError(env, "fit: option 'items' (number of training items) is required", "E_INVALID_ARGUMENT");
    fo.batchSize = IntOption(env, o, "batchSize", fo.batchSize, 1, int64_t(1) << 24);
    fo.maxEpochs = IntOption(env, o, "maxEpochs", fo.maxEpochs, 1, kMax);
    fo.maxSteps = IntOption(env, o, "maxSteps", fo.maxSteps, 0, kMax);
    fo.earlyStopAfterEpoch = IntOption(env, o, "earlyStopAfterEpoch", fo.earlyStopAfterEpoch, -1, kMax);
    fo.patience = IntOption(env, o, "patience", fo.patience, 0, kMax);
    fo.minBatch = IntOption(env, o, "minBatch", fo.minBatch, 1, int64_t(1) << 24);
    fo.progressEvery = IntOption(env, o, "progressEvery", fo.progressEvery, 0, kMax);
    fo.seed = SeedArg(env, o.Get("seed"), "fit");

    std::shared_ptr<ProgressSink> sink;
    if (info.Length() > 2 && info[2].IsFunction()) sink = std::make_shared<ProgressSink>(env, info[2].As<Napi::Function>());
    else if (info.Length() > 2 && !info[2].IsUndefined() && !info[2].IsNull())
      throw MakeError(env, "fit: onProgress must be a function", "E_INVALID_ARGUMENT");
    auto abort = std::make_shared<std::atomic<bool>>(false);
    auto cbError = std::make_shared<std::string>();
    auto cbMu = std::make_shared<std::mutex>();
    auto res = std::make_shared<FitResult>();
    Napi::Promise promise = PromiseWorker::Run(
        env, FileName(st->path) + ": fit()",
        [st, fo, data, res, abort, sink, cbError, cbMu]() mutable {
          RunFit(st, fo, std::move(data), *res, abort, sink.get(), cbError, cbMu);
        },
        [res](Napi::Env env) -> Napi::Value {
          Napi::Object r = Napi::Object::New(env);
          r.Set("steps", static_cast<double>(res->steps));
          r.Set("epochs", static_cast<double>(res->epochs));
          r.Set("stoppedEarly", res->stoppedEarly);
          r.Set("seconds", res->seconds);
          Napi::Float32Array l = Napi::Float32Array::New(env, res->losses.size());
          std::copy(res->losses.begin(), res->losses.end(), l.Data());
          r.Set("losses", l);
          return r;
        },
        Grad::kNoGrad, st->executor);
    Napi::Object handle = Napi::Object::New(env);
    handle.Set("promise", promise);
    handle.Set("abort", Napi::Function::New(env, [abort](const Napi::CallbackInfo& i) -> Napi::Value {
      abort->store(true);
      return i.Env().Undefined();
    }, "abort"));
    return handle;
  }

  // call(method, args[]) -> Promise<unknown>, in eval mode without autograd.
  Napi::Value Call(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    HeadPtr st = state(env);
    if (info.Length() < 2 || !info[0].IsString() || !info[1].IsArray())
      throw MakeError(env, "call(method, args[]): bad arguments", "E_INVALID_ARGUMENT");
    std::string name = info[0].As<Napi::String>().Utf8Value();
    auto method = st->module.find_method(name);
    const std::string file = FileName(st->path);
    if (!method) throw MakeError(env, file + " has no method '" + name + "'", "E_INVALID_ARGUMENT");
    std::shared_ptr<std::vector<c10::IValue>> stack;
    try {
      stack = std::make_shared<std::vector<c10::IValue>>(ArgsToStack(env, method->function().getSchema(), info[1].As<Napi::Array>()));
    } catch (const Napi::Error& e) {
      throw MakeError(env, file + ": " + e.Message(), "E_INVALID_ARGUMENT");
    }
    auto result = std::make_shared<c10::IValue>();
    torch::jit::Method m = *method;
    return PromiseWorker::Run(
        env, file + ": " + name + "()",
        [st, m, stack, result]() mutable {
          std::lock_guard<std::mutex> lock(st->mu);
          *result = m(std::move(*stack));
        },
        [result](Napi::Env env) -> Napi::Value {
          Napi::Value v = FromIValue(env, *result);
          *result = c10::IValue();
          return v;
        },
        Grad::kNoGrad, st->executor);
  }

  // attributes() -> Promise<object>: the head's non-tensor attributes (config, training state).
  Napi::Value Attributes(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    HeadPtr st = state(env);
    auto vals = std::make_shared<std::vector<std::pair<std::string, c10::IValue>>>();
    return PromiseWorker::Run(
        env, FileName(st->path) + ": attributes()",
        [st, vals] {
          std::lock_guard<std::mutex> lock(st->mu);
          for (const auto& a : st->module.named_attributes(false)) {
            const c10::IValue& v = a.value;
            bool plain = v.isInt() || v.isDouble() || v.isBool() || v.isString() || v.isIntList() || v.isDoubleList();
            if (!plain && v.isList()) plain = v.toList().elementType()->kind() == c10::TypeKind::StringType;
            if (plain) vals->emplace_back(a.name, v);
          }
        },
        [vals](Napi::Env env) -> Napi::Value {
          Napi::Object o = Napi::Object::New(env);
          for (const auto& kv : *vals) o.Set(kv.first, FromIValue(env, kv.second));
          return o;
        },
        Grad::kNoGrad, st->executor);
  }

  // parameters() -> Promise<{name, shape, kind}[]>
  Napi::Value Parameters(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    HeadPtr st = state(env);
    auto list = std::make_shared<std::vector<std::tuple<std::string, std::vector<int64_t>, bool>>>();
    return PromiseWorker::Run(
        env, FileName(st->path) + ": parameters()",
        [st, list] {
          std::lock_guard<std::mutex> lock(st->mu);
          for (const auto& p : st->module.named_parameters(true)) list->emplace_back(p.name, p.value.sizes().vec(), true);
          for (const auto& b : st->module.named_buffers(true)) list->emplace_back(b.name, b.value.sizes().vec(), false);
        },
        [list](Napi::Env env) -> Napi::Value {
          Napi::Array a = Napi::Array::New(env, list->size());
          for (size_t i = 0; i < list->size(); ++i) {
            Napi::Object o = Napi::Object::New(env);
            o.Set("name", std::get<0>((*list)[i]));
            const auto& s = std::get<1>((*list)[i]);
            Napi::Array sh = Napi::Array::New(env, s.size());
            for (size_t d = 0; d < s.size(); ++d) sh.Set(static_cast<uint32_t>(d), static_cast<double>(s[d]));
            o.Set("shape", sh);
            o.Set("kind", std::get<2>((*list)[i]) ? "parameter" : "buffer");
            a.Set(static_cast<uint32_t>(i), o);
          }
          return a;
        },
        Grad::kNoGrad, st->executor);
  }

  // save(path, meta: string) -> Promise<void>: written to a temporary file next to `path`, then renamed.
  Napi::Value Save(const Napi::CallbackInfo& info) {
    Napi::Env env = info.Env();
    HeadPtr st = state(env);
    if (info.Length() < 1 || !info[0].IsString()) throw MakeError(env, "save(path, meta?): path must be a string", "E_INVALID_ARGUMENT");
    std::string path = info[0].As<Napi::String>().Utf8Value();
    std::string meta = info.Length() > 1 && info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : st->meta;
    static std::atomic<uint64_t> counter{0};
    std::string tmp = path + ".tmp-" + std::to_string(getpid()) + "-" + std::to_string(counter++);
    return PromiseWorker::Run(
        env, "save(" + path + ")",
        [st, path, tmp, meta] {
          std::lock_guard<std::mutex> lock(st->mu);
          try {
            torch::jit::ExtraFilesMap extra{{kMetaFile, meta}};
            st->module.save(tmp, extra);
          } catch (const std::exception& e) {
            std::remove(tmp.c_str());
            throw CodedError("E_WRITE_FAILED", path + ": cannot write the head (" + CleanMessage(e) + ")");
          }
          if (std::rename(tmp.c_str(), path.c_str()) != 0) {
            std::remove(tmp.c_str());
            throw CodedError("E_WRITE_FAILED", path + ": cannot move the written head into place");
          }
        },
        [st, meta, path](Napi::Env env) -> Napi::Value {
          st->meta = meta;
          return env.Undefined();
        },
        Grad::kNoGrad, st->executor);
  }

  Napi::Value Meta(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), state(info.Env())->meta); }
  Napi::Value Path(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), state(info.Env())->path); }
  Napi::Value Device(const Napi::CallbackInfo& info) { return Napi::String::New(info.Env(), state(info.Env())->device.str()); }
  Napi::Value Disposed(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), !state_); }
  Napi::Value Dispose(const Napi::CallbackInfo& info) {
    state_.reset();  // running jobs hold their own reference
    return info.Env().Undefined();
  }

  HeadPtr state_;
};

}  // namespace

void InitTrain(Napi::Env env, Napi::Object exports) {
  exports.Set("RawHead", HeadWrap::Init(env));
  exports.Set("loadHead", Napi::Function::New(env, HeadWrap::Load, "loadHead"));
  exports.Set("stackHeads", Napi::Function::New(env, HeadWrap::Stack, "stackHeads"));
}

}  // namespace df
