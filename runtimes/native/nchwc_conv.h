// Dense sub-convolutions delegated to ONNX Runtime's own blocked (NCHWc) convolution.
//
// Why: once a gate has decided which channels take part (FBS: a sample's active outputs and
// inputs; SparseInputConv: the live inputs), what is left is an ordinary dense convolution
// over fewer channels (PG: each of its two integer stages is one, see pg_conv.cc). ONNX Runtime's MLAS runs that best in its NCHWc layout (channels in blocks of 16
// on AVX-512, 8 on AVX2): measured here, 64->64 channels 28x28 3x3 in 0.35 of the dense
// 128->128 time including both layout reorders, where our own im2col-free GEMM needed ~0.47.
// So instead of re-writing MLAS, the kernels call it through the custom-op API's
// "invoke a built-in op" hook (OrtApi::CreateOp / InvokeOp) on the session's thread pool.
//
// The op is `com.microsoft.nchwc:Conv`, an internal op of ONNX Runtime's CPU provider (the
// NCHWc layout transformer emits it). Its operands:
//   X  [1, Cb, H, W] holding channel block b, pixel p, lane l at ((b * H*W) + p) * B + l
//   W  [Ob, Cb, kh, kw] in "OIHWBiBo": for output block ob and input block ib, each tap holds
//      B x B values, input lane major, output lane minor
//   Y  [1, Ob, OH, OW] in the same blocked layout as X
// with Cb, Ob the channel counts padded with zeros to multiples of B. With fewer than B input
// channels (a network's first conv) X is plain NCHW instead and W is "OIHWBo"
// ([Ob/B][C][kh][kw][B]), as ONNX Runtime's NCHWc transformer does for such convs.
//
// Because the layout and block size are internal to ONNX Runtime, the first call checks the
// delegate against a plain direct convolution on a small problem; if it disagrees or the op
// cannot be created (another ONNX Runtime build, a CPU without AVX2), Available() is false and
// callers use their own kernels. The delegate never changes results beyond fp32 summation
// order.
#pragma once

#include <atomic>
#include <mutex>
#include <string>
#include <vector>

#include "conv_common.h"

namespace g2d {

// Channel block of MLAS's NCHWc kernels on this CPU: 16 with AVX-512F, 8 with AVX2+FMA, 0
// when MLAS has no NCHWc kernels here.
int NchwcBlock();

// A filter in OIHWBiBo for output rows `outputs` and input channels `chans` of W (indices
// into W's channel dimension), zero-padded to whole blocks.
struct NchwcFilter {
  int64_t O = 0, C = 0;  // padded counts
  int64_t kh = 0, kw = 0;
  UninitAlignedVec<float> data;
};

// The layout attributes of the ops the layout pass rewrites (runtimes/ort_layout.py):
// `input_block` / `output_block` 0 (NCHW) or the NCHWc block of this CPU (the tensor is then
// [N, C rounded up to the block, H, W], channel c at lane c % B of block c / B). Read by the
// kernel's constructor (errors into *error); CheckLayout refuses another block size (a model
// rewritten on another machine) and a blocked input with an NCHW output (never emitted).
struct LayoutAttrs {
  int64_t input_block = 0, output_block = 0;
};
LayoutAttrs ReadLayoutAttrs(const OrtKernelInfo* info, std::string* error);
void CheckLayout(const char* op, const LayoutAttrs& layout);
// The geometry of a group-1 conv whose X / Y may be blocked: the layout checked, then
// MakeGeom on X as NCHW planes of W's input channels (a blocked X must hold them rounded up to
// whole blocks); x_channels / y_channels: the channel counts X and Y are stored with.
struct LayoutGeom {
  ConvGeom g;
  int64_t x_channels, y_channels;
};
LayoutGeom MakeLayoutGeom(const char* op, const LayoutAttrs& layout,
                          const std::vector<int64_t>& x_shape, const std::vector<int64_t>& w_shape,
                          const ConvAttrs& attrs);

// Layout conversions between NCHW planes and the blocked layout ([ceil(C / B)][HW][B], the
// padding lanes zero), parallel over blocks when large.
// xb = channels at plane offsets offs[0..nc) of x (offs[i] = channel * HW), blocked.
void PlanesToBlocked(OrtKernelContext* ctx, const IsaKernels& isa, const float* x,
                     const int64_t* offs, int64_t nc, int64_t HW, int64_t B, float* xb);
// The C channels of planes[C, HW], blocked.
void AllPlanesToBlocked(OrtKernelContext* ctx, const IsaKernels& isa, const float* planes,
                        int64_t C, int64_t HW, int64_t B, float* xb);
// x itself when block is 0, else its C channels as NCHW planes in `buf` (resized).
const float* AsPlanes(OrtKernelContext* ctx, const IsaKernels& isa, const float* x, int64_t C,
                      int64_t HW, int64_t block, AlignedVec<float>& buf);
// x[C, HW] = the C channels of the blocked xb.
void BlockedToPlanes(OrtKernelContext* ctx, const IsaKernels& isa, const float* xb, int64_t C,
                     int64_t HW, int64_t B, float* x);
// One destination block's lanes gathered from a blocked array: lane l < valid takes its
// element source[l] (-1: none, the lane is zero; the others ascending), i.e. lane source[l] % B
// of block source[l] / B. Fills the blocks read (src_block, at most `valid`) and
// isa.permute_lanes' table idx [nsrc][B]; returns nsrc.
int LaneSources(const int64_t* source, int valid, int64_t B, int64_t* src_block, int32_t* idx);
// dst (blocked, chans.size() channels) = channels `chans` (ascending) of the blocked xb.
void BlockedSubset(OrtKernelContext* ctx, const IsaKernels& isa, const float* xb,
                   const std::vector<int>& chans, int64_t HW, int64_t B, float* dst);

class NchwcConv {
 public:
  // Creates the ORT op with the conv attributes (group must be 1; otherwise unavailable).
  NchwcConv(const OrtKernelInfo* info, const ConvAttrs& attrs);

  // True when the op exists and passed its one-time check (done on the first call, with ctx).
  // The environment variable G2D_ORT_CONV=0 turns delegation off (tests of the own kernels).
  bool Available(OrtKernelContext* ctx) const;
  // Available, and worth it for a conv of `outputs` x `inputs` channels: padding both to
  // whole blocks adds at most a quarter to its MACs (else the own kernels are faster).
  bool Suits(OrtKernelContext* ctx, int64_t outputs, int64_t inputs) const;
  int Block() const { return block_; }
  int64_t Padded(int64_t n) const { return RoundUp(n, block_); }

  // From W itself (OIHW, [O, C, kh, kw]); outputs and chans index its first two dimensions.
  // The storage of `reuse` (may be null) is taken over when given.
  NchwcFilter PackFilter(OrtKernelContext* ctx, const float* w, const ConvGeom& g,
                         const std::vector<int>& outputs, const std::vector<int>& chans,
                         NchwcFilter* reuse = nullptr) const;
  // xb = channels `chans` of the sample x[C, H, W] in the delegate's input form: blocked,
  // Padded(chans.size()) * H * W floats, or NCHW (chans.size() * H * W) below one block.
  void GatherBlocked(OrtKernelContext* ctx, const IsaKernels& isa, const float* x,
                     const ConvGeom& g, const std::vector<int>& chans, float* xb) const;
  // yb[f.O * OH * OW] (blocked) = conv of xb with f, geometry from g (C, O taken from f).
  // With batch > 1, that many samples follow one another in xb (f.C * H * W floats each) and
  // in yb (f.O * OH * OW each): one call of the op, which computes each sample of a batch with
  // the same operations as alone (tests/test_ort_layout.py compares bit for bit).
  void Run(OrtKernelContext* ctx, const ConvGeom& g, const NchwcFilter& f, const float* xb,
           float* yb, int64_t batch = 1) const;

 private:
  bool SelfCheck(OrtKernelContext* ctx) const;
  bool SelfCheckWith(OrtKernelContext* ctx, int64_t channels) const;
  ConvAttrs attrs_;
  int block_ = 0;
  Ort::Op op_{nullptr};
  mutable std::once_flag checked_;
  mutable std::atomic<bool> ok_{false};
};

}  // namespace g2d
