// See conv_common.h.
#include "conv_common.h"
#include "pg_amx.h"
#include "pg_int8.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <atomic>
#include <thread>
#include <unistd.h>  // sysconf: the L2 size
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <type_traits>
#include <emmintrin.h>
#include <x86intrin.h>

namespace g2d {

const IsaKernels& BestKernels() {
  static const IsaKernels* chosen = [] {
    const char* forced = std::getenv("G2D_ISA");
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512vnni");
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (forced && std::strcmp(forced, "generic") == 0) return &isa_generic::kKernels;
    if (forced && std::strcmp(forced, "avx2") == 0 && avx2) return &isa_avx2::kKernels;
    if (avx512 && !(forced && std::strcmp(forced, "avx2") == 0)) return &isa_avx512::kKernels;
    if (avx2) return &isa_avx2::kKernels;
    return &isa_generic::kKernels;
  }();
  return *chosen;
}

namespace {
std::atomic<int64_t> second_stage_runs[3];  // sparse, dense, sparse from channel-last rows
}  // namespace

double DenseSecondStageAbove(bool int16, bool taps) {
  static const int forced = [] {  // 0 auto, 1 sparse, 2 dense
    const char* v = std::getenv("G2D_SECOND_STAGE");
    if (v && std::strcmp(v, "sparse") == 0) return 1;
    if (v && std::strcmp(v, "dense") == 0) return 2;
    return 0;
  }();
  if (forced == 1) return 2.0;   // `on > 2 * elements` never holds
  if (forced == 2) return -1.0;  // any span with a gate on runs dense
  return int16 ? kDenseSecondStageFractionInt16
         : taps ? kDenseSecondStageFractionTaps
                : kDenseSecondStageFraction;
}

namespace {
std::atomic<uint64_t> stage_cycles[kStageTimers];
}  // namespace

bool StageTimesOn() {
  static const bool on = [] {
    const char* v = std::getenv("G2D_STAGE_TIMES");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return on;
}
uint64_t StageClockNow() { return StageTimesOn() ? __rdtsc() : 0; }
void AddStageTime(StageTimer which, uint64_t since) {
  if (StageTimesOn()) stage_cycles[which].fetch_add(__rdtsc() - since, std::memory_order_relaxed);
}
void AddStageCycles(StageTimer which, uint64_t cycles) {
  if (cycles) stage_cycles[which].fetch_add(cycles, std::memory_order_relaxed);
}

bool CGTapSecondStage() {
  static const bool taps = [] {
    const char* v = std::getenv("G2D_CG_SECOND");
    return !(v && std::strcmp(v, "fields") == 0);
  }();
  return taps;
}

void CountSecondStage(bool dense) { second_stage_runs[dense ? 1 : 0].fetch_add(1, std::memory_order_relaxed); }

// ---------------------------------------------------------------- attributes and geometry

namespace {
// Reads attribute `name` as R (int64_t, float, std::string, std::vector<int64_t> or
// std::vector<float>); false if the node has no such attribute of that type.
template <class R>
bool TryAttr(const OrtKernelInfo* info, const char* name, R* out) {
  const OrtApi& api = Ort::GetApi();
  OrtStatus* st = nullptr;
  size_t size = 0;
  if constexpr (std::is_same<R, int64_t>::value) {
    st = api.KernelInfoGetAttribute_int64(info, name, out);
  } else if constexpr (std::is_same<R, float>::value) {
    st = api.KernelInfoGetAttribute_float(info, name, out);
  } else if constexpr (std::is_same<R, std::string>::value) {
    st = api.KernelInfoGetAttribute_string(info, name, nullptr, &size);
    if (!st) {
      std::string s(size, '\0');
      st = api.KernelInfoGetAttribute_string(info, name, s.data(), &size);
      if (!st) *out = s.c_str();
    }
  } else if constexpr (std::is_same<R, std::vector<int64_t>>::value) {
    st = api.KernelInfoGetAttributeArray_int64(info, name, nullptr, &size);
    if (!st) {
      R v(size);
      st = api.KernelInfoGetAttributeArray_int64(info, name, v.data(), &size);
      if (!st) *out = std::move(v);
    }
  } else {
    static_assert(std::is_same<R, std::vector<float>>::value, "unsupported attribute type");
    st = api.KernelInfoGetAttributeArray_float(info, name, nullptr, &size);
    if (!st) {
      R v(size);
      st = api.KernelInfoGetAttributeArray_float(info, name, v.data(), &size);
      if (!st) *out = std::move(v);
    }
  }
  if (st) {
    api.ReleaseStatus(st);
    return false;
  }
  return true;
}

template <class R> const char* TypeName();
template <> const char* TypeName<int64_t>() { return "an int"; }
template <> const char* TypeName<float>() { return "a float"; }
template <> const char* TypeName<std::string>() { return "a string"; }
template <> const char* TypeName<std::vector<int64_t>>() { return "a list of ints"; }

void SetError(std::string* error, const std::string& message) {
  if (error->empty()) *error = message;
}

// Reads `name` as R into *out (left as is when absent); an attribute of another type is an
// error, never a silent default.
template <class R>
void ReadTyped(const OrtKernelInfo* info, const char* name, R* out, std::string* error) {
  R value;
  if (TryAttr(info, name, &value)) {
    if constexpr (std::is_same<R, std::vector<int64_t>>::value) {
      // ONNX Runtime reads a list attribute of any type as a list of ints, empty unless it is
      // one: an empty result may be an int, float, string or float list in disguise.
      int64_t i;
      float f;
      std::string str;
      std::vector<float> floats;
      if (value.empty() && (TryAttr(info, name, &i) || TryAttr(info, name, &f) ||
                            TryAttr(info, name, &str) ||
                            (TryAttr(info, name, &floats) && !floats.empty()))) {
        SetError(error, std::string("attribute ") + name + " must be " + TypeName<R>());
        return;
      }
    }
    *out = std::move(value);
    return;
  }
  if (HasAttr(info, name))
    SetError(error, std::string("attribute ") + name + " must be " + TypeName<R>());
}
}  // namespace

bool HasAttr(const OrtKernelInfo* info, const char* name) {
  int64_t i;
  float f;
  std::string s;
  std::vector<int64_t> ints;
  std::vector<float> floats;
  return TryAttr(info, name, &i) || TryAttr(info, name, &f) || TryAttr(info, name, &s) ||
         TryAttr(info, name, &ints) || TryAttr(info, name, &floats);
}

int64_t ReadIntAttr(const OrtKernelInfo* info, const char* name, int64_t dflt, std::string* error) {
  int64_t v = dflt;
  ReadTyped(info, name, &v, error);
  return v;
}
float ReadFloatAttr(const OrtKernelInfo* info, const char* name, float dflt, std::string* error) {
  float v = dflt;
  ReadTyped(info, name, &v, error);
  return v;
}
std::string ReadStringAttr(const OrtKernelInfo* info, const char* name, const std::string& dflt,
                           std::string* error) {
  std::string v = dflt;
  ReadTyped(info, name, &v, error);
  return v;
}

std::vector<int64_t> ReadIntsAttr(const OrtKernelInfo* info, const char* name,
                                  const std::vector<int64_t>& dflt, std::string* error) {
  std::vector<int64_t> v = dflt;
  ReadTyped(info, name, &v, error);
  return v;
}

ConvAttrs ReadConvAttrs(const OrtKernelInfo* info, std::string* error) {
  ConvAttrs a;
  ReadTyped(info, "strides", &a.strides, error);
  ReadTyped(info, "pads", &a.pads, error);
  ReadTyped(info, "dilations", &a.dilations, error);
  ReadTyped(info, "kernel_shape", &a.kernel_shape, error);
  a.group = ReadIntAttr(info, "group", 1, error);
  auto in_range = [](const std::vector<int64_t>& v, size_t n, int64_t lo) {
    return v.size() == n && std::all_of(v.begin(), v.end(), [lo](int64_t x) {
             return x >= lo && x <= kMaxConvAttr;
           });
  };
  const std::string max = std::to_string(kMaxConvAttr);
  if (!in_range(a.strides, 2, 1))
    SetError(error, "attribute strides must be 2 ints in [1, " + max + "]");
  else if (!in_range(a.dilations, 2, 1))
    SetError(error, "attribute dilations must be 2 ints in [1, " + max + "]");
  else if (!in_range(a.pads, 4, 0))
    SetError(error, "attribute pads must be 4 ints in [0, " + max + "] (top, left, bottom, right)");
  else if (a.group < 1 || a.group > kMaxConvAttr)
    SetError(error, "attribute group must be in [1, " + max + "]");
  else if (HasAttr(info, "kernel_shape") && !in_range(a.kernel_shape, 2, 1))
    SetError(error, "attribute kernel_shape must be 2 positive ints (W's kh, kw)");
  // auto_pad is ONNX Conv's, not these ops' (their pads are always explicit): honouring it
  // silently as NOTSET would compute a different shape than the model asks for.
  std::string auto_pad = "NOTSET";
  if (HasAttr(info, "auto_pad") && !(TryAttr(info, "auto_pad", &auto_pad) && auto_pad == "NOTSET"))
    SetError(error, "attribute auto_pad is not supported (give explicit pads)");
  return a;
}

static std::string ShapeStr(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

void ExpectShape(const char* op, const char* what, const std::vector<int64_t>& shape,
                 const std::vector<int64_t>& expected) {
  if (shape != expected)
    throw OpError(std::string(op) + ": " + what + " has shape " + ShapeStr(shape) +
                  ", expected " + ShapeStr(expected));
}

namespace {
// a + b and a * b of non-negative int64 values, or an OpError naming `op` on overflow.
int64_t Add(const std::string& op, int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r)) throw OpError(op + ": layer geometry overflows int64");
  return r;
}
int64_t Mul(const std::string& op, int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_mul_overflow(a, b, &r)) throw OpError(op + ": layer geometry overflows int64");
  return r;
}
void Bounded(const std::string& op, const char* what, int64_t elements) {
  if (elements > kMaxBufferElements)
    throw OpError(op + ": " + what + " would have " + std::to_string(elements) +
                  " elements, more than the limit " + std::to_string(kMaxBufferElements));
}
}  // namespace

int64_t BufferElements(const char* op, const char* what, int64_t a, int64_t b) {
  const int64_t n = Mul(op, a, b);
  Bounded(op, what, n);
  return n;
}

ConvGeom MakeGeom(const char* op, const std::vector<int64_t>& xs, const std::vector<int64_t>& ws,
                  const ConvAttrs& a) {
  const std::string o = op;
  if (xs.size() != 4) throw OpError(o + ": X must be 4-D NCHW, got shape " + ShapeStr(xs));
  if (ws.size() != 4) throw OpError(o + ": W must be 4-D [O, C/group, kh, kw], got " + ShapeStr(ws));
  for (int64_t d : xs)
    if (d < 0) throw OpError(o + ": X has a negative dimension");
  for (int64_t d : ws)
    if (d < 1) throw OpError(o + ": W dimensions must be positive, got " + ShapeStr(ws));
  ConvGeom g{};
  g.N = xs[0], g.C = xs[1], g.H = xs[2], g.W = xs[3];
  g.O = ws[0], g.Cw = ws[1], g.kh = ws[2], g.kw = ws[3];
  g.sh = a.strides[0], g.sw = a.strides[1];
  g.pt = a.pads[0], g.pl = a.pads[1], g.pb = a.pads[2], g.pr = a.pads[3];
  g.dh = a.dilations[0], g.dw = a.dilations[1], g.group = a.group;
  if (!a.kernel_shape.empty() && (a.kernel_shape[0] != g.kh || a.kernel_shape[1] != g.kw))
    throw OpError(o + ": attribute kernel_shape " + ShapeStr(a.kernel_shape) +
                  " disagrees with W's kernel [" + std::to_string(g.kh) + ", " +
                  std::to_string(g.kw) + "]");
  if (g.C != Mul(o, g.Cw, g.group))
    throw OpError(o + ": X has " + std::to_string(g.C) + " channels but W expects " +
                  std::to_string(g.Cw) + " x group " + std::to_string(g.group));
  if (g.O % g.group != 0)
    throw OpError(o + ": output channels " + std::to_string(g.O) + " not divisible by group");
  // Every attribute is at most kMaxConvAttr (< 2^31) and every dimension at most 2^63 - 1, but
  // their sums and products can still overflow: each step is checked.
  const int64_t eff_h = Add(o, Mul(o, g.kh - 1, g.dh), 1), eff_w = Add(o, Mul(o, g.kw - 1, g.dw), 1);
  const int64_t ph = Add(o, Add(o, g.H, g.pt), g.pb), pw = Add(o, Add(o, g.W, g.pl), g.pr);
  if (ph < eff_h || pw < eff_w)
    throw OpError(o + ": kernel (with dilation) is larger than the padded input");
  g.OH = (ph - eff_h) / g.sh + 1;
  g.OW = (pw - eff_w) / g.sw + 1;
  // Buffers: the output [N, O, OH, OW] and the zero-padded copy of one sample [C, ph, pw].
  Bounded(o, "the output", Mul(o, Mul(o, g.N, g.O), Mul(o, g.OH, g.OW)));
  Bounded(o, "the padded input", Mul(o, g.C, Mul(o, ph, pw)));
  // Scratch buffers hold K x P elements; refuse sizes whose products could overflow.
  const int64_t work = Mul(o, Mul(o, g.Cw, Mul(o, g.kh, g.kw)), g.P());
  if (work > (int64_t(1) << 34)) throw OpError(o + ": layer too large for the im2col buffer");
  return g;
}

bool InputIsConstant(const OrtKernelInfo* info, size_t index) {
  int is_const = 0;
  const OrtValue* value = nullptr;
  OrtStatus* st = Ort::GetApi().KernelInfoGetConstantInput_tensor(info, index, &is_const, &value);
  if (st) {
    Ort::GetApi().ReleaseStatus(st);
    return false;
  }
  return is_const != 0 && value != nullptr;
}

// ---------------------------------------------------------------- threads and errors

namespace {
// The run-time settings' values: "auto" / "always" / "never" as 0 / 1 / 2 (SplitSpans and
// CGPool number them so; nullptr: auto), -1 for anything else.
int ParseAutoAlwaysNever(const char* v) {
  if (v == nullptr || std::strcmp(v, "auto") == 0) return 0;
  if (std::strcmp(v, "always") == 0) return 1;
  if (std::strcmp(v, "never") == 0) return 2;
  return -1;
}
const char* AutoAlwaysNeverName(int v) { return v == 1 ? "always" : v == 2 ? "never" : "auto"; }
static_assert(int(SplitSpans::kAlways) == 1 && int(SplitSpans::kNever) == 2, "ParseAutoAlwaysNever");
static_assert(int(CGPool::kAlways) == 1 && int(CGPool::kNever) == 2, "ParseAutoAlwaysNever");
static_assert(int(RowParts::kAlways) == 1 && int(RowParts::kNever) == 2, "ParseAutoAlwaysNever");
std::atomic<int> split_spans_setting{std::max(0, ParseAutoAlwaysNever(std::getenv("G2D_SPLIT_SPANS")))};
std::atomic<int> row_parts_setting{std::max(0, ParseAutoAlwaysNever(std::getenv("G2D_ROW_PARTS")))};
}  // namespace
SplitSpans SplitSpansSetting() { return SplitSpans(split_spans_setting.load(std::memory_order_relaxed)); }
RowParts RowPartsSetting() { return RowParts(row_parts_setting.load(std::memory_order_relaxed)); }
std::atomic<int64_t> split_span_calls{0};  // calls whose spans ran split by plan
std::atomic<int64_t> large_weight_span_calls{0};  // calls with one span per thread (kLargeWeightL2Share)
std::atomic<int64_t> row_part_calls{0};  // calls whose spans ran in row parts (RowParts)

namespace {
std::atomic<int> cg_pool_setting{std::max(0, ParseAutoAlwaysNever(std::getenv("G2D_CG_POOL")))};
std::atomic<int64_t> serial_cg_calls{0};  // CG calls the MAC rule kept on one thread
}  // namespace
CGPool CGPoolSetting() { return CGPool(cg_pool_setting.load(std::memory_order_relaxed)); }
void CountSerialCGCall() { serial_cg_calls.fetch_add(1, std::memory_order_relaxed); }

namespace {
std::atomic<uint64_t> parallel_for_calls{0};  // numbers each call that counts its threads

// ParallelFor's body. kCount: returns how many threads ran tasks (each counts itself at its
// first task of this call: the call's number against the last one the thread saw, since the
// address of `shared` repeats from call to call); otherwise 2 where a thread other than the
// caller ran any, else 1 (a thread id compare per task, no thread-local state).
template <bool kCount>
int RunOnPool(OrtKernelContext* ctx, size_t total, const std::function<void(size_t)>& fn) {
  if (total == 0) return 0;
  if (total == 1 || ctx == nullptr) {
    for (size_t i = 0; i < total; ++i) fn(i);
    return 1;
  }
  // An exception must not leave a pool thread (ONNX Runtime's workers do not catch): the
  // first one is kept and rethrown here, on the calling thread, once every task has run.
  struct Shared {
    const std::function<void(size_t)>* fn;
    std::mutex mutex;
    std::exception_ptr error;
    std::thread::id caller;
    uint64_t call;
    std::atomic<int> threads;  // kCount: threads seen; otherwise 1, or 2 once another helped
  } shared{&fn, {}, nullptr, std::this_thread::get_id(),
           kCount ? parallel_for_calls.fetch_add(1, std::memory_order_relaxed) + 1 : 0, {kCount ? 0 : 1}};
  auto trampoline = [](void* data, size_t i) {
    Shared& s = *static_cast<Shared*>(data);
    if constexpr (kCount) {
      thread_local uint64_t last_call = 0;
      if (last_call != s.call) {
        last_call = s.call;
        s.threads.fetch_add(1, std::memory_order_relaxed);
      }
    } else if (std::this_thread::get_id() != s.caller) {
      s.threads.store(2, std::memory_order_relaxed);
    }
    try {
      (*s.fn)(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(s.mutex);
      if (!s.error) s.error = std::current_exception();
    }
  };
  Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(ctx, trampoline, total, 0, &shared));
  if (shared.error) std::rethrow_exception(shared.error);
  return shared.threads.load(std::memory_order_relaxed);
}
}  // namespace

int ParallelForThreads(OrtKernelContext* ctx, size_t total, const std::function<void(size_t)>& fn) {
  return RunOnPool<true>(ctx, total, fn);
}

bool ParallelFor(OrtKernelContext* ctx, size_t total, const std::function<void(size_t)>& fn) {
  return RunOnPool<false>(ctx, total, fn) > 1;
}

int64_t L2CacheBytes() {
  static const int64_t bytes = [] {
    // G2D_L2_BYTES: another size, for tests (small layers through the large-weight rules)
    const char* forced = std::getenv("G2D_L2_BYTES");
    if (forced && std::atoll(forced) > 0) return int64_t(std::atoll(forced));
    const long reported = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return reported > 0 ? int64_t(reported) : int64_t(2) << 20;
  }();
  return bytes;
}

bool ReadReluAttr(const OrtKernelInfo* info, std::string* error) {
  const std::string activation = ReadStringAttr(info, "activation", "", error);
  if (!activation.empty() && activation != "Relu")
    SetError(error, "attribute activation must be \"Relu\" or absent, got \"" + activation + "\"");
  return activation == "Relu";
}

namespace {
// The seeds' level of a >= 0, scalar, as QuantLevels states it (and as the kernels' division
// path computes it: IEEE division and rounding are the same in every ISA).
float SeedLevel(float a, float s, float levels) {
  const float d = a / s;
  return std::nearbyint((1.f < d ? 1.f : d) * levels);
}

uint32_t Bits(float v) {
  uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

float FromBits(uint32_t b) {
  float v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}
}  // namespace

QuantLevels MakeQuantLevels(float s, float levels, int lanes) {
  QuantLevels q;
  q.s = s, q.levels = levels;
  if (!(std::isfinite(s) && s > 0.f && std::isfinite(levels) && levels >= 1.f)) return q;
  const float inf = std::numeric_limits<float>::infinity();
  const float top = SeedLevel(inf, s, levels);  // round(levels): the highest level
  if (!(top + 1.f <= float(std::min(lanes, QuantLevels::kMaxEntries)))) return q;
  const int R = int(top);
  // t_k, the least float of level >= k: a search over the bit patterns of [0, inf] (ordered
  // as the floats; SeedLevel is monotone), from the estimate ((k - 0.5) / levels) * s,
  // widening by doubling steps until the boundary is bracketed, then bisecting. A few
  // evaluations per level: the estimate is within a few ulps.
  const uint32_t inf_bits = Bits(inf);
  for (int k = 1; k <= R; ++k) {
    auto reaches = [&](uint32_t b) { return SeedLevel(FromBits(b), s, levels) >= float(k); };
    uint32_t lo = 0, hi = inf_bits;  // level(lo) < k <= level(hi)
    const uint32_t guess = std::min(Bits(((float(k) - 0.5f) / levels) * s), inf_bits);
    if (reaches(guess)) {
      hi = guess;
      for (uint32_t step = 1; hi > 0; step = step < (1u << 30) ? 2 * step : step) {
        const uint32_t cand = hi > step ? hi - step : 0;
        if (!reaches(cand)) { lo = cand; break; }
        hi = cand;
      }
    } else {
      lo = guess;
      for (uint32_t step = 1;; step = step < (1u << 30) ? 2 * step : step) {
        const uint32_t cand = inf_bits - lo > step ? lo + step : inf_bits;
        if (reaches(cand)) { hi = cand; break; }
        lo = cand;
      }
    }
    if (reaches(lo)) return q;  // level(0) = 0 < k: cannot happen; the division path stays
    while (hi - lo > 1) {
      const uint32_t mid = lo + (hi - lo) / 2;
      (reaches(mid) ? hi : lo) = mid;
    }
    q.lo[k] = FromBits(hi);
    q.hi[k - 1] = FromBits(hi);
  }
  for (int j = R; j < QuantLevels::kMaxEntries; ++j) q.hi[j] = std::nanf("");
  for (int j = 0; j <= R; ++j) q.value[j] = (float(j) / levels) * s;
  q.inv = levels / s;
  q.R = R;
  return q;
}

QuantizerAttrs ReadQuantizerAttrs(const OrtKernelInfo* info, const std::string& prefix,
                                  bool required, std::string* error) {
  const std::string levels = prefix + "levels", scale = prefix + "scale", eps = prefix + "eps";
  QuantizerAttrs q;
  const bool has_levels = HasAttr(info, levels.c_str());
  if (!has_levels) {
    if (required)
      SetError(error, "attribute " + levels + " is required");
    else if (HasAttr(info, scale.c_str()) || HasAttr(info, eps.c_str()))
      SetError(error, "attributes " + scale + " and " + eps + " need " + levels);
    return q;
  }
  q.levels = ReadFloatAttr(info, levels.c_str(), 0.f, error);
  q.scale = ReadFloatAttr(info, scale.c_str(), 0.f, error);
  q.eps = ReadFloatAttr(info, eps.c_str(), 1e-7f, error);
  if (!(std::isfinite(q.levels) && q.levels >= 1.f))
    SetError(error, "attribute " + levels + " must be finite and >= 1, got " + std::to_string(q.levels));
  else if (!(std::isfinite(q.scale) && q.scale >= 0.f))
    SetError(error, "attribute " + scale + " must be finite and >= 0, got " + std::to_string(q.scale));
  else if (!(std::isfinite(q.eps) && q.eps >= 0.f))
    SetError(error, "attribute " + eps + " must be finite and >= 0, got " + std::to_string(q.eps));
  if (!error->empty()) q.levels = 0.f;
  return q;
}

float CombineAbsMax(const std::vector<float>& parts) {
  float mx = parts.empty() ? 0.f : parts[0];
  for (float v : parts) mx = (v != v || mx != mx) ? std::nanf("") : std::max(mx, v);
  return mx;
}

PostAttrs ReadPostAttrs(const OrtKernelInfo* info, std::string* error) {
  PostAttrs a;
  a.relu = ReadReluAttr(info, error);
  a.clip = HasAttr(info, "clip_max");
  a.clip_max = ReadFloatAttr(info, "clip_max", 0.f, error);
  // min(y, NaN) would be NaN in ONNX Min but y in the kernels' clamp: refused, not guessed.
  if (a.clip && std::isnan(a.clip_max)) SetError(error, "attribute clip_max must not be NaN");
  a.quantize = ReadQuantizerAttrs(info, "quantize_", false, error);
  return a;
}

PostEpilogue MakePostEpilogue(const char* op, const OptionalTensor& post_scale,
                              const OptionalTensor& post_shift, int64_t O, const PostAttrs& attrs) {
  const Ort::Custom::Tensor<float>* scale = OptionalInput(post_scale);
  const Ort::Custom::Tensor<float>* shift = OptionalInput(post_shift);
  if ((scale == nullptr) != (shift == nullptr))
    throw OpError(std::string(op) + ": post_scale and post_shift must be given together");
  PostEpilogue post;
  post.ops = attrs;
  if (scale) {
    ExpectShape(op, "post_scale", scale->Shape(), {O});
    ExpectShape(op, "post_shift", shift->Shape(), {O});
    post.scale = scale->Data();
    post.shift = shift->Data();
  }
  return post;
}

void ApplyPostEpilogue(OrtKernelContext* ctx, const IsaKernels& isa, const PostEpilogue& post,
                       float* y, int64_t N, int64_t O, int64_t P) {
  const size_t rows = size_t(N * O);
  if (!post.Active() || rows == 0 || P == 0) return;
  const QuantizerAttrs& q = post.ops.quantize;
  const bool dynamic = q.Active() && !(q.scale > 0.f);
  // A static scale is known now: each row is quantized in the same pass, while it is in L1.
  const QuantLevels fixed = q.Active() && !dynamic ? MakeQuantLevels(q.scale, q.levels, isa.vw)
                                                   : QuantLevels{};
  std::vector<float> row_max(dynamic ? rows : 0);
  OrtKernelContext* par = ParallelIfLarge(ctx, N * O * P);
  ParallelFor(par, rows, [&](size_t i) {
    float* v = y + int64_t(i) * P;
    const int64_t o = int64_t(i) % O;
    // act(1 * (scale * v + 0) + shift): the one vectorized epilogue implementation.
    if (post.ChannelActive())
      isa.epilogue_row(v, P, 1.f, post.scale ? post.scale[o] : 1.f, 0.f,
                       post.shift ? post.shift[o] : 0.f, nullptr, post.ops.relu);
    if (post.ops.clip) isa.clip_max_row(v, P, post.ops.clip_max);
    if (dynamic) row_max[i] = isa.abs_max(v, P);
    else if (q.Active()) isa.quantize_sign_magnitude(v, P, fixed, v);
  });
  if (!dynamic) return;
  // The dynamic scale spans the whole output (every sample): a second pass.
  const QuantLevels levels = MakeQuantLevels(CombineAbsMax(row_max) + q.eps, q.levels, isa.vw);
  ParallelFor(par, rows, [&](size_t i) {
    float* v = y + int64_t(i) * P;
    isa.quantize_sign_magnitude(v, P, levels, v);
  });
}

Ort::Status Guarded(const char* op, const std::function<void()>& body) {
  try {
    body();
    return Ort::Status{nullptr};
  } catch (const OpError& e) {
    return Ort::Status(e.what(), ORT_INVALID_ARGUMENT);
  } catch (const std::bad_alloc&) {
    return Ort::Status((std::string(op) + ": out of memory").c_str(), ORT_RUNTIME_EXCEPTION);
  } catch (const std::exception& e) {
    return Ort::Status((std::string(op) + ": " + e.what()).c_str(), ORT_RUNTIME_EXCEPTION);
  }
}

// ---------------------------------------------------------------- packing

template <> int TileRows<float>(const IsaKernels& k) { return k.mr; }
template <> int TileCols<float>(const IsaKernels& k) { return k.nr; }
template <> int TileRows<int16_t>(const IsaKernels& k) { return k.imr; }
template <> int TileCols<int16_t>(const IsaKernels& k) { return k.inr; }

template <class T>
PackedWeights<T> PackWeights(const IsaKernels& isa, const T* w, const ConvGeom& g,
                             const std::vector<int>& outputs, const std::vector<int>& chans) {
  constexpr int P = PairOf<T>();
  const int mr = TileRows<T>(isa);
  PackedWeights<T> pw;
  pw.M = int64_t(outputs.size());
  pw.K = int64_t(chans.size()) * g.kk();
  pw.Kp = RoundUp(pw.K, P);
  pw.data.assign(RoundUp(pw.M, mr) * pw.Kp, T(0));
  for (int64_t m = 0; m < pw.M; ++m) {
    const T* wo = w + int64_t(outputs[m]) * g.Cw * g.kk();
    T* panel = pw.data.data() + (m / mr) * pw.Kp * mr;
    for (int64_t ci = 0; ci < int64_t(chans.size()); ++ci)
      for (int64_t t = 0; t < g.kk(); ++t) {
        const int64_t k = ci * g.kk() + t;
        panel[(k / P) * mr * P + (m % mr) * P + k % P] = wo[chans[ci] * g.kk() + t];
      }
  }
  return pw;
}

template <class T>
WeightRows<T> MakeWeightRows(const IsaKernels& isa, const T* w, const ConvGeom& g,
                             const std::vector<int>& outputs, const std::vector<int>& chans) {
  WeightRows<T> r;
  r.M = int64_t(outputs.size());
  r.K = int64_t(chans.size()) * g.kk();
  if constexpr (std::is_same<T, float>::value) {
    // Equal chunks (the fewest that fit in registers), so padding is under one vector each.
    const int64_t vecs = std::max<int64_t>(1, (r.K + isa.vw - 1) / isa.vw);
    const int64_t chunks = (vecs + isa.sddmm_max_vecs - 1) / isa.sddmm_max_vecs;
    r.chunk = (vecs + chunks - 1) / chunks * isa.vw;
    r.Lpad = chunks * r.chunk;
  } else {
    r.Lpad = RoundUp(std::max<int64_t>(r.K, 1), 32);
    r.chunk = r.Lpad;
  }
  r.data.assign(r.M * r.Lpad, T(0));
  for (int64_t m = 0; m < r.M; ++m) {
    const T* wo = w + int64_t(outputs[m]) * g.Cw * g.kk();
    for (int64_t ci = 0; ci < int64_t(chans.size()); ++ci)
      std::memcpy(&r.data[m * r.Lpad + ci * g.kk()], wo + chans[ci] * g.kk(), sizeof(T) * g.kk());
  }
  return r;
}

// Column panel `col0 .. col0+nr-1` of the im2col matrix over channels `chans`, packed as the
// micro-kernel's B operand: dst[(k/P)*nr*P + lane*P + k%P]. The panel's output pixels form
// runs of constant oh; within a run the input pixels are a strided row of X (contiguous for
// stride 1), and columns whose input falls into the padding are zero.
template <class T>
static void Im2colPanel(const T* x, const ConvGeom& g, const std::vector<int>& chans,
                        int64_t col0, int64_t nr, int64_t Kp, T* dst) {
  constexpr int P = PairOf<T>();
  const int64_t K = int64_t(chans.size()) * g.kk(), Np = g.P();
  const int64_t col_end = std::min(Np, col0 + nr);
  struct Run { int64_t oh, ow0, count, lane0; };
  Run runs[64];
  int nruns = 0;
  for (int64_t col = col0; col < col_end && nruns < 64;) {
    const int64_t oh = col / g.OW, ow0 = col % g.OW;
    const int64_t count = std::min(g.OW - ow0, col_end - col);
    runs[nruns++] = {oh, ow0, count, col - col0};
    col += count;
  }
  const int64_t n_valid = col_end - col0;
  for (int64_t k = 0; k < Kp; ++k) {
    T* row = dst + (k / P) * nr * P + k % P;
    if (k >= K) {
      for (int64_t t = 0; t < nr; ++t) row[t * P] = T(0);
      continue;
    }
    const int64_t c = chans[k / g.kk()], i = (k % g.kk()) / g.kw, j = k % g.kw;
    const T* xc = x + c * g.H * g.W;
    const int64_t off = j * g.dw - g.pl;  // iw = ow * sw + off
    // Valid ow for this tap: 0 <= ow * sw + off < W.
    const int64_t ow_lo = off >= 0 ? 0 : (-off + g.sw - 1) / g.sw;
    const int64_t ow_hi = g.W - off > 0 ? (g.W - off + g.sw - 1) / g.sw : 0;
    for (int r = 0; r < nruns; ++r) {
      const Run& run = runs[r];
      T* d = row + run.lane0 * P;
      const int64_t ih = run.oh * g.sh - g.pt + i * g.dh;
      if (ih < 0 || ih >= g.H) {
        for (int64_t t = 0; t < run.count; ++t) d[t * P] = T(0);
        continue;
      }
      const T* src = xc + ih * g.W + off;
      const int64_t lo = std::clamp(ow_lo - run.ow0, int64_t(0), run.count);
      const int64_t hi = std::clamp(ow_hi - run.ow0, lo, run.count);
      for (int64_t t = 0; t < lo; ++t) d[t * P] = T(0);
      if (g.sw == 1) {
        const T* s1 = src + run.ow0;
        for (int64_t t = lo; t < hi; ++t) d[t * P] = s1[t];
      } else {
        for (int64_t t = lo; t < hi; ++t) d[t * P] = src[(run.ow0 + t) * g.sw];
      }
      for (int64_t t = hi; t < run.count; ++t) d[t * P] = T(0);
    }
    for (int64_t t = n_valid; t < nr; ++t) row[t * P] = T(0);
  }
}

TapRows MakeTapRows(const IsaKernels& isa, const float* w, const ConvGeom& g,
                    const std::vector<int>& outputs, const std::vector<int>& chans) {
  TapRows r;
  r.M = int64_t(outputs.size());
  r.kk = g.kk();
  r.Cs = RoundUp(std::max<int64_t>(int64_t(chans.size()), 1), isa.vw);
  r.data.assign(size_t(r.M * r.kk * r.Cs), 0.f);
  for (int64_t m = 0; m < r.M; ++m) {
    const float* wo = w + int64_t(outputs[m]) * g.Cw * g.kk();
    for (int64_t i = 0; i < int64_t(chans.size()); ++i)
      for (int64_t t = 0; t < g.kk(); ++t)
        r.data[size_t((m * r.kk + t) * r.Cs + i)] = wo[chans[i] * g.kk() + t];
  }
  return r;
}

// fields[t, k] = panel element (k, t) for the first nv pixels of a packed im2col panel
// (see Im2colPanel's layout), rows zero-padded from K to Lpad.
template <class T>
static void TransposePanel(const T* panel, int64_t K, int64_t nr, int64_t nv, int64_t Lpad,
                           T* fields) {
  constexpr int P = PairOf<T>();
  for (int64_t k = 0; k < K; ++k) {
    const T* row = panel + (k / P) * nr * P + k % P;
    for (int64_t t = 0; t < nv; ++t) fields[t * Lpad + k] = row[t * P];
  }
  for (int64_t t = 0; t < nv; ++t)
    for (int64_t k = K; k < Lpad; ++k) fields[t * Lpad + k] = T(0);
}

namespace {
template <class T> struct AccOf { using type = float; };
template <> struct AccOf<int16_t> { using type = int32_t; };

inline void Micro(const IsaKernels& isa, int64_t K, const float* a, const float* b, float* c,
                  int64_t ldc, int mv, int nv, bool accumulate) {
  isa.sgemm_micro(K, a, b, c, ldc, mv, nv, accumulate);
}
inline void Micro(const IsaKernels& isa, int64_t K, const int16_t* a, const int16_t* b,
                  int32_t* c, int64_t ldc, int mv, int nv, bool accumulate) {
  isa.igemm_micro(K, a, b, c, ldc, mv, nv, accumulate);
}
inline void DotRows(const IsaKernels& isa, const int16_t* x, const int16_t* const* rows, int n,
                    int64_t len, int32_t* out) {
  isa.idot_rows(x, rows, n, len, out);
}

// k-block of the panel product: the B panel's kKc x nr block (32 KiB of fp32) stays in L1
// while every row panel of A streams past it.
constexpr int64_t kKc = 256;

// Block length for a K of Kp: blocks of at most kKc, equal in size (even, for int16 pairs),
// so that no tiny last block pays a full pass of C-tile loads and stores.
inline int64_t KBlock(int64_t Kp) {
  const int64_t blocks = std::max<int64_t>(1, (Kp + kKc - 1) / kKc);
  return std::max<int64_t>(2, RoundUp((Kp + blocks - 1) / blocks, 2));
}

// Where a panel's columns come from. fp32 convolutions read the GEMM's B operand in place
// from a zero-padded copy of the sample ("indirect": row k of a panel starting at column q0 is
// the nr floats at xpad + q0 + off[k]). Stride 1: columns q = oh * Wp + ow over the padded
// width; columns with ow >= OW are computed and dropped, ~(Wp-OW)/Wp extra work. Stride
// (sh, sw) > 1: each channel's padded plane is split into sh * sw phase planes, phase (a, b)
// holding padded pixels (r * sh + a, s * sw + b) at row r, column s (Hph x Wph, Hph = ceil(Hp
// / sh), Wph = ceil(Wp / sw)); tap (i, j) of output (oh, ow) reads padded pixel (oh * sh + i *
// dh, ow * sw + j * dw) = phase ((i * dh) % sh, (j * dw) % sw) at row oh + (i * dh) / sh,
// column ow + (j * dw) / sw: unit stride again, so q = oh * Wph + ow and the same in-place
// product serves every stride (strided stage 1 of CG ResNet-20's downsampling layers had
// spent more time packing im2col panels than multiplying). int16 (PG) and strides above 4
// pack an im2col panel (column q = output pixel q).
template <class T>
struct ColumnSource {
  const ConvGeom* g = nullptr;
  const T* x = nullptr;
  bool indirect = false;
  const float* xpad = nullptr;
  int64_t Wp = 0, Hp = 0, plane = 0, columns = 0;  // Wp, Hp, plane: of one phase plane
  std::vector<int64_t> plane_base;  // channel c's first (phase) plane starts at xpad + plane_base[c]
  int64_t Pixel(int64_t q) const {
    if (!indirect) return q;
    const int64_t ow = q % Wp;
    return ow < g->OW ? (q / Wp) * g->OW + ow : -1;
  }
};

// Copies the channels `chans` (those MakeSource laid out) of src.x into src's padded planes.
// Only the padding border is zeroed (the buffer is reused, the interior is overwritten).
template <class T>
void FillSource(const ColumnSource<T>& src, const std::vector<int>& chans,
                OrtKernelContext* parallel_ctx) {
  if constexpr (std::is_same<T, float>::value) {
    if (!src.indirect) return;
    const ConvGeom& g = *src.g;
    const T* const x = src.x;
    const int64_t Wp = src.Wp, plane_size = src.plane;
    float* const buf = const_cast<float*>(src.xpad);  // the caller's scratch buffer
    const IsaKernels& isa = BestKernels();
    // Split over the thread pool when asked (in blocks of channels, so a small copy stays on
    // one thread): the copy is otherwise a serial step before the parallel GEMM.
    constexpr size_t kChannelsPerTask = 8;
    auto copy_block = [&](size_t block) {
      const size_t end = std::min(chans.size(), (block + 1) * kChannelsPerTask);
      for (size_t slot = block * kChannelsPerTask; slot < end; ++slot) {
        const int64_t c = chans[slot];
        float* plane = buf + src.plane_base[size_t(c)];
        const float* xc = x + c * g.H * g.W;
        if (g.sh == 1 && g.sw == 1) {
          // Stride 1: one plane of [pl zeros | W inputs | pr zeros] rows, one row's right
          // padding and the next one's left adjacent (isa.pad_rows: not a memcpy and a memset
          // call per row, which made this copy ~4 us of a 50 us ResNet-20 CG layer).
          std::fill_n(plane, g.pt * Wp + g.pl, 0.f);
          isa.pad_rows(xc, g.H, g.W, plane + g.pt * Wp + g.pl, Wp, g.pr + g.pl, g.pr);
          std::fill_n(plane + (g.pt + g.H) * Wp, g.pb * Wp, 0.f);
          continue;
        }
        // Phase planes (stride 1: the one padded plane): (a, b) at plane + (a * sw + b) *
        // plane_size, padded pixel (r * sh + a, s * sw + b) at row r, column s; outside the
        // input (padding, the round-up) zero.
        if (g.sw == 2) {
          // The common stride: each input row split once into its two phase rows
          // (isa.split_pairs). Input column iw is padded column iw + pl: phase (iw + pl) % 2,
          // column (iw + pl) / 2, so even pixels fill phase pl % 2 from column pl / 2 and odd
          // ones the other phase from (pl + 1) / 2; both runs end within Wp = ceil((W + pl +
          // pr) / 2). The generic loop below took 7-8 us of a 40 us stride-2 ResNet-20 CG
          // layer (perf); one pass per phase row, each reading the whole input row, ~10 us of
          // 33 (G2D_STAGE_TIMES "pad"); a zero-padded copy of the row split afterwards was no
          // faster (its loads straddled the copy's stores: no store-to-load forwarding).
          const int64_t b_even = g.pl % 2, at_even = g.pl / 2, at_odd = (g.pl + 1) / 2;
          for (int64_t a = 0; a < g.sh; ++a) {
            float* const ph_even = plane + (a * 2 + b_even) * plane_size;
            float* const ph_odd = plane + (a * 2 + 1 - b_even) * plane_size;
            for (int64_t r = 0; r < src.Hp; ++r) {
              const int64_t ih = r * g.sh + a - g.pt;
              const bool inside = ih >= 0 && ih < g.H;  // else the rows are padding: zeros
              isa.split_pairs(inside ? xc + ih * g.W : nullptr, inside ? g.W : 0, ph_even + r * Wp,
                              ph_odd + r * Wp, at_even, at_odd, Wp);
            }
          }
          continue;
        }
        for (int64_t a = 0; a < g.sh; ++a)
          for (int64_t b = 0; b < g.sw; ++b) {
            float* ph = plane + (a * g.sw + b) * plane_size;
            // Columns s whose input column s * sw + b - pl lies in [0, W).
            const int64_t s_lo = std::max<int64_t>(0, (g.pl - b + g.sw - 1) / g.sw);
            const int64_t s_hi = std::clamp<int64_t>((g.W + g.pl - b + g.sw - 1) / g.sw, s_lo, Wp);
            for (int64_t r = 0; r < src.Hp; ++r) {
              float* row = ph + r * Wp;
              const int64_t ih = r * g.sh + a - g.pt;
              if (ih < 0 || ih >= g.H) {
                std::memset(row, 0, sizeof(float) * size_t(Wp));
                continue;
              }
              const float* in = xc + ih * g.W + (s_lo * g.sw + b - g.pl);
              for (int64_t t = 0; t < s_lo; ++t) row[t] = 0.f;
              if (g.sw == 1) {
                std::memcpy(row + s_lo, in, sizeof(float) * size_t(s_hi - s_lo));
              } else {
                for (int64_t t = s_lo; t < s_hi; ++t) row[t] = in[(t - s_lo) * g.sw];
              }
              for (int64_t t = s_hi; t < Wp; ++t) row[t] = 0.f;
            }
          }
      }
    };
    const size_t blocks = (chans.size() + kChannelsPerTask - 1) / kChannelsPerTask;
    if (parallel_ctx)
      ParallelFor(parallel_ctx, blocks, copy_block);
    else
      for (size_t b = 0; b < blocks; ++b) copy_block(b);
  }
}

// `only`: if non-null, only these input channels are copied (the others are never read), so a
// sample whose channels are half zero pays for half the copy. `defer_copy`: the planes are
// laid out but not filled; FillSource(src, *only) fills them before the first read.
template <class T>
ColumnSource<T> MakeSource(const T* x, const ConvGeom& g, int nr, AlignedVec<float>& pad_buf,
                           const std::vector<int>* only = nullptr,
                           OrtKernelContext* parallel_ctx = nullptr, bool defer_copy = false) {
  ColumnSource<T> src;
  src.g = &g;
  src.x = x;
  src.columns = g.P();
  if constexpr (std::is_same<T, float>::value) {
    // Strides above 4 keep im2col panels (the phase planes would be mostly padding and their
    // count, sh * sw, unbounded), and so do planes smaller than their stride, where rounding
    // up to whole phases would more than double the copy (MakeGeom bounds the padded input,
    // not its round-up).
    const int64_t Hp = g.H + g.pt + g.pb, Wp = g.W + g.pl + g.pr;
    const int64_t rounded = RoundUp(Hp, g.sh) * RoundUp(Wp, g.sw);
    if (g.sh <= 4 && g.sw <= 4 && rounded <= 2 * Hp * Wp) {
      src.indirect = true;
      src.Hp = (Hp + g.sh - 1) / g.sh;  // one phase plane (the whole padded plane at stride 1)
      src.Wp = (Wp + g.sw - 1) / g.sw;
      src.plane = src.Hp * src.Wp;
      src.columns = (g.OH - 1) * src.Wp + g.OW;
      const int64_t phases = g.sh * g.sw;
      const std::vector<int> all = only ? std::vector<int>() : Indices(g.C);
      const std::vector<int>& chans = only ? *only : all;
      src.plane_base.assign(size_t(g.C), -1);
      // Slack after the last plane: a panel's last columns may read up to nr floats past it.
      const int64_t used = int64_t(chans.size()) * phases * src.plane;
      pad_buf.resize(size_t(used + nr + 16));
      float* const buf = pad_buf.data();
      for (size_t slot = 0; slot < chans.size(); ++slot)
        src.plane_base[chans[slot]] = int64_t(slot) * phases * src.plane;
      std::memset(buf + used, 0, sizeof(float) * size_t(nr + 16));
      src.xpad = buf;
      if (!defer_copy) FillSource(src, chans, parallel_ctx);
    }
  }
  return src;
}

template <class T>
std::vector<int64_t> Offsets(const ColumnSource<T>& src, const std::vector<int>& chans) {
  if (!src.indirect) return {};
  const ConvGeom& g = *src.g;
  std::vector<int64_t> off(chans.size() * size_t(g.kk()));
  // Each tap's offset within a channel's planes (phase plane and position, ColumnSource),
  // once per tap: with the divisions per entry this loop took 7% of a 64-channel 8x8 CG
  // layer's time (perf).
  std::vector<int64_t> tap(size_t(g.kk()));
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < g.kw; ++j) {
      const int64_t ri = i * g.dh, cj = j * g.dw;
      tap[size_t(i * g.kw + j)] =
          ((ri % g.sh) * g.sw + cj % g.sw) * src.plane + (ri / g.sh) * src.Wp + cj / g.sw;
    }
  int64_t* o = off.data();  // filled by pointer: push_back's capacity checks cost more than
                            // the small layers' stage 1 (perf, 64 ch 8x8)
  for (int c : chans) {
    const int64_t base = src.plane_base[size_t(c)];
    for (int64_t t = 0; t < g.kk(); ++t) *o++ = base + tap[size_t(t)];
  }
  return off;
}

// acc[M_pad x nr] (row stride ldc) = packed weights * the panel of columns q0 .. q0+nr-1.
template <class T, class Acc>
void PanelProduct(const IsaKernels& isa, const PackedWeights<T>& w, const ColumnSource<T>& src,
                  const std::vector<int>& chans, const std::vector<int64_t>& off, int64_t q0,
                  AlignedVec<T>& panel, Acc* acc, int64_t ldc) {
  const int mr = TileRows<T>(isa), nr = TileCols<T>(isa);
  const int nv = int(std::min<int64_t>(nr, src.columns - q0));
  if constexpr (std::is_same<T, float>::value) {
    if (src.indirect) {
      const int64_t kb = KBlock(w.Kp);
      for (int64_t k0 = 0; k0 < std::max<int64_t>(w.Kp, 1); k0 += kb) {
        const int64_t kc = std::min(kb, w.Kp - k0);
        for (int64_t ip = 0; ip * mr < w.M; ++ip)
          isa.sgemm_indirect_micro(kc, w.data.data() + ip * w.Kp * mr + k0 * mr, src.xpad + q0,
                                   off.data() + k0, acc + ip * mr * ldc, ldc,
                                   int(std::min<int64_t>(mr, w.M - ip * mr)), nv, k0 > 0);
      }
      return;
    }
  }
  panel.resize(size_t(std::max<int64_t>(w.Kp, 1) * nr));
  Im2colPanel(src.x, *src.g, chans, q0, nr, w.Kp, panel.data());
  const int64_t kb = KBlock(w.Kp);
  for (int64_t k0 = 0; k0 < std::max<int64_t>(w.Kp, 1); k0 += kb) {
    const int64_t kc = std::min(kb, w.Kp - k0);
    for (int64_t ip = 0; ip * mr < w.M; ++ip)
      Micro(isa, kc, w.data.data() + ip * w.Kp * mr + k0 * mr, panel.data() + k0 * nr,
            acc + ip * mr * ldc, ldc, int(std::min<int64_t>(mr, w.M - ip * mr)), nv, k0 > 0);
  }
}

// The panels of columns q0 .. q0+ncols-1 (one span), panel j's product in acc + j * stride
// ([M_pad x nr] each, row stride nr). Indirect fp32 runs K block by K block and row panel by
// row panel over all the span's column panels, so each mr x kc block of the weights is read
// once per span from L2 and reused from L1 by every panel: with per-panel products, stage
// 2's weights (128 x 864 floats, 442 KB: more than L2 beside the input) streamed from L3 once
// per panel, and the dense second stage ran at ~65% of ONNX Runtime's dense conv per MAC.
// rows (indirect fp32 only, RowParts): the output rows [rows.first, rows.second) of a row
// part, a multiple of mr apart from the end, computed in place (acc's other rows untouched);
// {0, -1}: all.
template <class T, class Acc>
void SpanProduct(const IsaKernels& isa, const PackedWeights<T>& w, const ColumnSource<T>& src,
                 const std::vector<int>& chans, const std::vector<int64_t>& off, int64_t q0,
                 int64_t ncols, AlignedVec<T>& panel, Acc* acc, int64_t stride,
                 std::pair<int64_t, int64_t> rows = {0, -1}) {
  const int mr = TileRows<T>(isa), nr = TileCols<T>(isa);
  const bool all_rows = rows.first == 0 && (rows.second < 0 || rows.second >= w.M);
  if constexpr (std::is_same<T, float>::value) {
    if (src.indirect) {
      const int64_t row_end = all_rows ? w.M : rows.second;
      const int64_t kb = KBlock(w.Kp);
      for (int64_t k0 = 0; k0 < std::max<int64_t>(w.Kp, 1); k0 += kb) {
        const int64_t kc = std::min(kb, w.Kp - k0);
        for (int64_t ip = rows.first / mr; ip * mr < row_end; ++ip) {
          const int mv = int(std::min<int64_t>(mr, row_end - ip * mr));
          for (int64_t c0 = 0; c0 < ncols; c0 += nr) {
            const int nv = int(std::min<int64_t>(nr, src.columns - q0 - c0));
            isa.sgemm_indirect_micro(kc, w.data.data() + ip * w.Kp * mr + k0 * mr,
                                     src.xpad + q0 + c0, off.data() + k0,
                                     acc + (c0 / nr) * stride + ip * mr * nr, nr, mv, nv, k0 > 0);
          }
        }
      }
      return;
    }
  }
  if (!all_rows) throw OpError("internal: a row part of a GEMM that is not indirect fp32");
  for (int64_t c0 = 0; c0 < ncols; c0 += nr)
    PanelProduct(isa, w, src, chans, off, q0 + c0, panel, acc + (c0 / nr) * stride, nr);
}

// fields[t, 0:Lpad] = receptive field of the panel's column t over `chans` (zero-padded).
template <class T>
void PanelFields(const IsaKernels& isa, const ColumnSource<T>& src, const std::vector<int>& chans,
                 const std::vector<int64_t>& off, int64_t q0, int64_t nr, int64_t nv, int64_t K,
                 int64_t Lpad, AlignedVec<T>& panel, T* fields) {
  if constexpr (std::is_same<T, float>::value) {
    if (src.indirect) {  // all nr rows are written; rows >= nv are never read
      isa.gather_fields(src.xpad + q0, off.data(), K, Lpad, fields, int(nr));
      return;
    }
  }
  const int64_t Kp = RoundUp(K, PairOf<T>());
  panel.resize(size_t(std::max<int64_t>(Kp, 1) * nr));
  Im2colPanel(src.x, *src.g, chans, q0, nr, Kp, panel.data());
  TransposePanel(panel.data(), K, nr, nv, Lpad, fields);
}
}  // namespace

template <class T>
void ConvByPanels(OrtKernelContext* ctx, const IsaKernels& isa, const PackedWeights<T>& w,
                  const T* x, const ConvGeom& g, const std::vector<int>& chans,
                  const RowEpilogue& ep) {
  using Acc = typename ConvAcc<T>::type;
  const int64_t nr = TileCols<T>(isa), mr = TileRows<T>(isa);
  const ColumnSource<T> src = MakeSource(x, g, int(nr), Scratch<float, 7>(), &chans, ctx);
  const std::vector<int64_t> off = Offsets(src, chans);
  ParallelFor(ctx, size_t((src.columns + nr - 1) / nr), [&](size_t jp) {
    const int64_t q0 = int64_t(jp) * nr, nv = std::min<int64_t>(nr, src.columns - q0);
    AlignedVec<Acc>& tile = Scratch<Acc, 1>();
    tile.resize(size_t(RoundUp(std::max<int64_t>(w.M, 1), mr) * nr));
    PanelProduct(isa, w, src, chans, off, q0, Scratch<T, 0>(), tile.data(), nr);
    // Runs of consecutive output pixels (indirect panels skip the padding columns).
    for (int64_t t0 = 0; t0 < nv;) {
      const int64_t p0 = src.Pixel(q0 + t0);
      if (p0 < 0) {
        ++t0;
        continue;
      }
      int64_t len = 1;
      while (t0 + len < nv && src.Pixel(q0 + t0 + len) == p0 + len) ++len;
      for (int64_t m = 0; m < w.M; ++m) {
        const Acc* a = tile.data() + m * nr + t0;
        float* dst = ep.y + int64_t(ep.rows[m]) * ep.ld + p0;
        for (int64_t t = 0; t < len; ++t) dst[t] = float(a[t]);
        ep.ApplyToRun(isa, m, dst, p0, len);
      }
      t0 += len;
    }
  });
}

void DenseConvSample(OrtKernelContext* ctx, const IsaKernels& isa, const float* w, const float* x,
                     const ConvGeom& g, float* y) {
  // Non-finite weights: the GEMM would multiply them by the zero padding too (inf * 0 = NaN)
  // where PyTorch's and ONNX Runtime's convs never read the padding. So they are zeroed for
  // the GEMM and their products added here over the taps that read the input only.
  const int64_t kk = g.kk(), nw = g.O * g.Cw * kk;
  if (!AllFinite(w, nw)) {
    std::vector<float> finite_w(w, w + nw);
    std::vector<int64_t> odd;
    for (int64_t i = 0; i < nw; ++i)
      if (!std::isfinite(w[i])) finite_w[size_t(i)] = 0.f, odd.push_back(i);
    DenseConvSample(ctx, isa, finite_w.data(), x, g, y);
    const int64_t Og = g.O / g.group;
    for (int64_t idx : odd) {
      const int64_t o = idx / (g.Cw * kk), ci = idx / kk % g.Cw, i = idx % kk / g.kw, j = idx % g.kw;
      const float* xc = x + ((o / Og) * g.Cw + ci) * g.H * g.W;
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        const int64_t ih = oh * g.sh - g.pt + i * g.dh;
        if (ih < 0 || ih >= g.H) continue;
        for (int64_t ow = 0; ow < g.OW; ++ow) {
          const int64_t iw = ow * g.sw - g.pl + j * g.dw;
          if (iw >= 0 && iw < g.W) y[o * g.P() + oh * g.OW + ow] += w[idx] * xc[ih * g.W + iw];
        }
      }
    }
    return;
  }
  const int64_t Og = g.O / g.group;
  const std::vector<float> ones(size_t(Og), 1.f), zeros(size_t(Og), 0.f);
  for (int64_t gi = 0; gi < g.group; ++gi) {
    std::vector<int> outputs, w_chans, x_chans;
    for (int64_t o = gi * Og; o < (gi + 1) * Og; ++o) outputs.push_back(int(o));
    for (int64_t c = 0; c < g.Cw; ++c) {
      w_chans.push_back(int(c));
      x_chans.push_back(int(gi * g.Cw + c));
    }
    const PackedWeights<float> pw = PackWeights(isa, w, g, outputs, w_chans);
    RowEpilogue ep{outputs.data(), y, g.P(), ones.data(), ones.data(), zeros.data(), zeros.data()};
    ep.relu = false;
    ConvByPanels(ctx, isa, pw, x, g, x_chans, ep);
  }
}

// The receptive fields of `ncols` consecutive columns from q0 (one panel of nr columns at a
// time) into fields [RoundUp(ncols, nr), Lpad].
template <class T>
void SpanFields(const IsaKernels& isa, const ColumnSource<T>& src2, const std::vector<int>& chans,
                const std::vector<int64_t>& off2, int64_t q0, int64_t ncols, int64_t K,
                int64_t Lpad, T* fields) {
  const int64_t nr = TileCols<T>(isa);
  for (int64_t c0 = 0; c0 < ncols; c0 += nr)
    PanelFields(isa, src2, chans, off2, q0 + c0, nr, std::min(nr, ncols - c0), K, Lpad,
                Scratch<T, 0>(), fields + c0 * Lpad);
}

// Sparse second stage, fp32: a sampled dense-dense product (SDDMM) over a span of `ncols`
// columns (gate and out are [M, ld]). The gated-on elements are listed row by row (per output
// channel, its gated-on columns); the receptive fields of the span's columns are gathered
// once into `fields` [ncols, Lpad]. Per chunk of K and per output row, the row's weight chunk
// is loaded into registers once and every gated-on column of that row streams past it
// (isa.sddmm_chunk): one weight load per row and chunk instead of per element. The span is
// kSecondStagePanels panels wide: each (row, chunk) call has a fixed cost, which a wider
// span shares among more gated-on columns.
template <class T>
void SparseSecondStageRows(const IsaKernels& isa, const GatedStagePlan<T>& plan,
                           const ColumnSource<T>& src2, const std::vector<int64_t>& off2,
                           int64_t q0, int64_t ncols, int64_t ld, const uint8_t* gate, float s2,
                           float* out) {
  const int64_t M = int64_t(plan.outputs.size());
  const WeightRows<T>& rows = plan.w2_rows;
  AlignedVec<int32_t>& cols_buf = Scratch<int32_t, 4>();  // gated-on columns, row by row
  AlignedVec<int32_t>& start_buf = Scratch<int32_t, 5>();  // row m: cols[start[m] .. start[m+1])
  uint64_t clock = StageClockNow();
  cols_buf.resize(size_t(M * ncols + 1));
  start_buf.resize(size_t(M + 1));
  int32_t* const cols = cols_buf.data();
  int32_t* const start = start_buf.data();
  int32_t pos = 0;
  for (int64_t m = 0; m < M; ++m) {
    start[m] = pos;
    const uint8_t* gm = gate + m * ld;
    for (int64_t t = 0; t < ncols; ++t) {  // branch-free: gates are unpredictable
      cols[pos] = int32_t(t);
      pos += gm[t];
    }
  }
  start[M] = pos;
  AddStageTime(kTimeLists, clock);
  clock = StageClockNow();
  AlignedVec<float>& fields = Scratch<float, 2>();
  fields.resize(size_t(RoundUp(ncols, TileCols<T>(isa)) * rows.Lpad));
  SpanFields(isa, src2, plan.chans2, off2, q0, ncols, rows.K, rows.Lpad, fields.data());
  AddStageTime(kTimeGather, clock);
  clock = StageClockNow();
  AlignedVec<float>& partial = Scratch<float, 12>();  // per element, one vector of lane sums
  AlignedVec<float>& dots = Scratch<float, 13>();
  const int64_t chunks = rows.Lpad / rows.chunk;
  partial.resize(size_t(pos + 1) * isa.vw);  // read and written only when chunks > 1
  dots.resize(size_t(pos));
  const int nvec = int(rows.chunk / isa.vw);
  for (int64_t c = 0; c < chunks; ++c) {
    const bool last = c + 1 == chunks;
    for (int64_t m = 0; m < M; ++m) {
      const int n = start[m + 1] - start[m];
      if (n == 0) continue;
      isa.sddmm_chunk(nvec, rows.data.data() + m * rows.Lpad + c * rows.chunk,
                      fields.data() + c * rows.chunk, rows.Lpad, cols + start[m], n,
                      partial.data() + int64_t(start[m]) * isa.vw, c > 0,
                      last ? dots.data() + start[m] : nullptr);
    }
  }
  AddStageTime(kTimeSparse, clock);
  clock = StageClockNow();
  for (int64_t m = 0; m < M; ++m) {
    float* om = out + m * ld;
    for (int32_t e = start[m]; e < start[m + 1]; ++e) om[cols[e]] += s2 * dots[e];
  }
  AddStageTime(kTimeScatter, clock);
}

// The stage-2 channels of one sample, zero-padded by the conv's pads, channel-last:
// x[(h * Wp + w) * Cs + i] = X[chans[i], h - pt, w - pl] (zero in the padding and for
// chans.size() <= i < Cs). Output pixel (oh, ow)'s tap (i, j) is the run of Cs floats at
// (Base(oh, ow) + i * dh * Wp + j * dw) * Cs: the receptive field is read in place. Without
// dilation along the width (dw = 1) a kernel row's kw taps are adjacent pixels, one run of
// kw * Cs floats: the field is kh runs (toff[i] = i * dh * Wp, run_len = kw * Cs), matching
// TapRows' [kh, kw, Cs] order; else kh * kw runs of Cs.
//
// The copy is filled row by row when a span's sparse second stage first reads those rows
// (RunGatedConv: once per row, under the span tasks' threads): at low gate-on fractions most
// spans never do; made up front, the whole copy was 2-3 us of the ~9 us before stage 1 of a
// 16-channel 32x32 ResNet-20 CG layer (tools/bench_network_layers.py, "pad").
struct ChannelLast {
  const float* x = nullptr;    // the copy
  const float* src = nullptr;  // the sample, NCHW
  int64_t Cs = 0, Hp = 0, Wp = 0, run_len = 0;
  std::vector<int64_t> toff;      // one entry per run
  std::vector<int64_t> chan_off;  // copy channel i = src + chan_off[i]
};

// The layout of `chans`' channel-last copy in dst ([Hp, Wp, Cs]); FillChannelLastRow copies.
ChannelLast LayoutChannelLast(const float* x, const ConvGeom& g, const std::vector<int>& chans,
                              int64_t Cs, float* dst) {
  ChannelLast cl;
  cl.x = dst;
  cl.src = x;
  cl.Cs = Cs;
  const int64_t Wp = g.W + g.pl + g.pr;
  cl.Hp = g.H + g.pt + g.pb;
  cl.Wp = Wp;
  cl.run_len = g.dw == 1 ? g.kw * Cs : Cs;
  cl.toff.reserve(size_t(g.dw == 1 ? g.kh : g.kk()));
  for (int64_t i = 0; i < g.kh; ++i)
    for (int64_t j = 0; j < (g.dw == 1 ? 1 : g.kw); ++j) cl.toff.push_back(i * g.dh * Wp + j * g.dw);
  cl.chan_off.resize(chans.size());
  for (size_t i = 0; i < chans.size(); ++i) cl.chan_off[i] = int64_t(chans[i]) * g.H * g.W;
  return cl;
}

// Copies padded row h of the channel-last copy (zeros in the padding).
void FillChannelLastRow(const IsaKernels& isa, const ConvGeom& g, const ChannelLast& cl, int64_t h) {
  const int64_t Wp = cl.Wp, Cs = cl.Cs, nc = int64_t(cl.chan_off.size()), ih = h - g.pt;
  const float* const x = cl.src;
  const int64_t* const off = cl.chan_off.data();
  float* row = const_cast<float*>(cl.x) + h * Wp * Cs;  // the caller's scratch buffer
  if (ih < 0 || ih >= g.H) {
    std::memset(row, 0, sizeof(float) * size_t(Wp * Cs));
    return;
  }
  std::memset(row, 0, sizeof(float) * size_t(g.pl * Cs));
  std::memset(row + (g.pl + g.W) * Cs, 0, sizeof(float) * size_t(g.pr * Cs));
  // Runs of up to nr pixels through the ISA's transpose (it reads the run's pixels of every
  // channel and writes a row of Cs for each; a 16- or 8-pixel row in one call: pixel by
  // pixel, the copy of ResNet-20's 16x16 and 8x8 layers was scalar).
  const int64_t nr = isa.nr;
  for (int64_t w0 = 0; w0 < g.W; w0 += nr)
    isa.gather_fields(x + ih * g.W + w0, off, nc, Cs, row + (g.pl + w0) * Cs,
                      int(std::min(nr, g.W - w0)));
}

SetBitTable::SetBitTable() {
  for (int v = 0; v < 256; ++v) {
    int n = 0;
    for (int b = 0; b < 8; ++b)
      if (v >> b & 1) at[v][n++] = b;
    for (int k = n; k < 8; ++k) at[v][k] = 0;
    count[v] = n;
  }
}
const SetBitTable kSetBitPositions;

// Sparse second stage from the channel-last copy (fp32, plans with w2_taps): per output row,
// its gated-on columns of the span, dot products by isa.sparse_dots, added into out [M, ld].
// Column t's output pixel as a channel-last pixel index: q0 + t where `base` is null (stride
// 1: the span's columns run over the padded width, as the copy's pixels do), else base[t].
// Rows m0 .. m0 + M - 1 of `rows` (out and gate hold those M rows).
void SparseSecondStageTaps(const IsaKernels& isa, const TapRows& rows, int64_t m0, int64_t M,
                           const ChannelLast& cl, const int32_t* base, int64_t q0, int64_t ncols,
                           int64_t ld, const uint8_t* gate, float s2, float* out) {
  uint64_t clock = StageClockNow();
  AlignedVec<int32_t>& cols_buf = Scratch<int32_t, 4>();  // gated-on columns, row by row
  AlignedVec<int32_t>& bases_buf = Scratch<int32_t, 5>();  // their channel-last pixels
  AlignedVec<int32_t>& start_buf = Scratch<int32_t, 12>();  // row m: [start[m], start[m + 1])
  AlignedVec<float>& dots_buf = Scratch<float, 13>();
  cols_buf.resize(size_t(M * ncols + 16));  // whole vectors are stored past the last
  start_buf.resize(size_t(M + 1));
  int32_t* const cols = cols_buf.data();
  int32_t* const start = start_buf.data();
  isa.gated_columns(gate, ld, M, ncols, cols, start);
  const int32_t pos = start[M];
  const int32_t* pix = cols;  // pixel indices relative to x
  const float* x = cl.x + q0 * cl.Cs;
  if (base) {
    bases_buf.resize(size_t(pos) + 1);
    for (int32_t e = 0; e < pos; ++e) bases_buf[size_t(e)] = base[cols[e]];
    pix = bases_buf.data();
    x = cl.x;
  }
  dots_buf.resize(size_t(pos) + 1);
  float* const dots = dots_buf.data();
  AddStageTime(kTimeLists, clock);
  clock = StageClockNow();
  const int64_t row_len = rows.kk * rows.Cs;
  const float* const row_data = rows.data.data() + m0 * row_len;
  for (int64_t m = 0; m < M; ++m) {
    const int n = start[m + 1] - start[m];
    if (n == 0) continue;
    isa.sparse_dots(row_data + m * row_len, rows.Cs, cl.run_len, int(cl.toff.size()),
                    cl.toff.data(), x, pix + start[m], n, dots + start[m]);
    float* om = out + m * ld;
    for (int32_t e = start[m]; e < start[m + 1]; ++e) om[cols[e]] += s2 * dots[e];
  }
  AddStageTime(kTimeSparse, clock);
}

// Sparse second stage, int16 (PG): one dot product per gated-on element; four outputs per
// pass, so one load of the pixel's receptive field feeds four weight rows. on_rows lists,
// column by column, the gated-on outputs (CSR with offsets counts).
template <class T>
void SparseSecondStageDots(const IsaKernels& isa, const GatedStagePlan<T>& plan,
                           const ColumnSource<T>& src2, const std::vector<int64_t>& off2,
                           int64_t q0, int64_t ncols, int64_t ld, const uint8_t* gate, float s2,
                           float* out) {
  using Acc = typename AccOf<T>::type;
  const int64_t M = int64_t(plan.outputs.size());
  // Prefix sums of the gated-on outputs per column (a span has at most kSecondStagePanels
  // panels of at most 64 columns).
  int32_t counts[kMaxSpanColumns + 1] = {};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t t = 0; t < ncols; ++t) counts[t + 1] += gate[m * ld + t];
  for (int64_t t = 0; t < ncols; ++t) counts[t + 1] += counts[t];
  const int64_t on = counts[ncols];
  AlignedVec<int32_t>& on_rows = Scratch<int32_t, 4>();
  AlignedVec<int32_t>& fill = Scratch<int32_t, 5>();
  on_rows.resize(size_t(on + 1));  // slot `on` absorbs the writes of gated-off elements
  fill.assign(counts, counts + ncols);
  int32_t* const rows_p = on_rows.data();
  int32_t* const fill_p = fill.data();
  for (int64_t m = 0; m < M; ++m) {
    const uint8_t* gm = gate + m * ld;
    for (int64_t t = 0; t < ncols; ++t) {  // branch-free: gates are unpredictable
      const int32_t pos = gm[t] ? fill_p[t] : int32_t(on);
      rows_p[pos] = int32_t(m);
      fill_p[t] += gm[t];
    }
  }
  const WeightRows<T>& rows = plan.w2_rows;
  AlignedVec<T>& fields = Scratch<T, 2>();
  fields.resize(size_t(RoundUp(ncols, TileCols<T>(isa)) * rows.Lpad));
  SpanFields(isa, src2, plan.chans2, off2, q0, ncols, rows.K, rows.Lpad, fields.data());
  const T* const fields_p = fields.data();
  for (int64_t t = 0; t < ncols; ++t) {
    const int64_t begin = counts[t], end = counts[t + 1];
    const T* field = fields_p + t * rows.Lpad;
    for (int64_t e = begin; e < end; e += 4) {
      const int n = int(std::min<int64_t>(4, end - e));
      const T* wrows[4];
      Acc dots[4];
      for (int i = 0; i < n; ++i) wrows[i] = rows.data.data() + rows_p[e + i] * rows.Lpad;
      DotRows(isa, field, wrows, n, rows.Lpad, dots);
      for (int i = 0; i < n; ++i) out[rows_p[e + i] * ld + t] += s2 * float(dots[i]);
    }
  }
}

// Runs its function once among the threads of one kernel call; the others wait for it,
// spinning (what it guards takes microseconds). Not std::call_once: glibc ends every first
// call of a once with a futex wake system call (strace: 34 per call of a 32x32 layer, one per
// padded row of the channel-last copy), which made a ResNet-20 CG layer ~10% slower than the
// copy it deferred.
class SpinOnce {
 public:
  template <class F>
  void operator()(F&& f) {
    for (;;) {
      uint8_t state = state_.load(std::memory_order_acquire);
      if (state == kDone) return;
      if (state == kNotYet && state_.compare_exchange_weak(state, kRunning, std::memory_order_acquire)) {
        try {
          f();
        } catch (...) {
          state_.store(kNotYet, std::memory_order_release);  // a waiter tries again
          throw;
        }
        state_.store(kDone, std::memory_order_release);
        return;
      }
      _mm_pause();
    }
  }

 private:
  static constexpr uint8_t kNotYet = 0, kRunning = 1, kDone = 2;
  std::atomic<uint8_t> state_{kNotYet};
};

template <class T>
void RunGatedConv(OrtKernelContext* ctx, const IsaKernels& isa, const ConvGeom& g,
                  const std::vector<GatedStagePlan<T>>& plans, const T* x1, const T* x2,
                  float scale1, float scale2, const float* threshold, float* y,
                  const GatedStagePlan<T>* joint_second, const PostEpilogue* post,
                  GatedCallRecord* record) {
  using Acc = typename AccOf<T>::type;
  const int64_t Np = g.P();
  const int mr = TileRows<T>(isa), nr = TileCols<T>(isa);
  const float s1 = scale1, s2 = scale2;  // locals: stores through y cannot alias them
  if (plans.empty() || Np == 0) return;
  const uint64_t call_clock = StageClockNow();
  uint64_t pad_clock = StageClockNow();
  // One padded copy of the sample for all plans (block-diagonal CG has p plans).
  bool uses_taps = joint_second && !joint_second->w2_taps.empty();
  for (const auto& plan : plans) uses_taps = uses_taps || !plan.w2_taps.empty();
  // CG with channel-last second stages: the padded planes hold stage 1's channels; stage 2's
  // are laid out in a second buffer but copied only when a span first needs them (a dense
  // second stage, a group's gathered-fields stage): at low gate-on fractions no span does,
  // and the copy of the other (p - 1) / p of the channels was a quarter of the call's fixed
  // cost (128 ch 28x28).
  const bool split_sources = uses_taps && x2 == x1;
  // (The per-call vectors below are reserved to size: with growth by push_back, a CG layer of
  // ResNet-20 made ~50 allocations per call here, ~2% of its time with their frees.)
  std::vector<int> chans1_used, chans2_used;
  if (split_sources) {
    chans1_used.reserve(size_t(g.C));
    chans2_used.reserve(size_t(g.C));
    std::vector<bool> in1(size_t(g.C), false), in2(size_t(g.C), false);
    for (const auto& plan : plans) {
      for (int c : plan.chans1) in1[size_t(c)] = true;
      for (int c : plan.chans2) in2[size_t(c)] = true;
    }
    if (joint_second)
      for (int c : joint_second->chans2) in2[size_t(c)] = true;
    for (int c = 0; c < int(g.C); ++c) {
      if (in1[size_t(c)]) chans1_used.push_back(c);
      if (in2[size_t(c)]) chans2_used.push_back(c);
    }
  }
  AddStageTime(kTimeSetup, pad_clock);
  pad_clock = StageClockNow();
  const ColumnSource<T> src1 = MakeSource(x1, g, nr, Scratch<float, 7>(),
                                          split_sources ? &chans1_used : nullptr, ctx);
  const ColumnSource<T> src2 =
      split_sources ? MakeSource(x2, g, nr, Scratch<float, 8>(), &chans2_used, ctx, true)
      : x2 == x1    ? src1
                    : MakeSource(x2, g, nr, Scratch<float, 8>(), nullptr, ctx);
  AddStageTime(kTimePad, pad_clock);
  pad_clock = StageClockNow();
  SpinOnce src2_filled;
  auto need_src2 = [&] {  // before any read of src2's planes
    if (split_sources) src2_filled([&] { FillSource(src2, chans2_used, nullptr); });
  };
  std::vector<std::vector<int64_t>> offs1;
  std::vector<std::vector<float>> thresholds;
  offs1.reserve(plans.size());
  thresholds.reserve(plans.size());
  int64_t max_rows = 0, all_rows = 0;
  for (const auto& plan : plans) {
    offs1.push_back(Offsets(src1, plan.chans1));
    thresholds.emplace_back(plan.outputs.size());
    for (size_t m = 0; m < plan.outputs.size(); ++m) thresholds.back()[m] = threshold[plan.outputs[m]];
    max_rows = std::max<int64_t>(max_rows, int64_t(plan.outputs.size()));
    all_rows += int64_t(plan.outputs.size());
  }
  // Stage 2's offsets (plan i; i == plans.size(): the joint second stage), computed when a
  // span first reads src2's planes: the channel-last sparse form never does, and with p = 4
  // block-diagonal plans these lists were most of the offsets' cost (1.5-4.5 us of a 50 us
  // ResNet-20 CG layer, G2D_STAGE_TIMES).
  std::vector<std::vector<int64_t>> offs2(plans.size() + 1);
  std::unique_ptr<SpinOnce[]> offs2_made(new SpinOnce[plans.size() + 1]);
  auto off2_of = [&](size_t i) -> const std::vector<int64_t>& {
    offs2_made[i]([&] {
      offs2[i] = Offsets(src2, i < plans.size() ? plans[i].chans2 : joint_second->chans2);
    });
    return offs2[i];
  };
  // Channel-last copies of the stage-2 channels for the plans that read them (w2_taps), one
  // per plan (and one for the joint second stage), in one buffer.
  std::vector<ChannelLast> channel_last(plans.size() + 1);
  std::unique_ptr<SpinOnce[]> channel_last_rows;  // [plans + 1, Hp]
  if constexpr (std::is_same<T, float>::value) {
    const int64_t Hp = g.H + g.pt + g.pb, plane = Hp * (g.W + g.pl + g.pr);
    std::vector<int64_t> at(plans.size() + 2, 0);
    auto plan_at = [&](size_t i) -> const GatedStagePlan<T>* {
      return i < plans.size() ? &plans[i] : joint_second;
    };
    for (size_t i = 0; i <= plans.size(); ++i) {
      const GatedStagePlan<T>* plan = plan_at(i);
      at[i + 1] = at[i] + (plan && !plan->w2_taps.empty() ? plan->w2_taps.Cs * plane : 0);
    }
    if (at.back() > 0) {
      AlignedVec<float>& buf = Scratch<float, 32>();
      buf.resize(size_t(at.back()));
      for (size_t i = 0; i <= plans.size(); ++i) {
        const GatedStagePlan<T>* plan = plan_at(i);
        if (plan && !plan->w2_taps.empty())
          channel_last[i] = LayoutChannelLast(x2, g, plan->chans2, plan->w2_taps.Cs, buf.data() + at[i]);
      }
      channel_last_rows.reset(new SpinOnce[(plans.size() + 1) * size_t(Hp)]);
    }
  }
  // Rows [h0, h1] of channel_last[i], each copied by the first span that needs it.
  auto need_channel_last_rows = [&](size_t i, int64_t h0, int64_t h1) {
    const ChannelLast& cl = channel_last[i];
    for (int64_t h = std::max<int64_t>(h0, 0); h <= std::min(h1, cl.Hp - 1); ++h)
      channel_last_rows[size_t(int64_t(i) * cl.Hp + h)]([&] { FillChannelLastRow(isa, g, cl, h); });
  };
  AddStageTime(kTimeSetup, pad_clock);
  // With a joint second stage, every plan's stage 1 writes its rows of one [all_rows, NR]
  // span buffer (rows in plan order, joint_second->outputs' order), and stage 2 runs once.
  const int64_t buffer_rows = joint_second ? all_rows : max_rows;
  // One task per span of 1 or kSecondStagePanels panels of nr columns (output pixels), start to
  // finish for every plan: stage 1 and the gate panel by panel, then stage 2 over the span
  // (wider than a panel: its sparse form has a fixed cost per output row and K chunk), in a
  // single parallel section per call, the span's data in cache. The span's outputs are
  // assembled in `out` [M, NR] (contiguous rows, so the gate and select loops vectorize) and
  // copied to y once, run by run of consecutive pixels.
  // The channel-last sparse stage's pixel of each column: at stride 1 on the padded width,
  // column q's channel-last pixel is q itself; otherwise a per-span table (base).
  const bool base_is_column = src1.indirect && g.sh == 1 && g.sw == 1;
  const bool fill_base = uses_taps && !base_is_column;
  const int64_t panels = (src1.columns + nr - 1) / nr;
  const double macs_per_wide_span =
      double(g.O) * double(g.C) * double(g.kk()) * double(g.P()) * double(kTapSpanPanels) /
      double(panels);
  const int64_t tap_panels =
      panels < kTapSpanPanels * kTapSpanMinSpans && macs_per_wide_span >= kTapSpanSplitMacs
          ? kTapSpanPanels / 2
          : kTapSpanPanels;
  int64_t span_panels = panels >= kWideSpanMinPanels ? (uses_taps ? tap_panels : kSecondStagePanels) : 1;
  const bool large_weights = uses_taps && record &&
      double(g.O) * double(g.Cw) * double(g.kk()) * double(sizeof(T)) >
          kLargeWeightL2Share * double(L2CacheBytes());
  // Row parts (RowParts): one plan, no joint stage, its channel-last second stage, the
  // indirect panels (SpanProduct's row ranges), rows for two tiles at least.
  const RowParts row_setting = RowPartsSetting();
  const bool row_parts_fit = std::is_same<T, float>::value && plans.size() == 1 && !joint_second &&
                             !plans[0].w2_taps.empty() && src1.indirect && src2.indirect &&
                             int64_t(plans[0].outputs.size()) > mr && row_setting != RowParts::kNever;
  int64_t row_parts = row_parts_fit && row_setting == RowParts::kAlways ? 2 : 1;
  if (large_weights) {
    const int64_t call_number = record->calls.fetch_add(1, std::memory_order_relaxed);
    // (Without a ctx every task runs on the caller: one span.)
    int threads = ctx ? record->threads_seen.load(std::memory_order_relaxed) : 1;
    if (threads == 1 && ctx && call_number % kLargeWeightProbeCalls == 0) threads = 2;
    if (threads > 0) {
      // As few spans as the widest span allows, rounded up to whole rounds of the threads and
      // cut evenly (128 ch 28x28 at 2 threads: 4 spans of 7 panels, not 8, 8, 8 and 3: one
      // thread ran two wide spans while the other ran a wide and a narrow one).
      const int64_t widest = kMaxSpanColumns / nr, fewest = (panels + widest - 1) / widest;
      if (row_parts_fit && threads >= 2 && fewest < threads) {
        span_panels = std::min(panels, widest);  // the whole map in as few spans as fit
        row_parts = std::max<int64_t>(row_parts, threads);
      } else {
        const int64_t spans_wanted = RoundUp(fewest, int64_t(threads));
        span_panels = (panels + spans_wanted - 1) / spans_wanted;
      }
      large_weight_span_calls.fetch_add(1, std::memory_order_relaxed);
    }
  }
  // Rows per part: whole tiles (the last part takes the rest); fewer parts if the rows run out.
  const int64_t part_rows =
      row_parts > 1 ? RoundUp((int64_t(plans[0].outputs.size()) + row_parts - 1) / row_parts, int64_t(mr)) : 0;
  if (row_parts > 1) row_parts = (int64_t(plans[0].outputs.size()) + part_rows - 1) / part_rows;
  const int64_t NR = span_panels * nr;
  // The joint second stage's dot products run over the union of the plans' stage-2 channels
  // (zeros where a plan does not read one): per gated-on element they cost 1 / joint_density
  // times a plan's own, so the per-plan GEMMs win from joint_density times the usual fraction
  // on (block-diagonal CG, p = 4: 3/4. Measured, ResNet-20's 16-channel 32x32 layers, 1
  // thread: the two forms break even at ~45-50% on, where the threshold said 60%).
  double joint_density = 1.0;
  if (joint_second && !joint_second->chans2.empty() && all_rows > 0) {
    double used = 0.0;
    for (const auto& plan : plans) used += double(plan.outputs.size()) * double(plan.chans2.size());
    joint_density = used / (double(all_rows) * double(joint_second->chans2.size()));
  }
  // Tasks: each span's plans in `parts` contiguous groups (GatedTaskParts), or its one plan's
  // rows in `parts` ranges (RowParts), task i = part i / spans of span i % spans (part-major: at the same time the threads work on different
  // spans, not on the same span's channel-last rows).
  const int64_t spans = (src1.columns + NR - 1) / NR;
  const SplitSpans split_setting = SplitSpansSetting();
  const bool pool_may_help = split_setting == SplitSpans::kAlways ||
      (split_setting == SplitSpans::kAuto && ctx && record &&
       record->pool_helped.load(std::memory_order_relaxed));
  // (Of the plan splits, only the joint stage's channel-last form runs on part of a plan's
  // rows; row parts take the place of the plan split.)
  const bool row_split = row_parts > 1;
  const size_t parts = row_split ? size_t(row_parts)
                       : pool_may_help && (!joint_second || !joint_second->w2_taps.empty())
                           ? GatedTaskParts(plans.size(), spans) : 1;
  if (row_split) row_part_calls.fetch_add(1, std::memory_order_relaxed);
  else if (parts > 1) split_span_calls.fetch_add(1, std::memory_order_relaxed);
  std::atomic<int64_t> gates_on{0};  // summed over the tasks, for the record
  const size_t tasks = size_t(spans) * parts;
  const auto span_task = [&](size_t task) {
    const uint64_t span_clock = StageClockNow();
    const size_t span = task % size_t(spans), part = task / size_t(spans);
    // part k: plans k * n / parts .. (k + 1) * n / parts - 1 (no per-call tables: a vector
    // allocation per call is a measurable share of these small layers' set-up)
    // (Row parts: the one plan's rows part * part_rows ..., at most part_rows of them.)
    const size_t plan_begin = row_split ? 0 : part * plans.size() / parts;
    const size_t plan_end = row_split ? 1 : (part + 1) * plans.size() / parts;
    const int64_t row_begin = row_split ? int64_t(part) * part_rows : 0;
    const int64_t q0 = int64_t(span) * NR, ncols = std::min<int64_t>(NR, src1.columns - q0);
    const int64_t computed_cols = RoundUp(ncols, int64_t(nr));  // what a GEMM over the span computes
    uint8_t valid[kMaxSpanColumns];  // column is an output pixel (indirect panels skip
                                     // the padding columns)
    int32_t base[kMaxSpanColumns];  // channel-last pixel index of column t (fill_base)
    // The span's runs of consecutive output pixels (columns run_at[r] .. + run_len[r], output
    // pixels from run_pix[r]): where the store copies to y, the same for every plan. Found
    // row segment by row segment (a span crosses a few output rows), not column by column: the
    // per-column loop with its branches took 2.4-2.6 us of a 16-channel 32x32 ResNet-20 CG
    // layer's ~40 (G2D_STAGE_TIMES "span", now 0.6; before it, with a division and a
    // remainder per column, ~6 us).
    int32_t run_at[kMaxSpanColumns], run_len[kMaxSpanColumns];
    int64_t run_pix[kMaxSpanColumns];
    int nruns = 0;
    const int64_t row_len = src1.indirect ? src1.Wp : g.OW;  // columns per output row
    const int64_t first_oh = q0 / row_len;  // the span's output rows: first_oh .. oh
    const int64_t oh = (q0 + NR) / row_len;
    std::memset(valid, 0, size_t(NR));
    if (fill_base) std::memset(base, 0, sizeof(int32_t) * size_t(NR));
    const int64_t Wpad = g.W + g.pl + g.pr;
    for (int64_t t = 0, row = first_oh, ow = q0 % row_len; t < ncols; t += row_len - ow, ++row, ow = 0) {
      // Columns t .. t + n - 1 are output pixels (row, ow ..); the rest of the row's
      // columns, up to row_len, are an indirect row's padding.
      const int64_t n = std::min(std::max<int64_t>(g.OW - ow, 0), ncols - t);
      if (n <= 0) continue;
      std::memset(valid + t, 1, size_t(n));
      if (fill_base) {
        const int64_t b0 = row * g.sh * Wpad + ow * g.sw;
        for (int64_t i = 0; i < n; ++i) base[t + i] = int32_t(b0 + i * g.sw);
      }
      const int64_t p0 = row * g.OW + ow;
      if (nruns > 0 && run_at[nruns - 1] + run_len[nruns - 1] == t &&
          run_pix[nruns - 1] + run_len[nruns - 1] == p0) {
        run_len[nruns - 1] += int32_t(n);  // contiguous rows (no padding columns) join
      } else {
        run_at[nruns] = int32_t(t);
        run_pix[nruns] = p0;
        run_len[nruns++] = int32_t(n);
      }
    }
    AlignedVec<Acc>& tile = Scratch<Acc, 1>();  // panel j's [M_pad, nr] at j * stride
    const int64_t stride = RoundUp(buffer_rows, mr) * nr;
    tile.resize(size_t(stride * (NR / nr)));
    AlignedVec<float>& out_buf = Scratch<float, 14>();
    out_buf.resize(size_t(buffer_rows * NR));
    AlignedVec<uint8_t>& gate_buf = Scratch<uint8_t, 6>();  // gate[m * NR + t]
    gate_buf.resize(size_t(buffer_rows * NR));
    // Raw pointers: thread_local vectors behind byte stores (which may alias anything) would
    // otherwise be re-fetched through __tls_get_addr inside the loops.
    Acc* const acc = tile.data();

    // Stage 2 over rows m0 .. m0 + M - 1 of `plan` (out / gate hold those rows; `on` of them
    // gated on), then the copy to y. plan_index: the plan's index in plans, plans.size() for
    // the joint second stage; force_dense: the GEMM + select whatever the plan's own fraction
    // (the joint stage chose it). Only the joint stage's channel-last form (GatedTaskParts)
    // and a row part's channel-last form and GEMM (RowParts) run on a part of a plan's rows:
    // the other forms take whole plans.
    auto second_stage_and_store = [&](const GatedStagePlan<T>& plan, size_t plan_index,
                                      const ChannelLast& cl, uint8_t* gate, float* out,
                                      int64_t on, bool force_dense, int64_t m0, int64_t M) {
      const bool whole_plan = m0 == 0 && M == int64_t(plan.outputs.size());
      const bool dense_rows = whole_plan || row_split;  // the GEMM may take these rows
      if (on > 0 && !plan.chans2.empty()) {
        const double dense_above =
            DenseSecondStageAbove(!std::is_same<T, float>::value, !plan.w2_taps.empty());
        // The GEMM's cost counts every column it computes (a span's last panel in full), the
        // sparse form's only the gated-on elements.
        const bool dense =
            dense_rows && (force_dense || double(on) > dense_above * double(M * computed_cols));
        CountSecondStage(dense);
        if (dense) {
          const uint64_t dense_clock = StageClockNow();
          // Most gates on: the span's second stage as a GEMM, then select.
          need_src2();
          SpanProduct(isa, plan.w2_is_w1 ? plan.w1 : plan.w2, src2, plan.chans2, off2_of(plan_index), q0, ncols,
                      Scratch<T, 0>(), acc, stride, {m0, m0 + M});
          for (int64_t c0 = 0; c0 < ncols; c0 += nr) {
            const Acc* const acc_rows = acc + (c0 / nr) * stride + m0 * nr;  // row m0's
            if constexpr (std::is_same<Acc, float>::value) {
              // (The baseline build's 4-float form of the loop below was ~10% of a 16-channel
              // 32x32 CG layer's call at 100% on, perf.)
              isa.select_add(acc_rows, M, s2, gate + c0, out + c0, NR);
              continue;
            }
            for (int64_t m = 0; m < M; ++m) {
              float* om = out + m * NR + c0;
              const Acc* am = acc_rows + m * nr;
              const uint8_t* gm = gate + m * NR + c0;
              // A select by bit mask, not a branch: the gates are unpredictable, and the ternary
              // this replaces compiled to a branch here (the file is built for baseline x86-64),
              // which made 60% gated on cost 1.2x as much as 100% (tools/bench_gated_ops.py).
              // Adding +0.f where the gate is off gives the same bits as not adding.
              for (int64_t t = 0; t < nr; ++t) {
                const float v = s2 * float(am[t]);
                uint32_t bits;
                std::memcpy(&bits, &v, sizeof bits);
                bits &= 0u - uint32_t(gm[t]);
                float selected;
                std::memcpy(&selected, &bits, sizeof selected);
                om[t] += selected;
              }
            }
          }
          AddStageTime(kTimeDense2, dense_clock);
        } else if constexpr (std::is_same<T, float>::value) {
          if (!plan.w2_taps.empty()) {
            second_stage_runs[2].fetch_add(1, std::memory_order_relaxed);
            // The padded input rows the span's receptive fields cover (its last output row
            // may be oh or, where the span ended at a row's end, oh - 1: a row more is cheap).
            const uint64_t gather_clock = StageClockNow();  // the channel-last copy: "gather"
            need_channel_last_rows(plan_index, first_oh * g.sh, oh * g.sh + (g.kh - 1) * g.dh);
            AddStageTime(kTimeGather, gather_clock);
            SparseSecondStageTaps(isa, plan.w2_taps, m0, M, cl, base_is_column ? nullptr : base,
                                  q0, ncols, NR, gate, s2, out);
          } else {
            if (!whole_plan) throw OpError("internal: a gathered-fields second stage on part of a plan");
            need_src2();
            SparseSecondStageRows(isa, plan, src2, off2_of(plan_index), q0, ncols, NR, gate, s2, out);
          }
        } else {
          SparseSecondStageDots(isa, plan, src2, off2_of(plan_index), q0, ncols, NR, gate, s2, out);
        }
      }
      // Copy out to y, run by run of consecutive output pixels (runs: found once per span),
      // with the epilogue.
      const uint64_t store_clock = StageClockNow();
      isa.store_runs(out, NR, M, plan.outputs.data() + m0, run_at, run_len, run_pix, nruns,
                     post ? post->scale : nullptr, post ? post->shift : nullptr,
                     post && post->ops.relu, y, Np);
      AddStageTime(kTimeStore, store_clock);
    };

    AlignedVec<int64_t>& group_on = Scratch<int64_t, 31>();  // joint: gates on per plan
    group_on.assign(plans.size(), 0);
    AddStageTime(kTimeSpan, span_clock);
    int64_t row0 = 0, on_all = 0;  // rows of out / gate: the part's plans' from 0
    for (size_t pi = plan_begin; pi < plan_end; ++pi) {
      const GatedStagePlan<T>& plan = plans[pi];
      const std::vector<int64_t>& off1 = offs1[pi];
      const int64_t m0 = row_begin;  // the task's first row (0 but in a row part)
      const float* const row_threshold = thresholds[pi].data() + m0;
      const int64_t M = row_split ? std::min(part_rows, int64_t(plan.outputs.size()) - m0)
                                  : int64_t(plan.outputs.size());
      if (M <= 0) continue;
      uint8_t* const gate = gate_buf.data() + row0 * NR;
      float* const out = out_buf.data() + row0 * NR;
      // Stage 1 and the gate, panel by panel, branch-free.
      int64_t on = 0;
      uint64_t clock = StageClockNow();
      SpanProduct(isa, plan.w1, src1, plan.chans1, off1, q0, ncols, Scratch<T, 0>(), acc, stride,
                  {m0, m0 + M});
      AddStageTime(kTimeStage1, clock);
      clock = StageClockNow();
      for (int64_t c0 = 0; c0 < ncols; c0 += nr) {
        const Acc* acc_panel = acc + (c0 / nr) * stride + m0 * nr;  // row m0's
        if constexpr (std::is_same<Acc, float>::value) {
          on += isa.gate_panel(acc_panel, M, s1, row_threshold, valid + c0, out + c0,
                               gate + c0, NR);
        } else {
          const float scale_1 = s1;  // a local copy: the lambda's captures are references
          const int64_t n_cols = nr;
          for (int64_t m = 0; m < M; ++m) {
            const float t_m = row_threshold[m];
            float* om = out + m * NR + c0;
            uint8_t* gm = gate + m * NR + c0;
            for (int64_t t = 0; t < n_cols; ++t) {
              const float v = scale_1 * float(acc_panel[m * n_cols + t]);
              om[t] = v;
              gm[t] = uint8_t(v > t_m) & valid[c0 + t];
              on += gm[t];
            }
          }
        }
      }
      AddStageTime(kTimeGate, clock);
      if (record) gates_on.fetch_add(on, std::memory_order_relaxed);
      if (joint_second) {
        row0 += M;
        on_all += on;
        group_on[pi] = on;
      } else {
        second_stage_and_store(plan, pi, channel_last[pi], gate, out, on, false, m0, M);
      }
    }
    if (!joint_second) return;
    const int64_t part_rows = row0;  // the part's plans' rows (the loop above counted them)
    int64_t first_row = 0;           // and where they start in the joint stage's rows
    for (size_t pi = 0; pi < plan_begin; ++pi) first_row += int64_t(plans[pi].outputs.size());
    if (double(on_all) > DenseSecondStageAbove(false, !joint_second->w2_taps.empty()) *
                             joint_density * double(part_rows * computed_cols)) {
      // Most gates on: per-plan GEMMs, which skip the joint weights' zeros (all of them: a
      // plan's own sparse form, gathered fields, is slower still).
      row0 = 0;
      for (size_t pi = plan_begin; pi < plan_end; ++pi) {
        const int64_t M = int64_t(plans[pi].outputs.size());
        second_stage_and_store(plans[pi], pi, channel_last[pi], gate_buf.data() + row0 * NR,
                               out_buf.data() + row0 * NR, group_on[pi], true, 0, M);
        row0 += M;
      }
    } else {
      second_stage_and_store(*joint_second, plans.size(), channel_last[plans.size()], gate_buf.data(),
                             out_buf.data(), on_all, false, first_row, part_rows);
    }
  };
  // (Only the large-weight rule reads the thread count: other layers take the cheaper form.)
  const int threads = large_weights ? ParallelForThreads(ctx, tasks, span_task)
                                    : RunOnPool<false>(ctx, tasks, span_task);
  if (record) {
    if (ctx) record->pool_helped.store(threads > 1, std::memory_order_relaxed);
    // (A call of one task runs on the caller whatever the pool: it says nothing of its size.)
    if (large_weights && ctx && tasks > 1)
      record->threads_seen.store(std::max(threads, record->threads_seen.load(std::memory_order_relaxed)),
                                 std::memory_order_relaxed);
    record->gates_on.store(gates_on.load(std::memory_order_relaxed), std::memory_order_relaxed);
  }
  AddStageTime(kTimeCall, call_clock);
}

// Explicit instantiations for the two element types the kernels use.
#define G2D_INSTANTIATE(T)                                                                      \
  template PackedWeights<T> PackWeights<T>(const IsaKernels&, const T*, const ConvGeom&,         \
                                           const std::vector<int>&, const std::vector<int>&);    \
  template WeightRows<T> MakeWeightRows<T>(const IsaKernels&, const T*, const ConvGeom&,         \
                                           const std::vector<int>&, const std::vector<int>&);    \
  template void ConvByPanels<T>(OrtKernelContext*, const IsaKernels&, const PackedWeights<T>&,   \
                                const T*, const ConvGeom&, const std::vector<int>&,             \
                                const RowEpilogue&);                                             \
  template void RunGatedConv<T>(OrtKernelContext*, const IsaKernels&, const ConvGeom&,           \
                                const std::vector<GatedStagePlan<T>>&, const T*, const T*,       \
                                float, float, const float*, float*,                              \
                                const GatedStagePlan<T>*, const PostEpilogue*,                   \
                                GatedCallRecord*);
G2D_INSTANTIATE(float)
G2D_INSTANTIATE(int16_t)
#undef G2D_INSTANTIATE

}  // namespace g2d

// Which kernel paths this process uses and has used, for benchmarks and tests (ctypes):
// the ISA table (G2D_ISA may force a narrower one), whether AMX tiles and ONNX Runtime's
// NCHWc conv may be used, the second-stage setting (G2D_SECOND_STAGE) and the others, and the
// L2 size the large-weight rule plans for (G2D_L2_BYTES or the system's).
extern "C" __attribute__((visibility("default"))) const char* G2DKernelConfig() {
  static thread_local std::string text;  // rebuilt per call: G2DSetSetting may change a setting
  text = [] {
    const char* stage = std::getenv("G2D_SECOND_STAGE");
    const char* ort_conv = std::getenv("G2D_ORT_CONV");
    return std::string("isa=") + g2d::BestKernels().name +
           " amx=" + (g2d::AmxAvailable() ? "yes" : "no") +
           " pg_int8=" + g2d::PGInt8Name(g2d::PGInt8For(g2d::BestKernels())) +
           " ort_nchwc_conv=" + (ort_conv && std::strcmp(ort_conv, "0") == 0 ? "off" : "on") +
           " second_stage=" + (stage && (std::strcmp(stage, "sparse") == 0 || std::strcmp(stage, "dense") == 0) ? stage : "auto") +
           " cg_second=" + (g2d::CGTapSecondStage() ? "taps" : "fields") +
           " split_spans=" + g2d::AutoAlwaysNeverName(int(g2d::SplitSpansSetting())) +
           " cg_pool=" + g2d::AutoAlwaysNeverName(int(g2d::CGPoolSetting())) +
           " row_parts=" + g2d::AutoAlwaysNeverName(int(g2d::RowPartsSetting())) +
           " l2=" + std::to_string(g2d::L2CacheBytes() >> 10) + "KiB";
  }();
  return text.c_str();
}

// Second-stage span tasks run sparse (dense = 0) or as a dense GEMM + select (dense = 1); 2: the
// sparse ones that read channel-last rows (CGConv, isa.sparse_dots).
extern "C" __attribute__((visibility("default"))) int64_t G2DSecondStageRuns(int dense) {
  return g2d::second_stage_runs[dense == 2 ? 2 : dense ? 1 : 0].load(std::memory_order_relaxed);
}

// RunGatedConv calls that ran one span per thread (large weights: kLargeWeightL2Share).
extern "C" __attribute__((visibility("default"))) int64_t G2DLargeWeightSpanCalls() {
  return g2d::large_weight_span_calls.load(std::memory_order_relaxed);
}

// CGConv calls run on the calling thread by the MAC rule (kCGPoolMinMacs, G2D_CG_POOL).
extern "C" __attribute__((visibility("default"))) int64_t G2DSerialCGCalls() {
  return g2d::serial_cg_calls.load(std::memory_order_relaxed);
}

// RunGatedConv calls whose spans ran split by plan (GatedTaskParts, G2D_SPLIT_SPANS).
extern "C" __attribute__((visibility("default"))) int64_t G2DSplitSpanCalls() {
  return g2d::split_span_calls.load(std::memory_order_relaxed);
}

// RunGatedConv calls whose spans ran in row parts (RowParts, G2D_ROW_PARTS).
extern "C" __attribute__((visibility("default"))) int64_t G2DRowPartCalls() {
  return g2d::row_part_calls.load(std::memory_order_relaxed);
}

// Switches a setting read per call, for benchmarks that compare two settings run by run in one
// session (tools/ab_native_setting.py: no process or time between the two to add noise):
// "split_spans" (G2D_SPLIT_SPANS), "cg_pool" (G2D_CG_POOL) and "row_parts" (G2D_ROW_PARTS),
// each "auto" | "always" | "never". Returns 0, or -1 for an unknown name or value (nothing changed).
extern "C" __attribute__((visibility("default"))) int G2DSetSetting(const char* name, const char* value) {
  if (name == nullptr || value == nullptr) return -1;
  std::atomic<int>* setting = std::strcmp(name, "split_spans") == 0 ? &g2d::split_spans_setting
                              : std::strcmp(name, "cg_pool") == 0   ? &g2d::cg_pool_setting
                              : std::strcmp(name, "row_parts") == 0 ? &g2d::row_parts_setting
                                                                    : nullptr;
  const int v = g2d::ParseAutoAlwaysNever(value);
  if (setting == nullptr || v < 0) return -1;
  setting->store(v, std::memory_order_relaxed);
  return 0;
}


// Per-stage cycles since the last reset (G2D_STAGE_TIMES=1), as "name=us_per_call ...":
// `calls` divides the totals; the TSC rate comes from a 20 ms calibration at the first report.
extern "C" __attribute__((visibility("default"))) const char* G2DStageTimesReport(int calls) {
  static const double tsc_per_us = [] {
    const auto t0 = std::chrono::steady_clock::now();
    const uint64_t c0 = __rdtsc();
    while (std::chrono::steady_clock::now() - t0 < std::chrono::milliseconds(20)) {
    }
    const double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
    return double(__rdtsc() - c0) / us;
  }();
  static const char* names[] = {"pad", "stage1", "gate", "lists", "gather", "sparse2",
                                "scatter", "dense2", "store", "call", "span", "setup", "op"};
  static_assert(sizeof(names) / sizeof(names[0]) == g2d::kStageTimers, "a name per StageTimer");
  static thread_local std::string text;
  text.clear();
  for (int i = 0; i < g2d::kStageTimers; ++i) {
    char item[64];
    std::snprintf(item, sizeof item, "%s=%.1f ", names[i],
                  double(g2d::stage_cycles[i].load()) / tsc_per_us / std::max(calls, 1));
    text += item;
  }
  text += "(us per call, summed over threads)";
  return text.c_str();
}
extern "C" __attribute__((visibility("default"))) void G2DStageTimesReset() {
  for (auto& c : g2d::stage_cycles) c.store(0);
}
