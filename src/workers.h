// Promise-returning background work: every libtorch call of the addon runs here, off the JS thread.
//
// Work runs on a small pool of dedicated "torch threads" (not the libuv pool, so long model calls never
// starve fs/dns/zlib work). A module is pinned to one torch thread for its whole life: its calls are
// serialized, and its weights stay warm in that core's caches (a pool hop per call costs ~2x on small
// calls). Results come back to each JS thread (main thread or worker_threads Worker) through that env's
// channel: a queue of finished jobs plus one thread-safe function that only signals "drain".
//
// Lifecycle (see docs/INTERNALS.md, "Native threads and teardown"):
// - env teardown (a Worker terminated or exiting): the env's cleanup hook closes its channel (no torch
//   thread touches its thread-safe function afterwards), drops its queued jobs, and lets running ones
//   finish on their torch thread without delivering (their captured state is plain C++).
// - process exit (main thread 'exit' event): queued jobs are dropped, running ones get a grace period
//   (DIFFUSION_FEATURES_EXIT_GRACE_MS, default 3000) and the torch threads are joined, so no torch thread
//   runs while libtorch's static destructors do; a job still running after the grace ends the process
//   with _exit(code) (stdio flushed) instead.
#pragma once
#include <atomic>
#include <cstddef>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>

#include <napi.h>

#include "errors.h"

namespace df {

// An exception carrying a stable error code for the JS side (E_FILE_NOT_FOUND, E_INVALID_FILE, ...).
class CodedError : public std::runtime_error {
 public:
  CodedError(std::string code, const std::string& msg) : std::runtime_error(msg), code_(std::move(code)) {}
  const std::string& code() const { return code_; }

 private:
  std::string code_;
};

// Set from JS (an AbortSignal's 'abort'): a job that has not started yet is skipped and rejects with
// E_ABORTED. A job already running is not interrupted.
using CancelFlag = std::atomic<bool>;

enum class Grad { kInference, kNoGrad };

// Index of the torch thread for a new module (round robin), or for one-off tensor work.
size_t NextExecutor();

// Per env: the delivery channel, its cleanup hook, and (main thread only) the process 'exit' handler.
void InitWorkers(Napi::Env env);

class PromiseWorker {
 public:
  using Work = std::function<void()>;
  using Done = std::function<Napi::Value(Napi::Env)>;

  // Runs `work` on torch thread `executor` under c10::InferenceMode (or NoGradGuard), then `done` on the
  // JS thread to build the resolved value. Exceptions from either reject the promise with a clean JS Error
  // whose code comes from CodedError, c10::OutOfMemoryError/std::bad_alloc (E_OUT_OF_MEMORY) or E_TORCH.
  // `work` must not touch napi (it may run after its env is gone; its result is then dropped).
  // Throws a JS Error (E_LIMIT_EXCEEDED) when a torch thread cannot be started.
  static Napi::Promise Run(Napi::Env env, std::string context, Work work, Done done, Grad grad = Grad::kInference,
                           size_t executor = static_cast<size_t>(-1), std::shared_ptr<CancelFlag> cancel = nullptr);
};

// The cancel flag carried by a JS value made by createCancelToken() (null/undefined: none).
std::shared_ptr<CancelFlag> CancelFlagOf(Napi::Env env, const Napi::Value& v);
// createCancelToken() -> token; cancel(token): marks it (idempotent).
Napi::Value CreateCancelToken(const Napi::CallbackInfo& info);
Napi::Value CancelToken(const Napi::CallbackInfo& info);

// Testing/diagnostics: { executors, started, queued, running } of the torch-thread pool.
Napi::Value WorkerStats(const Napi::CallbackInfo& info);

}  // namespace df
