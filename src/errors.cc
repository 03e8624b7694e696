#include "errors.h"

#include <new>
#include <sstream>
#include <vector>

#include <c10/util/Exception.h>

namespace df {

static std::string Trim(const std::string& s) {
  size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  size_t e = s.find_last_not_of(" \t\r\n");
  return s.substr(b, e - b + 1);
}

std::string CleanMessage(const std::string& raw) {
  std::vector<std::string> lines;
  std::istringstream in(raw);
  std::string line;
  bool skipping = false;
  while (std::getline(in, line)) {
    // c10 appends "Exception raised from f at file:line (most recent call first):" + a frame list.
    if (line.rfind("Exception raised from", 0) == 0) { skipping = true; continue; }
    if (skipping) {
      if (line.rfind("frame #", 0) == 0 || line.empty()) continue;
      skipping = false;
    }
    lines.push_back(line);
  }
  // TorchScript interpreter errors: "The following operation failed in the TorchScript interpreter.
  // Traceback of TorchScript ... RuntimeError: <the real message>". Put the real message first and keep
  // the TorchScript location after it.
  std::string joined;
  int lastErr = -1;
  bool traceback = raw.find("Traceback of TorchScript") != std::string::npos;
  if (traceback) {
    for (int i = static_cast<int>(lines.size()) - 1; i >= 0; --i) {
      const std::string& l = lines[i];
      size_t p = l.find("Error: ");
      if (p != std::string::npos && p > 0 && l.find(' ') > p && l[0] != ' ') { lastErr = i; break; }
    }
  }
  if (lastErr >= 0) {
    std::string head;
    for (size_t i = lastErr; i < lines.size(); ++i) head += (i == size_t(lastErr) ? "" : "\n") + lines[i];
    size_t p = head.find("Error: ");
    head = Trim(head.substr(p + 7));
    // Last "File ..." location of the TorchScript traceback, if any.
    std::string where;
    for (int i = 0; i < lastErr; ++i) {
      std::string t = Trim(lines[i]);
      if (t.rfind("File \"", 0) == 0) where = t;
    }
    joined = head;
    if (!where.empty()) joined += " (TorchScript " + where + ")";
  } else {
    for (size_t i = 0; i < lines.size(); ++i) joined += (i ? "\n" : "") + lines[i];
    joined = Trim(joined);
  }
  return joined.empty() ? std::string("unknown libtorch error") : joined;
}

std::string CleanMessage(const std::exception& e) {
  if (auto* ce = dynamic_cast<const c10::Error*>(&e)) return CleanMessage(std::string(ce->what_without_backtrace()));
  return CleanMessage(std::string(e.what()));
}

const char* ErrorCodeOf(const std::exception& e) {
  if (dynamic_cast<const std::bad_alloc*>(&e) != nullptr) return "E_OUT_OF_MEMORY";
  if (dynamic_cast<const c10::OutOfMemoryError*>(&e) != nullptr) return "E_OUT_OF_MEMORY";
  // The TorchScript interpreter rethrows what a method raised as a plain std::runtime_error with the
  // original message, so allocation failures inside a forward are recognised by their messages:
  // DefaultCPUAllocator "not enough memory: you tried to allocate", ours "CPU allocator: out of memory",
  // the CUDA caching allocator "CUDA out of memory".
  const std::string msg = dynamic_cast<const c10::Error*>(&e) != nullptr
                              ? static_cast<const c10::Error&>(e).what_without_backtrace()
                              : e.what();
  for (const char* needle : {"DefaultCPUAllocator: not enough memory", "CPU allocator: out of memory", "CUDA out of memory",
                             "std::bad_alloc"}) {
    if (msg.find(needle) != std::string::npos) return "E_OUT_OF_MEMORY";
  }
  return "E_TORCH";
}

Napi::Error MakeError(Napi::Env env, const std::string& message, const char* code) {
  Napi::Error err = Napi::Error::New(env, message);
  err.Set("code", Napi::String::New(env, code));
  return err;
}

}  // namespace df
