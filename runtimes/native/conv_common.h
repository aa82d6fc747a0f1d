// Shared machinery of the gated convolution kernels: attribute parsing and validation,
// convolution geometry, weight packing, the panel-wise convolution (GEMM micro-kernels fed
// either in place from a zero-padded copy of the input for fp32 (split into phase planes at
// strides 2-4), or from packed im2col panels otherwise), and the "gated two-stage convolution"
// that CGConv and PGConv are both made of:
//
//   acc1 = W1 * X1                 (always: CG's base channels, PG's MSB activations)
//   Y    = scale1 * acc1
//   gate = Y > threshold[o]        (per output element)
//   Y   += gate * scale2 * (W2 * X2)  only where gate is on
//                                  (CG's remaining channels, PG's LSB activations)
//
// Work is split by spans of one or a few column panels of output pixels (the GEMM's nr
// columns); one parallel section per sample covers every plan (output group) of the layer.
// Per span, the second stage is a sampled dense-dense product (fp32): the span's receptive
// fields are gathered once ([columns, K] rows), each output row's weights are held in
// registers a K-chunk at a time, and that row's gated-on pixels stream past them
// (isa.sddmm_chunk). CG's plans (w2_taps) instead read a channel-last copy of the stage-2
// channels made once per call: a gated-on pixel's receptive field is kh runs of kw * C2
// contiguous floats, read in place (no gather), and each output row's weights stream past up
// to eight of its gated-on pixels at a time with the whole dot product in registers
// (isa.sparse_dots). int16 (PG) computes one dot product per gated-on element instead. Above
// kDenseSecondStageFraction of the span's elements on, a dense GEMM + select over the span
// is cheaper and is used instead.
//
// Errors: validation throws OpError; each op's Compute catches it (and std::bad_alloc) and
// returns an ONNX Runtime error status, so a bad model never takes the process down.
#pragma once

#define ORT_API_MANUAL_INIT
#include <onnxruntime_cxx_api.h>
#include <onnxruntime_lite_custom_op.h>
#undef ORT_API_MANUAL_INIT

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <new>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "isa_kernels.h"

namespace g2d {

struct OpError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// 64-byte aligned storage: vector loads from a 64-byte aligned base never split a cache
// line (plain std::vector memory is only 16-byte aligned, and the split-load penalty then
// varies from run to run with where malloc happened to put the buffer).
template <class T>
struct AlignedAllocator {
  using value_type = T;
  AlignedAllocator() = default;
  template <class U> AlignedAllocator(const AlignedAllocator<U>&) {}
  T* allocate(size_t n) {
    void* p = ::operator new(n * sizeof(T), std::align_val_t(64));
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <class U> bool operator==(const AlignedAllocator<U>&) const { return true; }
  template <class U> bool operator!=(const AlignedAllocator<U>&) const { return false; }
};
template <class T> using AlignedVec = std::vector<T, AlignedAllocator<T>>;

// The same storage, but resize() leaves new elements uninitialized (default-init): for
// buffers that are about to be overwritten in full (no zero-fill pass over megabytes).
template <class T>
struct UninitAlignedAllocator : AlignedAllocator<T> {
  using value_type = T;
  template <class U> struct rebind { using other = UninitAlignedAllocator<U>; };
  UninitAlignedAllocator() = default;
  template <class U> UninitAlignedAllocator(const UninitAlignedAllocator<U>&) {}
  template <class U> void construct(U* p) noexcept { ::new (static_cast<void*>(p)) U; }
  template <class U, class... Args> void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
template <class T> using UninitAlignedVec = std::vector<T, UninitAlignedAllocator<T>>;

// Above this fraction of gated-on output elements (per panel) the second stage runs as a
// dense GEMM + select. fp32 uses the sampled dense-dense product (weights chunk in registers,
// gated-on pixels streamed from L1); int16 (PG) still uses per-element dot products, which
// stream a weight row from L2 per element (~1/8 of the GEMM's per-MAC speed).
// Measured with tools/bench_gated_ops.py (128 ch, 28x28, 3x3, p=4, 2 threads).
constexpr double kDenseSecondStageFraction = 0.50;
constexpr double kDenseSecondStageFractionInt16 = 0.10;
// CG's channel-last sparse form (TapRows) stays ahead of the GEMM + select up to ~60% on
// (measured, 128 ch 28x28, 1 thread: 0.94x / 0.96x dense at 50% on and 0.81x / 0.87x at 60%
// with the switch at 0.5 / 0.6; at 70% the GEMM wins). The fractions count a span's gated-on
// elements against every element the GEMM would compute (its last panel in full); a joint
// second stage scales its fraction by its weights' density (RunGatedConv).
constexpr double kDenseSecondStageFractionTaps = 0.60;
// The fraction actually used: the constants above, or with G2D_SECOND_STAGE=sparse (never
// dense) / =dense (always dense) one path forced, so that tests and benchmarks can run each
// path on any machine (both compute the same function; see RunGatedConv).
double DenseSecondStageAbove(bool int16, bool taps = false);
// Span tasks (a span, or one plan of a split few-span layer: GatedTaskParts) whose second stage
// ran sparse (0) / dense (1) since load (G2DSecondStageRuns).
void CountSecondStage(bool dense);
// CGConv's sparse second stage on channel-last rows (TapRows, isa.sparse_dots): true unless
// G2D_CG_SECOND=fields asks for the gathered-fields form (isa.sddmm_chunk), so that tests and
// benchmarks can run either (same function).
bool CGTapSecondStage();

// Where a gated convolution's time goes, per stage (G2D_STAGE_TIMES=1; off by default, then
// one predictable branch per stage): TSC cycles summed over all threads, read through
// G2DStageTimesReport (tools and the per-stage breakdown in cg_conv.cc's header comment).
// "gather": the sparse second stage's input (CG: the channel-last copy; the gathered-fields
// form: its fields); "span": each span's bookkeeping (valid columns, store runs). In
// RunGatedConv "pad" is the padded copies of the sample alone, "setup" the rest of its work
// before the span tasks (channel lists, offsets, thresholds, the channel-last layout) and
// "call" all of it; "op" is CGConv's whole Compute (its checks of shapes, weights and X, the
// output's allocation), so op - call is CGConv's own cost per call outside the convolution.
enum StageTimer {
  kTimePad, kTimeStage1, kTimeGate, kTimeLists, kTimeGather, kTimeSparse, kTimeScatter,
  kTimeDense2, kTimeStore, kTimeCall, kTimeSpan, kTimeSetup, kTimeOp, kStageTimers
};
bool StageTimesOn();
uint64_t StageClockNow();  // TSC, or 0 when the timers are off
void AddStageTime(StageTimer which, uint64_t since);  // adds now - since (timers on only)
void AddStageCycles(StageTimer which, uint64_t cycles);  // adds cycles summed by the caller

// The second stage runs over spans of this many panels (of TileCols columns) when the layer
// has at least kWideSpanMinPanels panels: its sparse form has a fixed cost per output row and
// K chunk (the row's weight chunk loaded into registers), shared among the row's gated-on
// columns of the span. Measured (tools/bench_gated_ops.py --ops cg, 128 ch 28x28, p = 4): 2
// panels 1.20x / 1.01x / 0.91x dense at 10 / 20 / 30% on, against 1.05x / 0.94x / 0.85x
// with 1; 4 panels lost at 30% and above (the span's fields no longer fit L1). Small layers
// keep 1-panel tasks: fewer, wider tasks left one of the two threads idle (ResNet-20 CG).
constexpr int kSecondStagePanels = 2;
constexpr int64_t kWideSpanMinPanels = 24;
// The channel-last sparse second stage (TapRows) reads no gathered fields, so its spans can
// be wider (its cost per output row and span, a call and a stream of the row's weights, is
// shared among more gated-on columns). Measured (128 ch 28x28, 20% on, 1 thread): 4 and 8
// panels alike. But a large layer needs enough spans to share among threads (the spans'
// gate-on counts differ): half as wide when 4-panel spans would be fewer than
// kTapSpanMinSpans and each holds at least kTapSpanSplitMacs dense multiply-adds. On AVX-512
// (32-column panels) 128 ch 28x28 had 7 spans, 4 + 3 at 2 threads; in 14 spans it ran 1.03x
// faster at 10 and 20% on (medians of seven runs at 2 threads, 0.94-1.10x: AMD EPYC Zen 4,
// tools/bench_gated_ops.py --ops cg), 0.97-1.02x at 1 thread. Small layers keep the width: a
// 16 channel 32x32 layer (9 spans of 0.26 M multiply-adds) ran 0.93-0.95x at 1 thread in 17
// (tools/bench_network_layers.py); 64 ch 56x56 has 26 spans (narrower: 0.97-0.99x at 1
// thread, 0.99-1.02x at 2).
constexpr int kTapSpanPanels = 4;
constexpr int64_t kTapSpanMinSpans = 12;
constexpr double kTapSpanSplitMacs = double(1 << 22);
// Layers with fewer than kFewGatedSpans spans (ResNet-20's 64-channel 8x8 CG layers: 3
// one-panel spans) split each span's plans (block-diagonal CG: p output groups, one joint
// second stage) into one task per plan, where the pool has other threads: with 3 tasks on 2
// threads one thread ran two spans, the other one. Not at 1 thread, where the split only costs
// (~3% of such a layer: per-task set-up, and each plan's dense-or-sparse choice made on its own
// gates); RunGatedConv's record (GatedCallRecord) says whether another thread ran tasks the last time.
// G2D_SPLIT_SPANS=always splits them whatever the pool (tests: the split's numerics at any
// thread count), =never never does. Measured (CG ResNet-20, batch 1, AMD EPYC Zen 4, one
// session, split and unsplit alternating run by run): the network 1.011-1.031x as fast at 2
// threads (six runs, ~5 / 20 / 50% on), 0.999-1.001x at 1; an 8x8 layer alone 1.02-1.15x at 2
// threads (0.97x at 1 before the split followed the pool). Splitting the 9-span 16x16 and 32x32
// layers in two as well lost 0-13% per layer at 2 threads.
constexpr int64_t kFewGatedSpans = 4;
enum class SplitSpans { kAuto, kAlways, kNever };
SplitSpans SplitSpansSetting();  // G2D_SPLIT_SPANS; G2DSetSetting("split_spans", ...) switches it
inline size_t GatedTaskParts(size_t plans, int64_t spans) {
  return plans >= 2 && spans > 0 && spans < kFewGatedSpans ? plans : 1;
}
// (Measured, 128 ch 28x28, 20% on: cutting the channels into blocks whose input band fits in
// L1 made the product slower, 1.21-1.24x dense against 1.40x unblocked: the calls and the
// scatter-adds per block cost more than the L2 reads they save.)

struct ConvAttrs {
  std::vector<int64_t> strides{1, 1}, pads{0, 0, 0, 0}, dilations{1, 1};
  int64_t group = 1;
  std::vector<int64_t> kernel_shape;  // optional (ONNX Conv's); if given, must equal W's kh, kw
};

// Attribute validation. Every attribute a kernel reads is checked for its type (an attribute
// present with another type, e.g. `group` given as a float, is an error, not "absent") and its
// range; the conv attributes are bounded by kMaxConvAttr so that the geometry arithmetic below
// cannot overflow, and auto_pad (not part of the ops' schema) is refused rather than ignored.
// Attribute NAMES cannot be checked here: ONNX Runtime's C API (OrtKernelInfo, which the lite
// custom-op API wraps) can read an attribute by name but cannot list a node's attributes, so
// an unknown or misspelt name is invisible to the kernel. runtimes/ort.py
// (check_custom_op_attributes) validates every gate2deploy node against its ONNX schema
// (gate2deploy/opdefs.py) before a session is created; the kernels validate what they read.
// Errors are recorded in *error (kernel constructors must not throw; the first error wins)
// and reported by Compute as ORT_INVALID_ARGUMENT.
constexpr int64_t kMaxConvAttr = (int64_t(1) << 31) - 1;
// Reads strides/pads/dilations/group/kernel_shape (ONNX Conv defaults) and refuses auto_pad.
ConvAttrs ReadConvAttrs(const OrtKernelInfo* info, std::string* error);
int64_t ReadIntAttr(const OrtKernelInfo* info, const char* name, int64_t dflt, std::string* error);
float ReadFloatAttr(const OrtKernelInfo* info, const char* name, float dflt, std::string* error);
std::string ReadStringAttr(const OrtKernelInfo* info, const char* name, const std::string& dflt,
                           std::string* error);
std::vector<int64_t> ReadIntsAttr(const OrtKernelInfo* info, const char* name,
                                  const std::vector<int64_t>& dflt, std::string* error);
// True if the node has an attribute `name` of any type the kernels know (int, float, string,
// ints, floats).
bool HasAttr(const OrtKernelInfo* info, const char* name);

struct ConvGeom {
  int64_t N, C, H, W;      // input
  int64_t O, Cw, kh, kw;   // weight [O, Cw = C / group, kh, kw]
  int64_t sh, sw, pt, pl, pb, pr, dh, dw, group;
  int64_t OH, OW;
  int64_t kk() const { return kh * kw; }
  int64_t P() const { return OH * OW; }
  // Every field but the batch N equal: tables built for one layer shape serve the other.
  bool SameLayer(const ConvGeom& o) const {
    return C == o.C && H == o.H && W == o.W && O == o.O && Cw == o.Cw && kh == o.kh &&
           kw == o.kw && sh == o.sh && sw == o.sw && pt == o.pt && pl == o.pl && pb == o.pb &&
           pr == o.pr && dh == o.dh && dw == o.dw && group == o.group && OH == o.OH && OW == o.OW;
  }
};

// Largest number of elements of any buffer a kernel allocates for one call (the output, the
// zero-padded input copy): 2^31 floats (8 GiB). Larger layers are refused with an error
// (absurd pads or dilations would otherwise ask for terabytes).
constexpr int64_t kMaxBufferElements = int64_t(1) << 31;

// Validates ranks, channel counts and attributes; throws OpError naming `op`. All geometry
// arithmetic is overflow-checked (an overflow or a layer over the limits is an OpError).
ConvGeom MakeGeom(const char* op, const std::vector<int64_t>& x_shape,
                  const std::vector<int64_t>& w_shape, const ConvAttrs& attrs);
// a * b (non-negative) as the size of a buffer `what`: an OpError naming `op` on int64
// overflow or above kMaxBufferElements (MakeGeom's checks, for a kernel's own buffers).
int64_t BufferElements(const char* op, const char* what, int64_t a, int64_t b);
void ExpectShape(const char* op, const char* what, const std::vector<int64_t>& shape,
                 const std::vector<int64_t>& expected);

// Runs fn(i) for i in [0, total) on the session's intra-op thread pool (serially where ctx is
// null). If fn throws, the first exception is rethrown on the caller after every task ran.
// Returns whether a thread other than the caller ran any of the tasks (false for a pool of one
// thread, the caller's).
bool ParallelFor(OrtKernelContext* ctx, size_t total, const std::function<void(size_t)>& fn);
// ParallelFor returning how many threads ran its tasks (1: the caller alone; 0 for no task).
// ONNX Runtime does not tell a custom op its pool's size; a call with more tasks than threads
// shows it, unless a worker is too late to take any task.
int ParallelForThreads(OrtKernelContext* ctx, size_t total, const std::function<void(size_t)>& fn);

// The size of the core's L2 cache in bytes (sysconf; 2 MiB where the system does not say).
int64_t L2CacheBytes();

// Memory-bound helper loops (layout copies, pooling, zero-filling) touching fewer values than
// this run serially: waking a pool thread costs more than it saves (measured: FBSConv at
// 128 ch 28x28 got slower with its gather and scatter parallel; at 64 ch 56x56 and on the
// 224x224 stem, serial copies were a third of the layer's time).
constexpr int64_t kParallelCopyMin = int64_t(1) << 17;
inline OrtKernelContext* ParallelIfLarge(OrtKernelContext* ctx, int64_t values) {
  return values >= kParallelCopyMin ? ctx : nullptr;
}

// Batches of small layers run one sample per task, each sample's stages serially on one
// thread, instead of one parallel section per sample over its spans: a small layer's
// section costs about as much to start and join as it saves, and each sample's data stays on
// one core. Measured: CG ResNet-20 (layers of 2.4 M multiply-adds per sample), batch 8,
// 2 threads, 20% gated on: 1.47x faster than per-sample sections (AMD EPYC Zen 4, spinning
// off, tools/bench_gated_ops.py --networks cg). Larger layers keep their spans in parallel:
// with more threads than samples, per-sample tasks would leave threads idle.
constexpr double kSampleParallelMaxMacs = double(1 << 24);
inline bool ParallelOverSamples(const ConvGeom& g) {
  return g.N >= 2 &&
         double(g.O) * double(g.Cw) * double(g.kk()) * double(g.P()) <= kSampleParallelMaxMacs;
}

// Wraps a kernel body: OpError -> ORT_INVALID_ARGUMENT, anything else -> ORT_RUNTIME_EXCEPTION.
Ort::Status Guarded(const char* op, const std::function<void()>& body);

// Elements per packed k step: float packs single k, int16 packs k pairs (vpdpwssd/pmaddwd).
template <class T> constexpr int PairOf() { return sizeof(T) == 2 ? 2 : 1; }
inline int64_t RoundUp(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
// 0, 1, ..., n - 1: "every channel" as a channel list.
inline std::vector<int> Indices(int64_t n) {
  std::vector<int> v(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) v[size_t(i)] = int(i);
  return v;
}

// Micro-tile sizes of the GEMM for element type T.
template <class T> int TileRows(const IsaKernels& k);
template <class T> int TileCols(const IsaKernels& k);

// Packed weights of one GEMM: rows `outputs` of W[O, Cw, kh, kw], restricted to the input
// channels `chans` (indices into Cw), laid out for the micro-kernel (see isa_kernels.h).
template <class T>
struct PackedWeights {
  int64_t M = 0, K = 0, Kp = 0;
  AlignedVec<T> data;
};
template <class T>
PackedWeights<T> PackWeights(const IsaKernels& isa, const T* w, const ConvGeom& g,
                             const std::vector<int>& outputs, const std::vector<int>& chans);

// Weight rows of the sparse second stage: [M, Lpad], zero-padded. fp32 (sampled dense-dense
// product, isa.sddmm_chunk): K is cut into equal chunks of `chunk` floats (a whole number of
// vectors, at most isa.sddmm_max_vecs), Lpad = chunks * chunk. int16 (per-element dot
// products): Lpad = K rounded up to 32, one chunk.
template <class T>
struct WeightRows {
  int64_t M = 0, K = 0, Lpad = 0, chunk = 0;
  AlignedVec<T> data;
};
template <class T>
WeightRows<T> MakeWeightRows(const IsaKernels& isa, const T* w, const ConvGeom& g,
                             const std::vector<int>& outputs, const std::vector<int>& chans);

// Stage-2 weight rows for the channel-last sparse second stage (fp32; isa.sparse_dots):
// [M, kk, Cs], row m's tap t holding W[outputs[m], chans[i], t] at i, zeros from chans.size()
// to Cs = chans.size() rounded up to the vector width.
struct TapRows {
  int64_t M = 0, Cs = 0, kk = 0;
  AlignedVec<float> data;
  bool empty() const { return data.empty(); }
};
TapRows MakeTapRows(const IsaKernels& isa, const float* w, const ConvGeom& g,
                    const std::vector<int>& outputs, const std::vector<int>& chans);

template <class T> struct ConvAcc { using type = float; };
template <> struct ConvAcc<int16_t> { using type = int32_t; };

// Where ConvByPanels / SubsetConv write row m of the product acc (one sample's [M, P]):
//   y[rows[m] * ld + p] = act(gain[m] * (scale[m] * acc[m, p] + shift[m]) + bias[m] + r)
// with act = ReLU if `relu`, else identity, and r = residual[rows[m] * ld + p] if `residual`
// is set, else nothing added (FBS's epilogue; a plain conv's bias with gain = scale = 1,
// shift = 0; SparseInputConv's fused residual Add + ReLU), applied while the panel is in
// cache: no intermediate [M, P] buffer.
struct RowEpilogue {
  const int* rows;
  float* y;
  int64_t ld;
  const float *gain, *scale, *shift, *bias;
  bool relu = true;
  const float* residual = nullptr;  // same layout as y
  // Applies the epilogue to n accumulators of row m already stored at v (pixels p0 ..
  // p0 + n - 1 of the row): isa.epilogue_row, the one vectorized implementation.
  void ApplyToRun(const IsaKernels& isa, int64_t m, float* v, int64_t p0, int64_t n) const {
    const float* r = residual ? residual + int64_t(rows[m]) * ld + p0 : nullptr;
    isa.epilogue_row(v, n, gain[m], scale[m], shift[m], bias[m], r, relu);
  }
};

// Conv of one sample x[C, H, W] over input channels `chans` (only those are read or copied),
// with the packed weights: im2col and GEMM fused per column panel of output pixels, one
// parallel section, results written through `ep`.
template <class T>
void ConvByPanels(OrtKernelContext* ctx, const IsaKernels& isa, const PackedWeights<T>& w,
                  const T* x, const ConvGeom& g, const std::vector<int>& chans,
                  const RowEpilogue& ep);

// y[o, :] = conv(x, w)[o, :] for every output o of one sample x[C, H, W] (y is its [O, P]),
// over every input channel and tap, groups included: a plain dense conv on our GEMM. The
// kernels' path for data with NaN or inf, where the fast paths' shortcuts (a stage or channel
// skipped because its weights or inputs are zero, padding taps not multiplied) would lose the
// reference's NaN from 0 * inf.
void DenseConvSample(OrtKernelContext* ctx, const IsaKernels& isa, const float* w, const float* x,
                     const ConvGeom& g, float* y);

// True if every x[i] is finite (a loop the compiler vectorizes: no early exit).
inline bool AllFinite(const float* x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, x + i, 4);
    bad |= uint32_t((bits & 0x7f800000u) == 0x7f800000u);
  }
  return bad == 0;
}

// The same with the ISA's vectors (abs_max: NaN-sticky, +inf for an inf), for the per-call
// checks of an input: the loop above, built for baseline x86-64 (4 floats per step), took ~3
// us of a 16-channel 32x32 CG layer's ~60 (perf).
inline bool AllFinite(const IsaKernels& isa, const float* x, int64_t n) {
  return std::isfinite(isa.abs_max(x, n));
}

// check() for inputs that are constant initializers is run once and its answer kept in
// `known` (-1: not run yet, 0 / 1); for inputs fed at run time, on every call. The kernels'
// scans of their weights and parameters for NaN / inf.
template <class Check>
bool CheckedOnceIfConstant(bool constant, std::atomic<int>& known, Check&& check) {
  if (!constant) return check();
  int v = known.load(std::memory_order_acquire);
  if (v < 0) {
    v = check() ? 1 : 0;
    known.store(v, std::memory_order_release);
  }
  return v == 1;
}

// One output group of a gated two-stage convolution (see the top of this file).
template <class T>
struct GatedStagePlan {
  std::vector<int> outputs;       // output channels computed by this plan
  std::vector<int> chans1, chans2;  // input channels read by stage 1 / stage 2
  PackedWeights<T> w1, w2;        // stage weights for the GEMM
  bool w2_is_w1 = false;          // PG: both stages use the same weights (w2 left empty,
                                  // so the packed weights are in cache once, not twice)
  WeightRows<T> w2_rows;          // stage-2 weight rows for the sparse second stage
  // fp32 only, optional (CG builds it): the sparse second stage reads a channel-last copy of
  // the stage-2 channels with these rows (isa.sparse_dots) instead of gathering receptive
  // fields for isa.sddmm_chunk (w2_rows is then unused).
  TapRows w2_taps;
};

// The seed's activation quantizer's attributes (OPS.md, QuantizeActivation): `levels`
// (finite, >= 1; 0 here: none), `scale` (finite, >= 0; 0: dynamic, max |Y| over the whole
// tensor + eps), `eps` (finite, >= 0). Read by the QuantizeActivation kernel (names without a
// prefix) and by CGConv / PGConv as their fused epilogue's last step ("quantize_" prefix).
struct QuantizerAttrs {
  float levels = 0.f, scale = 0.f, eps = 1e-7f;
  bool Active() const { return levels > 0.f; }
};
// `required`: levels must be present (QuantizeActivation); else absent levels = no quantizer,
// and a scale or eps without levels is an error.
QuantizerAttrs ReadQuantizerAttrs(const OrtKernelInfo* info, const std::string& prefix,
                                  bool required, std::string* error);
// max over per-part maxima of |x| (isa.abs_max of each part), NaN if any part is NaN: the
// dynamic scale's maximum, exact in any partition.
float CombineAbsMax(const std::vector<float>& parts);

// The epilogue's attributes: activation ("Relu" or absent), clip_max (absent: no clamp; not
// NaN), quantize_levels / quantize_scale / quantize_eps (ReadQuantizerAttrs). Read once per node.
struct PostAttrs {
  bool relu = false;
  bool clip = false;
  float clip_max = 0.f;
  QuantizerAttrs quantize;
};

// CGConv / PGConv's optional epilogue (OPS.md), in this order: y[n, o, :] <- act(scale[o] * y +
// shift[o]), act = ReLU if relu (the channel part: a fused BatchNormalization + Relu); then
// y <- min(y, clip_max) (a fused Min: PACT's clamp); then the seed's activation quantizer over
// the whole output (a fused QuantizeActivation: the next quantized conv's input). Applied
// after the op's gated computation (the gate is decided before it): the channel part by
// RunGatedConv's copy to Y where it is given one (isa.store_runs), else in a pass over Y
// (ApplyPostEpilogue, isa.epilogue_row; both round alike); the output part always by
// ApplyPostEpilogue, after every sample (the quantizer's dynamic scale spans the batch).
struct PostEpilogue {
  const float* scale = nullptr;  // with shift; both null: no affine part
  const float* shift = nullptr;
  PostAttrs ops;                 // relu, clamp, quantizer
  bool ChannelActive() const { return scale != nullptr || ops.relu; }
  bool Active() const { return ChannelActive() || ops.clip || ops.quantize.Active(); }
  PostEpilogue ChannelPart() const {
    PostEpilogue p;
    p.scale = scale, p.shift = shift, p.ops.relu = ops.relu;
    return p;
  }
  PostEpilogue OutputPart() const {
    PostEpilogue p;
    p.ops = ops;
    p.ops.relu = false;
    return p;
  }
};

PostAttrs ReadPostAttrs(const OrtKernelInfo* info, std::string* error);

// Computes y[o, :] for o in every plan's outputs of one sample (y points at the sample's
// [O, P]); stage sums are multiplied by scale1 / scale2 (PG's integer-to-float factors; 1 for
// CG). All plans share one padded copy of the input and one parallel section. With
// `joint_second` (fp32 only), a span's sparse second stage runs once for all plans with that
// plan's weight rows (its outputs: every plan's, in plan order; its chans2 and w2_rows: their
// union, zero where a plan's stage 2 does not read a channel), instead of once per plan:
// block-diagonal CG's p plans each read a different 1 - 1/p of the channels, and gathering
// those fields p times per span cost more than the zeros' extra MACs (16 ch 32x32, p = 4,
// 10-40% on: 1.3x faster). Spans with most gates on still run per-plan GEMMs.
// (Measured: CG's stage 1 on ONNX Runtime's NCHWc conv, fed back into these panels, was
// slower than computing it in-panel: 1.49x vs 2.0x dense at 0% on, 128 ch 28x28, p = 4.)
// `post` (if non-null): the op's epilogue, applied as the outputs are copied to y.
// `record` (if non-null): the kernel's record of its last call, which RunGatedConv updates:
// whether a thread other than the caller ran any span task (with a ctx; a few-span layer's
// spans are split by plan, GatedTaskParts, only where one did) and how many gates were on;
// for a layer under the large-weight rule (kLargeWeightL2Share), the most threads seen running
// one call's span tasks and its calls.
struct GatedCallRecord {
  std::atomic<bool> pool_helped{true};  // first assumed
  std::atomic<int64_t> gates_on{-1};    // -1: no call yet
  std::atomic<int> threads_seen{0};     // 0: no call with two or more tasks yet
  std::atomic<int64_t> calls{0};
};
// Layers whose weights outgrow the core's L2 (more than kLargeWeightL2Share of it: 256 ch
// 14x14 has 2.4 MB, 512 ch 7x7 9.4 MB) with the channel-last second stage: every span task
// reads all the layer's weights (stage 1's panels, then the tap rows), from L3 once they no
// longer fit in L2, so such a layer runs one span per thread (as many spans as the most
// threads seen running one call's tasks, GatedCallRecord::threads_seen), each as wide as the
// columns allow, instead of the default narrow spans (1 or 2-4 panels). Measured (Intel Xeon
// with AMX, 2 MB L2, p = 4, `tools/bench_gated_ops.py --ops cg --channels C --size S
// --baseline-library <the build before>`, 10-50% on): 256 ch 14x14 1.25-1.48x faster at 1
// thread (one span against 7), 1.13-1.32x at 2 (two against 7); 512 ch 7x7 1.09-1.22x at 1
// thread (one span against 2; at 2 threads the default's two already). One-off runs of the
// whole-image span on smaller layers, 1 thread, 20% on: 192 ch 14x14 (1.3 MB) 1.19x, 160 ch
// 14x14 (0.9 MB) 0.88x, 128 ch 28x28 (0.6 MB) 0.95x: hence half the L2. A pool that seemed
// to have one thread is tried with two spans every kLargeWeightProbeCalls calls (a worker
// that was asleep in the first calls shows up there).
constexpr double kLargeWeightL2Share = 0.5;
constexpr int64_t kLargeWeightProbeCalls = 64;
// Such a layer whose whole map fits in fewer full-width spans than there are threads (256 ch
// 14x14, 512 ch 7x7: one span of 224 or 63 columns) gave each thread a span anyway, and each
// thread read all the weights: two threads streamed them twice, and the sparse second stage,
// which reads them once per gated-on row, got slower with the second thread (AMD EPYC Zen 4,
// 1 MB L2, 512 ch 7x7 at 20% on: 1.5x dense at 1 thread, 0.6-1.1x at 2). It runs in row
// parts instead: one task per span and range of the plan's output rows (a multiple of the
// GEMM's tile rows), each computing stage 1, the gate, the second stage and the store of its
// rows only, so each thread reads its share of the weights. The same operations per output
// element as a span of all rows (stage 1's row panels and the dot products are per row): the
// same bits as the same spans unsplit (G2D_ROW_PARTS=never). Against one span per thread the
// sum order may differ where the sparse form runs: it takes a row's gated-on pixels of a span
// in groups of eight, which a wider span groups differently (the span widths followed the
// thread count before, too). Only for one plan without a joint second stage (the
// ImageNet-shaped layers; the block-diagonal ones split by plan, GatedTaskParts) and the
// indirect fp32 panels. G2D_ROW_PARTS=always splits every layer that qualifies so in at least
// two, large weights or not (tests: the numerics at any thread count), =never never splits;
// G2DSetSetting("row_parts", ...) switches it.
enum class RowParts { kAuto, kAlways, kNever };
RowParts RowPartsSetting();
// The widest span's columns (its fixed-size arrays): 8 AVX-512 panels. The default spans
// (panels of at most 64 columns) fit whatever the tier.
constexpr int64_t kMaxSpanColumns = 256;
static_assert(kTapSpanPanels * 64 <= kMaxSpanColumns && kSecondStagePanels * 64 <= kMaxSpanColumns,
              "a default span must fit the span arrays");
template <class T>
void RunGatedConv(OrtKernelContext* ctx, const IsaKernels& isa, const ConvGeom& g,
                  const std::vector<GatedStagePlan<T>>& plans, const T* x1, const T* x2,
                  float scale1, float scale2, const float* threshold, float* y,
                  const GatedStagePlan<T>* joint_second = nullptr,
                  const PostEpilogue* post = nullptr, GatedCallRecord* record = nullptr);

// A CG call whose expected multiply-adds (stage 1, plus the last call's gated-on elements
// times their second-stage MACs) are below kCGPoolMinMacs runs on the calling thread: its
// parallel sections (padded copy, channel-last rows, spans, epilogue) cost more to start and
// join than a second thread saves. Measured (Intel Xeon with AMX, 2 threads, ResNet-20's nine
// CG layers, tools/ab_native_setting.py --setting cg_pool=always,never --layer N, one session
// switched run by run): at 0.3% on (0.3-0.6 M MACs) one thread was 1.07-1.38x faster on every
// layer; at 20% on the stride-2 layers (~0.56 M) 1.02-1.11x, the 16-channel 32x32 ones (~0.8 M)
// 0.95-1.01x; at 90% on (1.1-2.2 M) 0.88-1.10x. G2D_CG_POOL=always|never forces one way
// (tests; G2DSetSetting("cg_pool", ...) switches it between runs); G2DSerialCGCalls counts the
// calls the rule kept on one thread.
constexpr double kCGPoolMinMacs = 0.7e6;
enum class CGPool { kAuto, kAlways, kNever };
CGPool CGPoolSetting();
void CountSerialCGCall();


// max(v, 0) that keeps NaN, as ONNX Relu, np.maximum and torch.relu (the kernels' scalar
// epilogues; the ISA tables have their own vector forms).
inline float Relu(float v) { return v < 0.f ? 0.f : v; }

// Reads the "activation" attribute ("Relu" or absent); a bad value goes to *error.
bool ReadReluAttr(const OrtKernelInfo* info, std::string* error);
// An optional input of a lite custom op, as ONNX Runtime passes it; OptionalInput gives its
// tensor, or null when the node leaves the input out.
using OptionalTensor = std::optional<const Ort::Custom::Tensor<float>*>;
inline const Ort::Custom::Tensor<float>* OptionalInput(const OptionalTensor& t) {
  return t.has_value() ? *t : nullptr;
}
// Validates the optional post_scale / post_shift inputs ([O] each, both or neither).
PostEpilogue MakePostEpilogue(const char* op, const OptionalTensor& post_scale,
                              const OptionalTensor& post_shift, int64_t O, const PostAttrs& attrs);
// The epilogue over y [N, O, P]: the channel part and the clamp row by row (with each row's
// max |y| when the quantizer's scale is dynamic), then the quantizer.
void ApplyPostEpilogue(OrtKernelContext* ctx, const IsaKernels& isa, const PostEpilogue& post,
                       float* y, int64_t N, int64_t O, int64_t P);

// Scratch buffers that live as long as the calling thread: re-used across runs so that the
// large buffers are not page-faulted in again on every call. `Slot` separates uses; a slot
// must not be shared by two buffers alive at once (in use: 0-2, 4-8, 12-14, 31-32 conv_common.cc;
// 10-11, 15, 21-22 pg_conv.cc; 16-20 subset_conv.cc; 23-29 pg_amx.cc; 40-45 pg_int8.cc;
// 46-47 fbs_conv.cc; 48-50 sparse_input_conv.cc; 51-52 stream_conv.cc).
template <class T, int Slot>
AlignedVec<T>& Scratch() {
  static thread_local AlignedVec<T> buffer;
  return buffer;
}

// True if input `index` of the node is a constant initializer (weights can be prepared once).
bool InputIsConstant(const OrtKernelInfo* info, size_t index);

}  // namespace g2d
