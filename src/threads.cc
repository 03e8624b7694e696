#include "threads.h"

#include <pthread.h>

#include <atomic>
#include <cerrno>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <ATen/Parallel.h>
#include <torch/csrc/jit/runtime/graph_executor.h>

#include "errors.h"

// OpenMP's per-thread setter, when libtorch uses OpenMP (weak: absent from builds with the native pool).
extern "C" void omp_set_num_threads(int) __attribute__((weak));

namespace df {

namespace {

std::atomic<int> g_num_threads{0};  // 0: never set (libtorch's default)
std::atomic<int> g_generation{0};
std::mutex g_set_mu;  // serializes setNumThreads (the probe and the fallback)

// TorchScript graph-executor optimisation (profiling + specialisation). Off by default: on our models
// (large convolutions and matmuls) it does not make warm calls faster, but the first two calls of every
// new input shape run up to ~2x slower while it profiles. DIFFUSION_FEATURES_JIT_OPTIMIZE=1 or
// setJitOptimize(true) turns it on. The setting is per thread in libtorch, so it is applied on every job.
std::atomic<bool> g_jit_optimize{[] {
  const char* e = std::getenv("DIFFUSION_FEATURES_JIT_OPTIMIZE");
  return e != nullptr && e[0] == '1';
}()};

// Applies `n` to the calling thread. at::get_num_threads() first runs libtorch's own once-per-thread
// initialisation (inside libtorch), so that it cannot later override the value set here.
void ApplyToThisThread(int n) {
  (void)at::get_num_threads();
  if (omp_set_num_threads != nullptr) omp_set_num_threads(n);
}

// Starts n threads with small stacks and ends them again: fails (returns the error) when the process
// cannot run that many more threads, before libgomp would find out (it ends the process when a team
// thread cannot be created).
std::string ProbeThreads(int n) {
  struct Gate {
    std::mutex mu;
    std::condition_variable cv;
    bool open = false;
  } gate;
  auto body = [](void* arg) -> void* {
    auto* g = static_cast<Gate*>(arg);
    std::unique_lock<std::mutex> lock(g->mu);
    g->cv.wait(lock, [g] { return g->open; });
    return nullptr;
  };
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 64 * 1024);
  std::vector<pthread_t> started;
  std::string error;
  for (int i = 0; i < n; ++i) {
    pthread_t t;
    int rc = pthread_create(&t, &attr, +body, &gate);
    if (rc != 0) {
      error = "only " + std::to_string(i) + " of " + std::to_string(n) + " threads could be started (" + std::strerror(rc) + ")";
      break;
    }
    started.push_back(t);
  }
  pthread_attr_destroy(&attr);
  {
    std::lock_guard<std::mutex> lock(gate.mu);
    gate.open = true;
  }
  gate.cv.notify_all();
  for (pthread_t t : started) pthread_join(t, nullptr);
  return error;
}

}  // namespace

int MaxThreads() {
  const unsigned hw = std::thread::hardware_concurrency();
  const long four = 4L * static_cast<long>(hw == 0 ? 1 : hw);
  return static_cast<int>(four > 256 ? (four > 4096 ? 4096 : four) : 256);
}

void SyncThreadSettings() {
  thread_local int seen = -1;
  const int gen = g_generation.load();
  if (seen != gen) {
    const int n = g_num_threads.load();
    if (n > 0) ApplyToThisThread(n);
    seen = gen;
  }
  const bool opt = g_jit_optimize.load();
  if (torch::jit::getGraphExecutorOptimize() != opt) torch::jit::setGraphExecutorOptimize(opt);
}

Napi::Value SetNumThreads(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int max = MaxThreads();
  const std::string range = "an integer from 1 to " + std::to_string(max);
  if (info.Length() < 1 || !info[0].IsNumber())
    throw MakeError(env, "setNumThreads(n): n must be " + range, "E_INVALID_ARGUMENT");
  const double d = info[0].As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d) || std::floor(d) != d || d < 1 || d > max) {
    throw MakeError(env, "setNumThreads(n): n must be " + range + ", got " + Napi::Number::New(env, d).ToString().Utf8Value(),
                    "E_INVALID_ARGUMENT");
  }
  const int n = static_cast<int>(d);
  std::lock_guard<std::mutex> lock(g_set_mu);
  // Each torch thread that runs parallel work leads its own team of n - 1 OpenMP threads.
  if (n > 1) {
    std::string err = ProbeThreads(n - 1);
    if (!err.empty())
      throw MakeError(env, "setNumThreads(" + std::to_string(n) + "): the process cannot start that many threads: " + err,
                      "E_LIMIT_EXCEEDED");
  }
  Guard(env, "setNumThreads", [n] {
    if (omp_set_num_threads != nullptr) ApplyToThisThread(n);
    else at::set_num_threads(n);  // no OpenMP: libtorch's own pool takes the count
    return 0;
  });
  g_num_threads = n;
  g_generation++;
  return env.Undefined();
}

Napi::Value GetNumThreads(const Napi::CallbackInfo& info) {
  const int n = g_num_threads.load();
  return Napi::Number::New(info.Env(), n > 0 ? n : at::get_num_threads());
}

Napi::Value SetJitOptimize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 1 || !info[0].IsBoolean())
    throw MakeError(env, "setJitOptimize(on): on must be a boolean", "E_INVALID_ARGUMENT");
  g_jit_optimize = info[0].As<Napi::Boolean>().Value();
  return env.Undefined();
}

Napi::Value GetJitOptimize(const Napi::CallbackInfo& info) {
  return Napi::Boolean::New(info.Env(), g_jit_optimize.load());
}

}  // namespace df
