#include "workers.h"

#include <cstdlib>

#include <atomic>
#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>

#include "addon_data.h"

namespace df {

// One per env (main thread, each worker_thread): delivers finished jobs back to that JS thread.
struct EnvChannel {
  Napi::ThreadSafeFunction tsfn;
  size_t pending = 0;  // touched on the JS thread only
};

namespace {

struct Job {
  std::string context;
  PromiseWorker::Work work;
  PromiseWorker::Done done;
  Grad grad;
  napi_deferred deferred;
  EnvChannel* channel;
  bool failed = false;
  std::string error;
  std::string code = "E_TORCH";
};


// A torch thread: runs jobs in order, forever (the process keeps them until exit).
class Executor {
 public:
  Executor() : thread_([this] { Loop(); }) { thread_.detach(); }
  void Push(std::unique_ptr<Job> job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(job));
    }
    cv_.notify_one();
  }

 private:
  void Loop() {
    for (;;) {
      std::unique_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return !queue_.empty(); });
        job = std::move(queue_.front());
        queue_.pop_front();
      }
      Execute(*job);
      job->work = nullptr;  // drop captured state (tensors, modules) here, after the run
      EnvChannel* ch = job->channel;
      Job* raw = job.release();
      napi_status st = ch->tsfn.NonBlockingCall(raw, Deliver);
      if (st != napi_ok) delete raw;  // the env is shutting down: nobody is waiting any more
    }
  }

  static void Execute(Job& job) {
    try {
      SyncThreadSettings();
      if (job.grad == Grad::kInference) {
        c10::InferenceMode guard;
        job.work();
      } else {
        c10::NoGradGuard guard;
        job.work();
      }
    } catch (const CodedError& e) {
      job.failed = true;
      job.code = e.code();
      job.error = job.context + ": " + CleanMessage(e);
    } catch (const std::exception& e) {
      job.failed = true;
      job.error = job.context + ": " + CleanMessage(e);
    } catch (...) {
      job.failed = true;
      job.error = job.context + ": unknown native error";
    }
  }

  // On the JS thread.
  static void Deliver(Napi::Env env, Napi::Function /*unused*/, Job* raw) {
    std::unique_ptr<Job> job(raw);
    EnvChannel* ch = job->channel;
    if (env == nullptr) return;  // env torn down
    Napi::HandleScope scope(env);
    napi_value value;
    bool ok = !job->failed;
    if (ok) {
      try {
        value = job->done ? job->done(env) : env.Undefined();
      } catch (const Napi::Error& e) {
        ok = false;
        value = e.Value();
      } catch (const std::exception& e) {
        ok = false;
        value = MakeError(env, job->context + ": " + CleanMessage(e)).Value();
      }
    } else {
      value = MakeError(env, job->error, job->code.c_str()).Value();
    }
    job->done = nullptr;
    if (ok) napi_resolve_deferred(env, job->deferred, value);
    else napi_reject_deferred(env, job->deferred, value);
    if (--ch->pending == 0) ch->tsfn.Unref(env);
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Job>> queue_;
  std::thread thread_;
};

size_t ExecutorCount() {
  static const size_t n = [] {
    const char* e = std::getenv("DIFFUSION_FEATURES_TORCH_THREADS");
    long v = e ? std::strtol(e, nullptr, 10) : 0;
    return static_cast<size_t>(v > 0 ? v : 4);
  }();
  return n;
}

Executor& GetExecutor(size_t i) {
  // Created on first use and never destroyed (threads blocked on their queue at exit are harmless).
  static std::vector<Executor*>* pool = [] {
    auto* p = new std::vector<Executor*>();
    for (size_t k = 0; k < ExecutorCount(); ++k) p->push_back(new Executor());
    return p;
  }();
  return *(*pool)[i % pool->size()];
}

std::atomic<size_t> g_next{0};

}  // namespace

size_t NextExecutor() { return g_next++ % ExecutorCount(); }

void InitWorkers(Napi::Env env) {
  // Never deleted: a torch thread may still hold a pointer to it while the env shuts down.
  auto* ch = new EnvChannel();
  ch->tsfn = Napi::ThreadSafeFunction::New(env, Napi::Function(), "diffusion-features", 0, 1);
  ch->tsfn.Unref(env);
  Data(env).channel = ch;
}

Napi::Promise PromiseWorker::Run(Napi::Env env, std::string context, Work work, Done done, Grad grad, size_t executor) {
  EnvChannel* ch = Data(env).channel;
  napi_deferred deferred;
  napi_value promise;
  NAPI_THROW_IF_FAILED(env, napi_create_promise(env, &deferred, &promise), Napi::Promise());
  auto job = std::make_unique<Job>();
  job->context = std::move(context);
  job->work = std::move(work);
  job->done = std::move(done);
  job->grad = grad;
  job->deferred = deferred;
  job->channel = ch;
  if (ch->pending++ == 0) ch->tsfn.Ref(env);
  GetExecutor(executor == static_cast<size_t>(-1) ? NextExecutor() : executor).Push(std::move(job));
  return Napi::Promise(env, promise);
}

}  // namespace df
