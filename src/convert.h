// JS value <-> c10::IValue conversion, driven by the TorchScript type of the target argument.
#pragma once
#include <string>
#include <vector>

#include <ATen/core/function_schema.h>
#include <ATen/core/ivalue.h>
#include <ATen/core/jit_type.h>
#include <napi.h>

namespace df {

// Converts `v` to the TorchScript type `type`; `where` names the value in errors (e.g. "argument 'x'").
// Throws a JS Error (code E_INVALID_ARGUMENT) describing the mismatch.
c10::IValue ToIValue(Napi::Env env, const Napi::Value& v, const c10::TypePtr& type, const std::string& where);

// Converts a method result to JS: Tensor -> raw Tensor, int/float -> number, bool, str, List/Tuple -> array,
// Dict -> plain object (insertion order), None -> null.
Napi::Value FromIValue(Napi::Env env, const c10::IValue& v);

// "name(x: Tensor, n: int = 3) -> Dict[str, Tensor]" (without self).
std::string Signature(const c10::FunctionSchema& schema);

// Converts the JS arguments of a call to the stack of `schema` (without self), filling defaults of
// omitted trailing arguments; throws a JS Error naming the method and its signature on a count mismatch.
std::vector<c10::IValue> ArgsToStack(Napi::Env env, const c10::FunctionSchema& schema, const Napi::Array& args);

}  // namespace df
