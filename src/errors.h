// Error handling shared by the addon: every C++/c10 exception becomes a JS Error with a clean
// message (no C++ backtrace, no "Exception raised from ..." lines).
#pragma once
#include <exception>
#include <string>

#include <napi.h>

namespace df {

// The message of an exception, cleaned for JS: c10::Error::what_without_backtrace(), without
// "Exception raised from" lines; for TorchScript interpreter errors the final "XxxError: ..." part first.
std::string CleanMessage(const std::exception& e);
std::string CleanMessage(const std::string& raw);

// The error code for a C++ exception: E_OUT_OF_MEMORY for an allocation failure (std::bad_alloc,
// c10::OutOfMemoryError (CUDA), libtorch's CPU allocator's "not enough memory"), else E_TORCH.
const char* ErrorCodeOf(const std::exception& e);

// A JS Error with `message` and `code` = 'E_TORCH' (or the given code).
Napi::Error MakeError(Napi::Env env, const std::string& message, const char* code = "E_TORCH");

// Runs fn(); converts any C++ exception (other than a pending Napi::Error) into a thrown JS Error
// prefixed by `context`.
template <typename F>
auto Guard(Napi::Env env, const char* context, F&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const Napi::Error&) {
    throw;
  } catch (const std::exception& e) {
    throw MakeError(env, std::string(context) + ": " + CleanMessage(e), ErrorCodeOf(e));
  }
}

}  // namespace df
