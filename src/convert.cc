#include "convert.h"

#include <cmath>
#include <sstream>

#include <ATen/core/Dict.h>
#include <ATen/core/List.h>

#include "errors.h"
#include "tensor.h"

namespace df {

constexpr double kMaxSafeInteger = 9007199254740991.0;  // Number.MAX_SAFE_INTEGER
constexpr int kMaxInferDepth = 64;
constexpr uint32_t kMaxListLength = 1u << 24;  // a sparse JS array may claim 2^32 - 1

static std::string TypeStr(const c10::TypePtr& t) { return t->annotation_str(); }

static std::string JsKind(const Napi::Value& v) {
  if (v.IsNull()) return "null";
  if (v.IsUndefined()) return "undefined";
  if (v.IsBoolean()) return "boolean";
  if (v.IsNumber()) return "number " + v.ToString().Utf8Value();  // as JS prints it: NaN, Infinity, 1e+300
  if (v.IsBigInt()) return "bigint";
  if (v.IsString()) return "string";
  if (v.IsArray()) return "array of length " + std::to_string(v.As<Napi::Array>().Length());
  if (v.IsTypedArray()) return "typed array (wrap it in a Tensor)";
  if (v.IsFunction()) return "function";
  return "object";
}

[[noreturn]] static void Mismatch(Napi::Env env, const Napi::Value& v, const c10::TypePtr& type, const std::string& where,
                                  const std::string& extra = "") {
  throw MakeError(env, where + " expects " + TypeStr(type) + ", got " + JsKind(v) + extra, "E_INVALID_ARGUMENT");
}

static bool IsPlainObject(Napi::Env env, const Napi::Value& v) {
  return v.IsObject() && !v.IsArray() && !v.IsTypedArray() && !v.IsFunction() && !TensorWrap::IsInstance(env, v);
}

// Best-effort conversion for `Any`-typed slots: the value's own JS type decides.
static c10::IValue Infer(Napi::Env env, const Napi::Value& v, const std::string& where, int depth = 0) {
  // Arrays nest as deep as the caller made them (or loop back on themselves): bound the recursion.
  if (depth > kMaxInferDepth)
    throw MakeError(env, where + ": nested more than " + std::to_string(kMaxInferDepth) + " levels deep (or cyclic)", "E_INVALID_ARGUMENT");
  if (v.IsNull() || v.IsUndefined()) return c10::IValue();
  if (v.IsBoolean()) return c10::IValue(v.As<Napi::Boolean>().Value());
  if (v.IsNumber()) {
    double d = v.As<Napi::Number>().DoubleValue();
    if (std::floor(d) == d && std::fabs(d) < 9007199254740992.0) return c10::IValue(static_cast<int64_t>(d));
    return c10::IValue(d);
  }
  if (v.IsBigInt()) {
    bool lossless;
    int64_t i = v.As<Napi::BigInt>().Int64Value(&lossless);
    if (!lossless) throw MakeError(env, where + ": bigint does not fit in int64", "E_INVALID_ARGUMENT");
    return c10::IValue(i);
  }
  if (v.IsString()) return c10::IValue(v.As<Napi::String>().Utf8Value());
  if (TensorWrap::IsInstance(env, v)) return c10::IValue(TensorWrap::From(env, v, where));
  if (v.IsArray()) {
    Napi::Array a = v.As<Napi::Array>();
    if (a.Length() > kMaxListLength)
      throw MakeError(env, where + ": a list of " + std::to_string(a.Length()) + " elements is too long", "E_LIMIT_EXCEEDED");
    std::vector<c10::IValue> items;
    for (uint32_t i = 0; i < a.Length(); ++i) items.push_back(Infer(env, a.Get(i), where + "[" + std::to_string(i) + "]", depth + 1));
    return c10::ivalue::Tuple::create(std::move(items));
  }
  throw MakeError(env, where + ": cannot infer a TorchScript type for a " + JsKind(v), "E_INVALID_ARGUMENT");
}

c10::IValue ToIValue(Napi::Env env, const Napi::Value& v, const c10::TypePtr& type, const std::string& where) {
  switch (type->kind()) {
    case c10::TypeKind::TensorType: {
      if (!TensorWrap::IsInstance(env, v)) Mismatch(env, v, type, where);
      return c10::IValue(TensorWrap::From(env, v, where));
    }
    case c10::TypeKind::IntType: {
      if (v.IsBigInt()) {
        bool lossless;
        int64_t i = v.As<Napi::BigInt>().Int64Value(&lossless);
        if (!lossless) throw MakeError(env, where + ": bigint does not fit in int64", "E_INVALID_ARGUMENT");
        return c10::IValue(i);
      }
      if (!v.IsNumber()) Mismatch(env, v, type, where);
      double d = v.As<Napi::Number>().DoubleValue();
      if (!std::isfinite(d) || std::floor(d) != d) Mismatch(env, v, type, where, " (not an integer)");
      // Beyond 2^53 a JS number is not an exact integer (and beyond 2^63 the cast would be undefined).
      if (std::fabs(d) > kMaxSafeInteger)
        Mismatch(env, v, type, where, " (not a safe integer: pass a bigint for values beyond 2^53)");
      return c10::IValue(static_cast<int64_t>(d));
    }
    case c10::TypeKind::FloatType: {
      if (v.IsBigInt()) {
        bool lossless;
        int64_t i = v.As<Napi::BigInt>().Int64Value(&lossless);
        if (!lossless) throw MakeError(env, where + ": bigint does not fit in int64", "E_INVALID_ARGUMENT");
        return c10::IValue(static_cast<double>(i));
      }
      if (!v.IsNumber()) Mismatch(env, v, type, where);
      // No method of ours takes NaN or an infinity as a setting: they would only spread into the outputs.
      double d = v.As<Napi::Number>().DoubleValue();
      if (!std::isfinite(d)) Mismatch(env, v, type, where, " (not a finite number)");
      return c10::IValue(d);
    }
    case c10::TypeKind::NumberType: {
      if (!v.IsNumber() && !v.IsBigInt()) Mismatch(env, v, type, where);
      return Infer(env, v, where);
    }
    case c10::TypeKind::BoolType: {
      if (!v.IsBoolean()) Mismatch(env, v, type, where);
      return c10::IValue(v.As<Napi::Boolean>().Value());
    }
    case c10::TypeKind::StringType: {
      if (!v.IsString()) Mismatch(env, v, type, where);
      return c10::IValue(v.As<Napi::String>().Utf8Value());
    }
    case c10::TypeKind::NoneType: {
      if (!v.IsNull() && !v.IsUndefined()) Mismatch(env, v, type, where);
      return c10::IValue();
    }
    case c10::TypeKind::OptionalType: {
      if (v.IsNull() || v.IsUndefined()) return c10::IValue();
      return ToIValue(env, v, type->expect<c10::OptionalType>()->getElementType(), where);
    }
    case c10::TypeKind::UnionType: {
      if (v.IsNull() || v.IsUndefined()) {
        if (type->isSubtypeOf(*c10::NoneType::get())) return c10::IValue();
      }
      for (const c10::TypePtr& alt : type->containedTypes()) {
        try {
          return ToIValue(env, v, alt, where);
        } catch (const Napi::Error&) {
        }
      }
      Mismatch(env, v, type, where);
    }
    case c10::TypeKind::ListType: {
      if (!v.IsArray()) Mismatch(env, v, type, where);
      const c10::TypePtr& elem = type->expect<c10::ListType>()->getElementType();
      Napi::Array a = v.As<Napi::Array>();
      if (a.Length() > kMaxListLength)
        throw MakeError(env, where + ": a list of " + std::to_string(a.Length()) + " elements is longer than the " +
                        std::to_string(kMaxListLength) + " accepted", "E_LIMIT_EXCEEDED");
      c10::impl::GenericList list(elem);
      list.reserve(a.Length());
      for (uint32_t i = 0; i < a.Length(); ++i)
        list.push_back(ToIValue(env, a.Get(i), elem, where + "[" + std::to_string(i) + "]"));
      return c10::IValue(std::move(list));
    }
    case c10::TypeKind::TupleType: {
      auto tt = type->expect<c10::TupleType>();
      auto elems = tt->elements();
      if (!v.IsArray() || v.As<Napi::Array>().Length() != elems.size())
        Mismatch(env, v, type, where, " (a tuple is passed as an array of " + std::to_string(elems.size()) + ")");
      Napi::Array a = v.As<Napi::Array>();
      std::vector<c10::IValue> items;
      items.reserve(elems.size());
      for (uint32_t i = 0; i < elems.size(); ++i)
        items.push_back(ToIValue(env, a.Get(i), elems[i], where + "[" + std::to_string(i) + "]"));
      return c10::ivalue::Tuple::create(std::move(items));
    }
    case c10::TypeKind::DictType: {
      auto dt = type->expect<c10::DictType>();
      const c10::TypePtr& key = dt->getKeyType();
      const c10::TypePtr& val = dt->getValueType();
      if (!IsPlainObject(env, v)) Mismatch(env, v, type, where);
      if (key->kind() != c10::TypeKind::StringType && key->kind() != c10::TypeKind::IntType)
        throw MakeError(env, where + ": dictionaries with " + TypeStr(key) + " keys are not supported", "E_INVALID_ARGUMENT");
      Napi::Object o = v.As<Napi::Object>();
      Napi::Array keys = o.GetPropertyNames();
      c10::impl::GenericDict dict(key, val);
      dict.reserve(keys.Length());
      for (uint32_t i = 0; i < keys.Length(); ++i) {
        std::string k = keys.Get(i).ToString().Utf8Value();
        c10::IValue kv;
        if (key->kind() == c10::TypeKind::StringType) {
          kv = c10::IValue(k);
        } else {
          try {
            size_t pos = 0;
            long long n = std::stoll(k, &pos);
            if (pos != k.size()) throw std::invalid_argument(k);
            kv = c10::IValue(static_cast<int64_t>(n));
          } catch (const std::exception&) {
            throw MakeError(env, where + ": key '" + k + "' is not an integer", "E_INVALID_ARGUMENT");
          }
        }
        dict.insert_or_assign(std::move(kv), ToIValue(env, o.Get(keys.Get(i)), val, where + "['" + k + "']"));
      }
      return c10::IValue(std::move(dict));
    }
    case c10::TypeKind::DeviceObjType: {
      if (!v.IsString()) Mismatch(env, v, type, where);
      return c10::IValue(ParseDevice(env, v.As<Napi::String>().Utf8Value()));
    }
    case c10::TypeKind::AnyType:
      return Infer(env, v, where);
    default:
      throw MakeError(env, where + ": TorchScript type " + TypeStr(type) + " cannot be passed from JS", "E_INVALID_ARGUMENT");
  }
}

Napi::Value FromIValue(Napi::Env env, const c10::IValue& v) {
  if (v.isNone()) return env.Null();
  if (v.isTensor()) {
    const at::Tensor& t = v.toTensor();
    if (!t.defined()) return env.Null();
    return TensorWrap::NewInstance(env, t);
  }
  if (v.isInt()) return Napi::Number::New(env, static_cast<double>(v.toInt()));
  if (v.isDouble()) return Napi::Number::New(env, v.toDouble());
  if (v.isBool()) return Napi::Boolean::New(env, v.toBool());
  if (v.isString()) return Napi::String::New(env, v.toStringRef());
  if (v.isList()) {
    auto items = v.toListRef();
    Napi::Array a = Napi::Array::New(env, items.size());
    for (size_t i = 0; i < items.size(); ++i) a.Set(static_cast<uint32_t>(i), FromIValue(env, items[i]));
    return a;
  }
  if (v.isTuple()) {
    const auto& elems = v.toTupleRef().elements();
    Napi::Array a = Napi::Array::New(env, elems.size());
    uint32_t i = 0;
    for (const c10::IValue& e : elems) a.Set(i++, FromIValue(env, e));
    return a;
  }
  if (v.isGenericDict()) {
    Napi::Object o = Napi::Object::New(env);
    for (const auto& entry : v.toGenericDict()) {
      const c10::IValue& k = entry.key();
      std::string key;
      if (k.isString()) key = k.toStringRef();
      else if (k.isInt()) key = std::to_string(k.toInt());
      else if (k.isDouble()) key = std::to_string(k.toDouble());
      else if (k.isBool()) key = k.toBool() ? "true" : "false";
      else throw MakeError(env, "cannot convert a dict with " + k.tagKind() + " keys to a JS object");
      // An own data property even for "__proto__" (o[key] = v would replace the object's prototype).
      o.DefineProperty(Napi::PropertyDescriptor::Value(key, FromIValue(env, entry.value()), napi_default_jsproperty));
    }
    return o;
  }
  if (v.isDevice()) return Napi::String::New(env, v.toDevice().str());
  throw MakeError(env, "cannot convert a TorchScript " + v.tagKind() + " result to a JS value");
}

std::string Signature(const c10::FunctionSchema& schema) {
  std::ostringstream s;
  s << schema.name() << "(";
  bool first = true;
  for (const c10::Argument& a : schema.arguments()) {
    if (a.name() == "self") continue;
    if (!first) s << ", ";
    first = false;
    s << a.name() << ": " << a.type()->annotation_str();
    if (a.default_value()) s << " = " << *a.default_value();
  }
  s << ") -> ";
  const auto& rets = schema.returns();
  if (rets.empty()) s << "None";
  else if (rets.size() == 1) s << rets[0].type()->annotation_str();
  else {
    s << "(";
    for (size_t i = 0; i < rets.size(); ++i) s << (i ? ", " : "") << rets[i].type()->annotation_str();
    s << ")";
  }
  return s.str();
}

std::vector<c10::IValue> ArgsToStack(Napi::Env env, const c10::FunctionSchema& schema, const Napi::Array& args) {
  std::vector<const c10::Argument*> formal;
  for (const c10::Argument& a : schema.arguments())
    if (a.name() != "self") formal.push_back(&a);
  size_t given = args.Length();
  // Trailing `undefined`s count as omitted.
  while (given > 0 && args.Get(static_cast<uint32_t>(given - 1)).IsUndefined()) --given;
  size_t required = 0;
  for (size_t i = 0; i < formal.size(); ++i)
    if (!formal[i]->default_value()) required = i + 1;
  if (given > formal.size() || given < required) {
    throw MakeError(env, schema.name() + "() takes " +
                    (required == formal.size() ? std::to_string(formal.size())
                                               : std::to_string(required) + " to " + std::to_string(formal.size())) +
                    " argument(s) but " + std::to_string(given) + " were given; expected " + Signature(schema),
                    "E_INVALID_ARGUMENT");
  }
  std::vector<c10::IValue> stack;
  stack.reserve(formal.size());
  for (size_t i = 0; i < formal.size(); ++i) {
    const c10::Argument& a = *formal[i];
    if (i < given) {
      std::string where = schema.name() + "() argument " + std::to_string(i + 1) + " '" + a.name() + "'";
      try {
        stack.push_back(ToIValue(env, args.Get(static_cast<uint32_t>(i)), a.type(), where));
      } catch (const Napi::Error& e) {
        Napi::Value code = e.Value().Get("code");
        std::string c = code.IsString() ? code.As<Napi::String>().Utf8Value() : "E_INVALID_ARGUMENT";
        throw MakeError(env, e.Message() + "; expected " + Signature(schema), c.c_str());
      }
    } else {
      stack.push_back(*a.default_value());
    }
  }
  return stack;
}

}  // namespace df
