// Entry point of the diffusion-features addon: registers RawTensor, RawModule and the device helpers.
#include <atomic>
#include <memory>
#include <string>

#include <cstdlib>

#include <ATen/Parallel.h>
#include <torch/cuda.h>
#include <torch/version.h>
#include <napi.h>

#include "cpu_cache.h"
#include "errors.h"
#include "module.h"
#include "tensor.h"
#include "threads.h"
#include "train.h"
#include "workers.h"

// The libtorch version compiled against ("1.13.0", "2.11.0").
#ifndef TORCH_VERSION
#define DF_STR2(x) #x
#define DF_STR(x) DF_STR2(x)
#define TORCH_VERSION DF_STR(TORCH_VERSION_MAJOR) "." DF_STR(TORCH_VERSION_MINOR) "." DF_STR(TORCH_VERSION_PATCH)
#endif

namespace df {

static Napi::Value CudaAvailable(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), Guard(info.Env(), "cudaAvailable", [] { return torch::cuda::is_available(); }));
}

static Napi::Value DeviceCount(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), Guard(info.Env(), "deviceCount", [] { return double(torch::cuda::device_count()); }));
}

// The intra-op thread count as seen by a worker thread (where model calls run).
static Napi::Value WorkerNumThreads(const Napi::CallbackInfo& info) {
  auto n = std::make_shared<int>(0);
  return PromiseWorker::Run(
      info.Env(), "workerNumThreads", [n] { *n = at::get_num_threads(); },
      [n](Napi::Env env) -> Napi::Value { return Napi::Number::New(env, *n); });
}

static Napi::Value LibtorchVersion(const Napi::CallbackInfo& info) {
  return Napi::String::New(info.Env(), TORCH_VERSION);
}

static Napi::Value BuildInfo(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  o.Set("torchVersion", TORCH_VERSION);
#ifdef DF_WITH_CUDA
  o.Set("cuda", true);
#else
  o.Set("cuda", false);
#endif
  o.Set("napiVersion", NAPI_VERSION);
  o.Set("parallel", at::get_parallel_info());
  return o;
}

static Napi::Value CpuCache(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const CpuCacheStats s = CpuCacheInfo();
  Napi::Object o = Napi::Object::New(env);
  o.Set("enabled", s.enabled);
  o.Set("limitBytes", static_cast<double>(s.limit_bytes));
  o.Set("cachedBytes", static_cast<double>(s.cached_bytes));
  o.Set("inUseBytes", static_cast<double>(s.in_use_bytes));
  o.Set("hits", static_cast<double>(s.hits));
  o.Set("misses", static_cast<double>(s.misses));
  return o;
}

static Napi::Value EmptyCpuCacheJs(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), static_cast<double>(EmptyCpuCache()));
}

static Napi::Value SetCpuCacheLimitJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() != 1 || !info[0].IsNumber()) {
    throw MakeError(env, "setCpuCacheLimit(bytes): bytes must be a number", "E_INVALID_ARGUMENT");
  }
  const double b = info[0].As<Napi::Number>().DoubleValue();
  if (!(b >= 0) || b > 9.0e15) throw MakeError(env, "setCpuCacheLimit(bytes): bytes must be a non-negative integer", "E_INVALID_ARGUMENT");
  SetCpuCacheLimit(static_cast<std::size_t>(b));
  return env.Undefined();
}

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  InstallCpuCache();  // before any tensor is made through this addon
  env.SetInstanceData<AddonData>(new AddonData());  // owned and deleted by the env
  InitWorkers(env);
  exports.Set("RawTensor", TensorWrap::Init(env));
  exports.Set("RawModule", ModuleWrap::Init(env));
  exports.Set("loadModule", Napi::Function::New(env, ModuleWrap::Load, "loadModule"));
  exports.Set("cudaAvailable", Napi::Function::New(env, CudaAvailable, "cudaAvailable"));
  exports.Set("deviceCount", Napi::Function::New(env, DeviceCount, "deviceCount"));
  exports.Set("setNumThreads", Napi::Function::New(env, SetNumThreads, "setNumThreads"));
  exports.Set("getNumThreads", Napi::Function::New(env, GetNumThreads, "getNumThreads"));
  exports.Set("setJitOptimize", Napi::Function::New(env, SetJitOptimize, "setJitOptimize"));
  exports.Set("getJitOptimize", Napi::Function::New(env, GetJitOptimize, "getJitOptimize"));
  exports.Set("workerNumThreads", Napi::Function::New(env, WorkerNumThreads, "workerNumThreads"));
  exports.Set("libtorchVersion", Napi::Function::New(env, LibtorchVersion, "libtorchVersion"));
  exports.Set("buildInfo", Napi::Function::New(env, BuildInfo, "buildInfo"));
  exports.Set("cpuCache", Napi::Function::New(env, CpuCache, "cpuCache"));
  exports.Set("emptyCpuCache", Napi::Function::New(env, EmptyCpuCacheJs, "emptyCpuCache"));
  exports.Set("setCpuCacheLimit", Napi::Function::New(env, SetCpuCacheLimitJs, "setCpuCacheLimit"));
  exports.Set("maxThreads", Napi::Function::New(env, [](const Napi::CallbackInfo& i) -> Napi::Value {
    return Napi::Number::New(i.Env(), MaxThreads()); }, "maxThreads"));
  exports.Set("createCancelToken", Napi::Function::New(env, CreateCancelToken, "createCancelToken"));
  exports.Set("cancel", Napi::Function::New(env, CancelToken, "cancel"));
  exports.Set("workerStats", Napi::Function::New(env, WorkerStats, "workerStats"));
  InitTrain(env, exports);  // RawHead, loadHead, stackHeads (src/train.cc)
  return exports;
}

}  // namespace df

static Napi::Object InitAddon(Napi::Env env, Napi::Object exports) { return df::Init(env, exports); }

NODE_API_MODULE(diffusion_features, InitAddon)
