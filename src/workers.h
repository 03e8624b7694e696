// Promise-returning background work: every libtorch call of the addon runs here, off the JS thread.
//
// Work runs on a small pool of dedicated "torch threads" (not the libuv pool, so long model calls never
// starve fs/dns/zlib work). A module is pinned to one torch thread for its whole life: its calls are
// serialized, and its weights stay warm in that core's caches (a pool hop per call costs ~2x on small
// calls). Results come back to the JS thread through one thread-safe function per env.
#pragma once
#include <cstddef>
#include <functional>
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

// Re-applies the intra-op thread count (set by setNumThreads on the JS thread) to the calling torch
// thread when it changed since the thread last ran libtorch code.
void SyncThreadSettings();

enum class Grad { kInference, kNoGrad };

// Index of the torch thread for a new module (round robin), or for one-off tensor work.
size_t NextExecutor();

// Sets up the per-env delivery channel; called once from Init.
void InitWorkers(Napi::Env env);

class PromiseWorker {
 public:
  using Work = std::function<void()>;
  using Done = std::function<Napi::Value(Napi::Env)>;

  // Runs `work` on torch thread `executor` under c10::InferenceMode (or NoGradGuard), then `done` on the
  // JS thread to build the resolved value. Exceptions from either reject the promise with a clean JS Error.
  static Napi::Promise Run(Napi::Env env, std::string context, Work work, Done done, Grad grad = Grad::kInference,
                           size_t executor = static_cast<size_t>(-1));
};

}  // namespace df
