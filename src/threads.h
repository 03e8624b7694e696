// Per-thread libtorch settings (intra-op thread count, TorchScript graph-executor optimisation) and the
// JS functions that change them.
//
// libtorch 1.13's at::set_num_threads() also rebuilds the shared pthreadpool (joining its threads) and is
// re-run by every thread's first parallel call once it has been used; called while other threads run
// work, it hung the process (issue 10, item 4). So the addon never calls it: the count is kept here and
// applied with omp_set_num_threads() (a per-thread setting) on each torch thread before its next job and
// on the calling JS thread. Builds without OpenMP fall back to at::set_num_threads on the JS thread.
#pragma once
#include <napi.h>

namespace df {

// Applies the current settings to the calling torch thread when they changed since its last job.
void SyncThreadSettings();

// Largest accepted intra-op thread count: max(256, 4 x hardware threads).
int MaxThreads();

Napi::Value SetNumThreads(const Napi::CallbackInfo& info);   // (n) -> undefined
Napi::Value GetNumThreads(const Napi::CallbackInfo& info);   // () -> number
Napi::Value SetJitOptimize(const Napi::CallbackInfo& info);  // (on: boolean)
Napi::Value GetJitOptimize(const Napi::CallbackInfo& info);

}  // namespace df
