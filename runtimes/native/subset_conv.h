// A dense convolution over a subset of W's output rows and input channels: what is left of a
// gated layer once its gate has decided (FBS: a sample's active outputs and its non-zero
// inputs; SparseInputConv: every output, the non-zero inputs).
//
// Runs on ONNX Runtime's NCHWc conv where that suits (whole channel blocks, nchwc_conv.h),
// else on our own GEMM (ConvByPanels). Either way the weights for a subset pair are prepared
// (packed from W) and, when W is a constant initializer, kept for the next run with the same
// subsets. With real inputs FBS's active sets change from run to run, so packing is on the
// per-run path: it reads only the weights the subsets need, and when nearly every input is
// live all inputs are used so that the key does not change. Results go through a RowEpilogue.
#pragma once

#include <memory>
#include <mutex>
#include <vector>

#include "conv_common.h"
#include "nchwc_conv.h"

namespace g2d {

// The value last prepared for one (outputs, inputs) subset pair. make(V* reuse) builds a new
// value (every call when `keep` is false: W is not constant, nothing may be kept); `reuse` is
// the value it replaces when nobody else holds it any more (else null), so
// that its storage can be taken over: a fresh multi-megabyte buffer per run (FBS repacks on
// every run whose active sets changed) is mapped and page-faulted in by the OS each time,
// which measured more than the conv itself on ResNet-18's last layers.
template <class V>
class LastSubsetCache {
 public:
  template <class Make>
  std::shared_ptr<const V> Get(bool keep, const std::vector<int>& out, const std::vector<int>& in,
                               Make make) {
    if (!keep) return std::make_shared<const V>(make(nullptr));
    std::lock_guard<std::mutex> lock(mu_);
    if (!HoldsUnlocked(out, in)) {
      std::shared_ptr<V> old = std::move(value_);
      value_ = std::make_shared<V>(make(old && old.use_count() == 1 ? old.get() : nullptr));
      out_ = out;
      in_ = in;
    }
    return value_;
  }
  // True if the value kept is the one of (out, in): Get would not make a new one.
  bool Holds(const std::vector<int>& out, const std::vector<int>& in) {
    std::lock_guard<std::mutex> lock(mu_);
    return HoldsUnlocked(out, in);
  }

 private:
  bool HoldsUnlocked(const std::vector<int>& out, const std::vector<int>& in) const {
    return value_ && out == out_ && in == in_;
  }
  std::mutex mu_;
  std::vector<int> out_, in_;
  std::shared_ptr<V> value_;  // handed out as shared_ptr<const V>
};

// Where RunBlocked writes: y in ONNX Runtime's NCHWc layout ([ceil(O / B)][P][B], B the
// delegate's block), every channel: the active outputs through the RowEpilogue's formula with
// per-channel parameters (gain[o] * (scale[o] * acc + shift[o]) + bias[o] (+ the residual),
// ReLU if relu), the other outputs and the padding lanes exact zeros.
struct BlockedEpilogue {
  float* y;
  int64_t B;
  const float *gain, *scale, *shift, *bias;  // [O], by output channel
  const float* residual = nullptr;           // y's layout and shape, or null
  bool relu = false;
};

class SubsetConv {
 public:
  // Above this fraction of live input channels, all inputs are read (see Run).
  static constexpr double kReadAllInputsAbove = 0.75;

  // attrs.group must be 1; w_const: W is a constant initializer (prepared weights cached).
  SubsetConv(const OrtKernelInfo* info, const ConvAttrs& attrs, bool w_const);

  // True if Run would use ONNX Runtime's NCHWc conv for this many outputs and inputs.
  bool Delegates(OrtKernelContext* ctx, int64_t outputs, int64_t inputs) const {
    return nchwc_.Suits(ctx, outputs, inputs);
  }

  // For one sample x[C, H, W]: row a of the product of W[outputs, chans] and x[chans] is
  // written through ep as row a (ep.rows[a] is its destination row). chans may be empty (the
  // product is then zero).
  void Run(OrtKernelContext* ctx, const IsaKernels& isa, const float* w, const float* x,
           const ConvGeom& g, const std::vector<int>& outputs, const std::vector<int>& chans,
           const RowEpilogue& ep);
  // The same for the layout pass (runtimes/ort_layout.py): x is the sample's NCHW planes
  // (x_block 0) or its blocked tensor (x_block = the block, C padded to whole blocks), the
  // result is the blocked `ep.y`. Nothing is converted on the way when x is blocked, every
  // input channel is read and every output computed (FBS at density 1, SparseInputConv):
  // the delegate reads x and writes y in place.
  void RunBlocked(OrtKernelContext* ctx, const IsaKernels& isa, const float* w, const float* x,
                  int64_t x_block, const ConvGeom& g, const std::vector<int>& outputs,
                  const std::vector<int>& chans, const BlockedEpilogue& ep);
  // True if RunBlocked of `na` outputs and live inputs `chans` is that in-place form: every
  // output (na == O) from every input channel, x blocked with the delegate's block B (ep.B).
  // Such samples need not run one by one: RunBlockedSamples runs consecutive ones in one
  // delegate call (why: at batch 8 and 2 threads, the per-sample calls of FBS ResNet-18 at
  // density 1 ran at 0.80x its twin's batched convs, tools/bench_gated_ops.py --networks fbs).
  bool InPlaceBlocked(OrtKernelContext* ctx, const ConvGeom& g, int64_t x_block, int64_t B,
                      int64_t na, const std::vector<int>& chans) const;
  // RunBlocked's in-place form for `samples` consecutive samples: x the first one's blocked
  // input, eps[0].y its blocked output, the others following at whole samples of x and y
  // (RoundUp(C, B) and RoundUp(O, B) channels); eps[i]: sample i's epilogue (its y unused
  // for i > 0). The same operations as RunBlocked sample by sample.
  void RunBlockedSamples(OrtKernelContext* ctx, const IsaKernels& isa, const float* w,
                         const float* x, const ConvGeom& g, int64_t samples,
                         const BlockedEpilogue* eps);

 private:
  // The input channels a subset conv reads: `chans`, or every channel when nearly all are
  // live (kReadAllInputsAbove; `all` holds them then).
  static const std::vector<int>& InputsToRead(const ConvGeom& g, const std::vector<int>& chans,
                                              std::vector<int>* all);
  // Whether InputsToRead gives every channel (chans unique: all C of them, or nearly all).
  static bool ReadsAllInputs(const ConvGeom& g, const std::vector<int>& chans);
  // The prepared weights of (outputs, in), cached when W is constant: the delegate's filter,
  // our GEMM's packing.
  std::shared_ptr<const NchwcFilter> Filter(OrtKernelContext* ctx, const float* w,
                                            const ConvGeom& g, const std::vector<int>& outputs,
                                            const std::vector<int>& in);
  std::shared_ptr<const PackedWeights<float>> Packed(const IsaKernels& isa, const float* w,
                                                     const ConvGeom& g,
                                                     const std::vector<int>& outputs,
                                                     const std::vector<int>& in);
  // Every output of `samples` consecutive samples (xin and eps[0].y the first one's, the
  // others following at whole samples of f's inputs and outputs): the delegate writes y with
  // f (every output, channel o at o), then each sample's epilogue eps[i] in place.
  void RunInPlace(OrtKernelContext* ctx, const IsaKernels& isa, const ConvGeom& g,
                  const NchwcFilter& f, const float* xin, int64_t samples,
                  const BlockedEpilogue* eps) const;
  // Whether this run computes every output from every input on the whole layer's filter
  // (packed once) instead of the (outputs, in) subset: W constant and finite, the subset's
  // filter not the one kept (it would be packed on this run) and not the subset of the run
  // before (a repeated subset is packed and kept), and the extra MACs cheaper than that pack
  // by the cost model in subset_conv.cc. Exact for the same reason as reading every
  // input (InputsToRead): the inputs outside `chans` are all zero (the callers pass the
  // non-zero ones), and the extra outputs are dropped.
  bool UseWhole(OrtKernelContext* ctx, const float* w, const ConvGeom& g,
                const std::vector<int>& outputs, const std::vector<int>& in);
  std::shared_ptr<const NchwcFilter> WholeFilter(OrtKernelContext* ctx, const float* w,
                                                 const ConvGeom& g);
  // The delegate's input for channels `in` of NCHW planes x: x itself when it already is that
  // form (every channel, in order, fewer than a block), else gathered into Scratch slot 16.
  const float* DelegateInput(OrtKernelContext* ctx, const IsaKernels& isa, const float* x,
                             const ConvGeom& g, const std::vector<int>& in,
                             const NchwcFilter& f) const;

  bool w_const_;
  NchwcConv nchwc_;
  LastSubsetCache<PackedWeights<float>> packed_cache_;
  LastSubsetCache<NchwcFilter> filter_cache_;
  std::once_flag whole_once_;
  std::shared_ptr<const NchwcFilter> whole_filter_;
  std::vector<int> whole_inputs_;  // 0 .. C - 1, the inputs it reads; set with whole_filter_
  bool w_finite_ = false;          // set with whole_filter_
  std::mutex last_mu_;  // the subset UseWhole was last asked about
  std::vector<int> last_out_, last_in_;
};

// Consecutive samples of RunBlocked's in-place form (SubsetConv::InPlaceBlocked), gathered as
// a caller meets them and run as one call (RunBlockedSamples) by Flush: the caller flushes
// before it runs any other sample's conv and after its last sample.
class InPlaceBatch {
 public:
  // x: the batch's blocked input, x_sample floats per sample.
  InPlaceBatch(SubsetConv& conv, OrtKernelContext* ctx, const IsaKernels& isa, const float* w,
               const float* x, int64_t x_sample, const ConvGeom& g)
      : conv_(conv), ctx_(ctx), isa_(isa), w_(w), x_(x), x_sample_(x_sample), g_(g) {}
  // Sample n, the one after the last added (ep's parameter arrays valid until Flush).
  void Add(int64_t n, const BlockedEpilogue& ep) {
    if (eps_.empty()) first_ = n;
    eps_.push_back(ep);
  }
  void Flush() {
    if (eps_.empty()) return;
    conv_.RunBlockedSamples(ctx_, isa_, w_, x_ + first_ * x_sample_, g_, int64_t(eps_.size()), eps_.data());
    eps_.clear();
  }

 private:
  SubsetConv& conv_;
  OrtKernelContext* ctx_;
  const IsaKernels& isa_;
  const float* w_;
  const float* x_;
  int64_t x_sample_;
  const ConvGeom& g_;
  int64_t first_ = 0;
  std::vector<BlockedEpilogue> eps_;
};

}  // namespace g2d
