// Promise-returning background work: every libtorch call of the addon runs here, off the JS thread.
#pragma once
#include <functional>
#include <stdexcept>
#include <string>
#include <utility>

#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
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

// Called at the start of every worker: re-applies the intra-op thread count (set by setNumThreads on
// the JS thread) to this pool thread when it changed since the thread last ran libtorch code.
void SyncThreadSettings();

enum class Grad { kInference, kNoGrad };

// Runs `work` on the libuv pool under c10::InferenceMode (or NoGradGuard), then `done` on the JS thread
// to build the resolved value. Exceptions from either reject the promise with a clean JS Error.
class PromiseWorker : public Napi::AsyncWorker {
 public:
  using Work = std::function<void()>;
  using Done = std::function<Napi::Value(Napi::Env)>;

  static Napi::Promise Run(Napi::Env env, std::string context, Work work, Done done, Grad grad = Grad::kInference) {
    // Deleted by node-addon-api after OnOK/OnError (AsyncWorker's self-destruct), the standard pattern.
    auto* w = new PromiseWorker(env, std::move(context), std::move(work), std::move(done), grad);
    Napi::Promise p = w->deferred_.Promise();
    w->Queue();
    return p;
  }

 protected:
  PromiseWorker(Napi::Env env, std::string context, Work work, Done done, Grad grad)
      : Napi::AsyncWorker(env, "diffusion-features"),
        deferred_(Napi::Promise::Deferred::New(env)),
        context_(std::move(context)),
        work_(std::move(work)),
        done_(std::move(done)),
        grad_(grad) {}

  void Execute() override {
    try {
      SyncThreadSettings();
      if (grad_ == Grad::kInference) {
        c10::InferenceMode guard;
        work_();
      } else {
        c10::NoGradGuard guard;
        work_();
      }
    } catch (const CodedError& e) {
      code_ = e.code();
      SetError(context_ + ": " + CleanMessage(e));
    } catch (const std::exception& e) {
      SetError(context_ + ": " + CleanMessage(e));
    } catch (...) {
      SetError(context_ + ": unknown native error");
    }
  }

  void OnOK() override {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    try {
      deferred_.Resolve(done_ ? done_(env) : env.Undefined());
    } catch (const Napi::Error& e) {
      deferred_.Reject(e.Value());
    } catch (const std::exception& e) {
      deferred_.Reject(MakeError(env, context_ + ": " + CleanMessage(e)).Value());
    }
    work_ = nullptr;
    done_ = nullptr;
  }

  void OnError(const Napi::Error& e) override {
    Napi::Env env = Env();
    Napi::HandleScope scope(env);
    deferred_.Reject(MakeError(env, e.Message(), code_.c_str()).Value());
    work_ = nullptr;
    done_ = nullptr;
  }

 private:
  Napi::Promise::Deferred deferred_;
  std::string context_;
  std::string code_ = "E_TORCH";
  Work work_;
  Done done_;
  Grad grad_;
};

}  // namespace df
