#include "workers.h"

#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <system_error>
#include <thread>
#include <vector>

#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>

#include "addon_data.h"
#include "threads.h"

// libuv's default loop is the main thread's: an env whose loop is another one is a worker_threads Worker.
// (weak: a host that does not export libuv gets the handler in its first env instead)
extern "C" struct uv_loop_s* uv_default_loop(void) __attribute__((weak));

namespace df {

struct Job;

// One per env (main thread, each Worker): finished jobs wait in `done` until the JS thread drains them.
struct EnvChannel {
  std::mutex mu;
  bool open = true;                       // false once the env's cleanup hook ran
  bool signalled = false;                 // a drain call is queued on the tsfn
  std::deque<std::unique_ptr<Job>> done;  // finished, not yet delivered
  Napi::ThreadSafeFunction tsfn;          // called (under mu) only while open
  size_t pending = 0;                     // jobs started and not delivered; JS thread only
};

struct Job {
  std::string context;
  PromiseWorker::Work work;
  PromiseWorker::Done done;
  Grad grad = Grad::kInference;
  napi_deferred deferred = nullptr;
  std::shared_ptr<EnvChannel> channel;
  std::shared_ptr<CancelFlag> cancel;
  bool failed = false;
  std::string error;
  std::string code = "E_TORCH";
};

namespace {

std::atomic<bool> g_exiting{false};

void Drain(Napi::Env env, const std::shared_ptr<EnvChannel>& ch);

// How long process exit waits for running jobs (DIFFUSION_FEATURES_EXIT_GRACE_MS, default 3000).
long ExitGraceMs() {
  static const long ms = [] {
    const char* e = std::getenv("DIFFUSION_FEATURES_EXIT_GRACE_MS");
    long v = e ? std::strtol(e, nullptr, 10) : -1;
    return v >= 0 && v <= 600000 ? v : 3000L;
  }();
  return ms;
}

// Runs the job's work on the calling torch thread; records failure and its code.
void Execute(Job& job) {
  if (job.cancel && job.cancel->load()) {
    job.failed = true;
    job.code = "E_ABORTED";
    job.error = job.context + ": aborted before it started";
    return;
  }
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
    job.code = ErrorCodeOf(e);
    job.error = job.context + ": " + CleanMessage(e);
  } catch (...) {
    job.failed = true;
    job.error = job.context + ": unknown native error";
  }
}

// Hands a finished job to its env, or drops it when the env is gone (its state is plain C++).
void Finish(std::unique_ptr<Job> job) {
  std::shared_ptr<EnvChannel> ch = job->channel;
  std::lock_guard<std::mutex> lock(ch->mu);
  if (!ch->open) return;  // `job` is destroyed here, on the torch thread
  ch->done.push_back(std::move(job));
  if (ch->signalled) return;
  // The callback holds the channel itself: a drain that runs late during teardown finds it closed.
  auto drain = [ch](Napi::Env env, Napi::Function) { Drain(env, ch); };
  if (ch->tsfn.NonBlockingCall(drain) == napi_ok) ch->signalled = true;
}

// A torch thread: runs jobs in order until stopped (at process exit).
class Executor {
 public:
  // Starts the thread on first use; throws std::system_error when it cannot be created.
  void EnsureStarted() {
    std::lock_guard<std::mutex> lock(mu_);
    if (thread_.joinable() || stop_) return;
    thread_ = std::thread([this] { Loop(); });
  }

  bool Push(std::unique_ptr<Job>& job) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_) return false;
      queue_.push_back(std::move(job));
    }
    cv_.notify_one();
    return true;
  }

  // Removes the queued jobs of `ch` (its env is going away) and gives them back for destruction.
  std::vector<std::unique_ptr<Job>> TakeQueued(const EnvChannel* ch) {
    std::vector<std::unique_ptr<Job>> out;
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = queue_.begin(); it != queue_.end();) {
      if (ch == nullptr || (*it)->channel.get() == ch) {
        out.push_back(std::move(*it));
        it = queue_.erase(it);
      } else {
        ++it;
      }
    }
    return out;
  }

  // Waits until no job of `ch` (any job when null) runs here, or the deadline passes. True when idle.
  bool WaitIdle(const EnvChannel* ch, std::chrono::steady_clock::time_point deadline) {
    std::unique_lock<std::mutex> lock(mu_);
    return idle_cv_.wait_until(lock, deadline, [&] { return current_ == nullptr || (ch != nullptr && current_ != ch); });
  }

  // Stops taking jobs; the thread ends after the job it runs (if any).
  void Stop() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_all();
  }

  void Join() {
    if (thread_.joinable()) thread_.join();
  }

  void Stats(size_t* started, size_t* queued, size_t* running) {
    std::lock_guard<std::mutex> lock(mu_);
    *started += thread_.joinable() ? 1 : 0;
    *queued += queue_.size();
    *running += current_ != nullptr ? 1 : 0;
  }

 private:
  void Loop() {
    for (;;) {
      std::unique_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
        if (stop_) return;
        job = std::move(queue_.front());
        queue_.pop_front();
        current_ = job->channel.get();
      }
      Execute(*job);
      job->work = nullptr;  // drop captured state (tensors, modules) here, after the run
      Finish(std::move(job));
      {
        std::lock_guard<std::mutex> lock(mu_);
        current_ = nullptr;
      }
      idle_cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::condition_variable idle_cv_;
  std::deque<std::unique_ptr<Job>> queue_;
  const EnvChannel* current_ = nullptr;  // the env of the running job
  bool stop_ = false;
  std::thread thread_;
};

size_t ExecutorCount() {
  static const size_t n = [] {
    const char* e = std::getenv("DIFFUSION_FEATURES_TORCH_THREADS");
    long v = e ? std::strtol(e, nullptr, 10) : 0;
    if (v <= 0) v = 4;
    return static_cast<size_t>(v > 64 ? 64 : v);
  }();
  return n;
}

// Created once and never destroyed: torch threads may still reference it while the process exits.
std::vector<Executor*>& Pool() {
  static std::vector<Executor*>* pool = [] {
    auto* p = new std::vector<Executor*>();
    for (size_t k = 0; k < ExecutorCount(); ++k) p->push_back(new Executor());  // NOLINT: process lifetime
    return p;
  }();
  return *pool;
}

std::atomic<size_t> g_next{0};

// Delivers a finished job on the JS thread: resolves or rejects its promise.
void Deliver(Napi::Env env, Job& job) {
  Napi::HandleScope scope(env);
  napi_value value;
  bool ok = !job.failed;
  if (ok) {
    try {
      value = job.done ? job.done(env) : env.Undefined();
    } catch (const Napi::Error& e) {
      ok = false;
      value = e.Value();
    } catch (const std::exception& e) {
      ok = false;
      value = MakeError(env, job.context + ": " + CleanMessage(e), ErrorCodeOf(e)).Value();
    }
  } else {
    value = MakeError(env, job.error, job.code.c_str()).Value();
  }
  job.done = nullptr;
  // Fails only while the env stops (a Worker being terminated): nobody is waiting any more.
  if (ok) napi_resolve_deferred(env, job.deferred, value);
  else napi_reject_deferred(env, job.deferred, value);
}

// The tsfn callback (JS thread): delivers every finished job of this env.
void Drain(Napi::Env env, const std::shared_ptr<EnvChannel>& ch) {
  if (env == nullptr) return;  // env torn down: the cleanup hook owns the jobs
  std::deque<std::unique_ptr<Job>> batch;
  {
    std::lock_guard<std::mutex> lock(ch->mu);
    if (!ch->open) return;
    batch.swap(ch->done);
    ch->signalled = false;
  }
  for (auto& job : batch) {
    // A Worker being terminated still drains: N-API then refuses JS work (napi_pending_exception) and
    // node-addon-api throws. Nothing may leave this callback (node-addon-api would rethrow it as a JS
    // exception, which fails the same way, and std::terminate would end the process); nobody waits
    // for these promises any more, so the result is dropped.
    try {
      Deliver(env, *job);
    } catch (...) {
    }
    job.reset();
    if (--ch->pending == 0) {
      try {
        ch->tsfn.Unref(env);
      } catch (...) {
      }
    }
  }
}

// Env cleanup hook: runs before the tsfn's own (hooks run in reverse order of registration).
void CloseChannel(void* arg) {
  std::unique_ptr<std::shared_ptr<EnvChannel>> holder(static_cast<std::shared_ptr<EnvChannel>*>(arg));
  std::shared_ptr<EnvChannel> ch = *holder;
  std::deque<std::unique_ptr<Job>> undelivered;
  {
    std::lock_guard<std::mutex> lock(ch->mu);
    ch->open = false;
    undelivered.swap(ch->done);
    ch->tsfn.Release();
  }
  for (Executor* e : Pool()) e->TakeQueued(ch.get());  // dropped unrun
  if (g_exiting.load()) {
    // The process is exiting: let this env's running jobs end before libtorch's destructors run.
    auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(ExitGraceMs());
    for (Executor* e : Pool()) e->WaitIdle(ch.get(), deadline);
  }
}

// Process 'exit' (main thread): stop the pool before exit() runs static destructors.
Napi::Value OnProcessExit(const Napi::CallbackInfo& info) {
  int code = info.Length() > 0 && info[0].IsNumber() ? info[0].As<Napi::Number>().Int32Value() : 0;
  g_exiting = true;
  std::vector<Executor*>& pool = Pool();
  for (Executor* e : pool) {
    e->Stop();
    e->TakeQueued(nullptr);
  }
  auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(ExitGraceMs());
  bool idle = true;
  for (Executor* e : pool) idle = e->WaitIdle(nullptr, deadline) && idle;
  if (!idle) {
    // A libtorch call is still running: ending the process now is the only safe way out.
    std::fflush(nullptr);
    _exit(code);
  }
  for (Executor* e : pool) e->Join();
  return info.Env().Undefined();
}

void RegisterExitHandler(Napi::Env env) {
  if (uv_default_loop != nullptr) {
    uv_loop_s* loop = nullptr;
    if (napi_get_uv_event_loop(env, &loop) != napi_ok || loop != uv_default_loop()) return;  // a Worker
  } else {
    static std::atomic<bool> registered{false};
    if (registered.exchange(true)) return;
  }
  Napi::Object process = env.Global().Get("process").As<Napi::Object>();
  Napi::Function on = process.Get("on").As<Napi::Function>();
  on.Call(process, {Napi::String::New(env, "exit"), Napi::Function::New(env, OnProcessExit, "diffusionFeaturesExit")});
}

}  // namespace

size_t NextExecutor() { return g_next++ % ExecutorCount(); }

void InitWorkers(Napi::Env env) {
  auto ch = std::make_shared<EnvChannel>();
  ch->tsfn = Napi::ThreadSafeFunction::New(env, Napi::Function(), "diffusion-features", 0, 1);
  ch->tsfn.Unref(env);
  // Registered after the tsfn, so it runs before the tsfn's own teardown.
  auto* holder = new std::shared_ptr<EnvChannel>(ch);  // owned by CloseChannel
  if (napi_add_env_cleanup_hook(env, CloseChannel, holder) != napi_ok) {
    delete holder;
    throw MakeError(env, "cannot register the env cleanup hook", "E_NATIVE_LOAD");
  }
  Data(env).channel = ch;
  RegisterExitHandler(env);
}

Napi::Promise PromiseWorker::Run(Napi::Env env, std::string context, Work work, Done done, Grad grad, size_t executor,
                                 std::shared_ptr<CancelFlag> cancel) {
  std::shared_ptr<EnvChannel> ch = Data(env).channel;
  if (g_exiting.load()) throw MakeError(env, context + ": the process is exiting", "E_ABORTED");
  Executor& ex = *Pool()[(executor == static_cast<size_t>(-1) ? NextExecutor() : executor) % ExecutorCount()];
  try {
    ex.EnsureStarted();
  } catch (const std::system_error& e) {
    throw MakeError(env, context + ": cannot start a torch thread (" + std::string(e.what()) +
                    "); the process is at its thread limit", "E_LIMIT_EXCEEDED");
  }
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
  job->cancel = std::move(cancel);
  if (!ex.Push(job)) {
    Napi::Value err = MakeError(env, job->context + ": the process is exiting", "E_ABORTED").Value();
    napi_reject_deferred(env, deferred, err);
    return Napi::Promise(env, promise);
  }
  if (ch->pending++ == 0) ch->tsfn.Ref(env);
  return Napi::Promise(env, promise);
}

// ------------------------------------------------------------------------------------------ cancel tokens
std::shared_ptr<CancelFlag> CancelFlagOf(Napi::Env env, const Napi::Value& v) {
  if (v.IsNull() || v.IsUndefined()) return nullptr;
  if (!v.IsExternal()) throw MakeError(env, "cancel token must come from createCancelToken()", "E_INVALID_ARGUMENT");
  return *v.As<Napi::External<std::shared_ptr<CancelFlag>>>().Data();
}

Napi::Value CreateCancelToken(const Napi::CallbackInfo& info) {
  auto* flag = new std::shared_ptr<CancelFlag>(std::make_shared<CancelFlag>(false));  // owned by the finalizer
  return Napi::External<std::shared_ptr<CancelFlag>>::New(info.Env(), flag,
                                                          [](Napi::Env, std::shared_ptr<CancelFlag>* p) { delete p; });
}

Napi::Value CancelToken(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::shared_ptr<CancelFlag> flag = info.Length() > 0 ? CancelFlagOf(env, info[0]) : nullptr;
  if (!flag) throw MakeError(env, "cancel(token): token must come from createCancelToken()", "E_INVALID_ARGUMENT");
  flag->store(true);
  return env.Undefined();
}

Napi::Value WorkerStats(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t started = 0, queued = 0, running = 0;
  for (Executor* e : Pool()) e->Stats(&started, &queued, &running);
  Napi::Object o = Napi::Object::New(env);
  o.Set("executors", static_cast<double>(ExecutorCount()));
  o.Set("started", static_cast<double>(started));
  o.Set("queued", static_cast<double>(queued));
  o.Set("running", static_cast<double>(running));
  return o;
}

}  // namespace df
