// See subset_conv.h.
#include "subset_conv.h"

#include <algorithm>
#include <cstring>

namespace g2d {


SubsetConv::SubsetConv(const OrtKernelInfo* info, const ConvAttrs& attrs, bool w_const)
    : w_const_(w_const), nchwc_(info, attrs) {}

void SubsetConv::Run(OrtKernelContext* ctx, const IsaKernels& isa, const float* w,
                     const float* x, const ConvGeom& g, const std::vector<int>& outputs,
                     const std::vector<int>& chans, const RowEpilogue& ep) {
  const int64_t na = int64_t(outputs.size()), Np = g.P();
  if (na == 0) return;
  // Nearly every input live: read them all (zero channels add exact zeros). Skipping the few
  // dead ones would save little and key the prepared weights on a set that changes from input
  // to input (measured: FBS ResNet-18 at density 1 with input-dependent saliency ran at half
  // speed, repacking every layer's weights on every run).
  const bool read_all = double(chans.size()) > kReadAllInputsAbove * double(g.C) &&
                        int64_t(chans.size()) < g.C && g.group == 1;
  const std::vector<int> all_chans = read_all ? Indices(g.C) : std::vector<int>();
  const std::vector<int>& in = read_all ? all_chans : chans;
  if (nchwc_.Suits(ctx, na, int64_t(in.size()))) {
    const auto f = filter_cache_.Get(w_const_, outputs, in, [&](NchwcFilter* reuse) {
      return nchwc_.PackFilter(ctx, w, g, outputs, in, reuse);
    });
    AlignedVec<float>& yb = Scratch<float, 17>();
    yb.resize(size_t(f->O * Np));
    // Below one block the delegate reads plain NCHW: with every channel, in order, that is x
    // itself, and the copy is skipped (a network's RGB stem: 224x224x3 copied per call).
    bool x_as_is = int64_t(in.size()) == g.C && g.C < nchwc_.Block();
    for (size_t c = 0; x_as_is && c < in.size(); ++c) x_as_is = in[c] == int(c);
    const float* xin = x;
    if (!x_as_is) {
      AlignedVec<float>& xb = Scratch<float, 16>();
      xb.resize(size_t(f->C * g.H * g.W));
      nchwc_.GatherBlocked(ctx, isa, x, g, in, xb.data());
      xin = xb.data();
    }
    nchwc_.Run(ctx, g, *f, xin, yb.data());
    // Back from the blocked layout to the destination rows, then the epilogue on each row,
    // chunk by chunk of pixels: a block's rows of one chunk (16 x kChunk floats) are still in
    // L1 when the epilogue reads them back, where whole rows (ResNet-18's stem: 12544 pixels)
    // had left it.
    const int64_t B = nchwc_.Block();
    constexpr int64_t kChunk = 512;
    ParallelFor(ParallelIfLarge(ctx, na * Np), size_t((na + B - 1) / B), [&](size_t blk) {
      const int64_t a0 = int64_t(blk) * B;
      const int valid = int(std::min<int64_t>(B, na - a0));
      float* rows[64];
      for (int l = 0; l < valid; ++l) rows[l] = ep.y + int64_t(ep.rows[a0 + l]) * ep.ld;
      float* at[64];
      for (int64_t p0 = 0; p0 < Np; p0 += kChunk) {
        const int64_t n = std::min(kChunk, Np - p0);
        for (int l = 0; l < valid; ++l) at[l] = rows[l] + p0;
        isa.scatter_lanes(yb.data() + a0 * Np + p0 * B, B, n, at, valid);
        for (int l = 0; l < valid; ++l) ep.ApplyToRun(isa, a0 + l, at[l], p0, n);
      }
    });
    return;
  }
  const auto packed = packed_cache_.Get(w_const_, outputs, in, [&](PackedWeights<float>*) {
    return PackWeights(isa, w, g, outputs, in);
  });
  ConvByPanels(ctx, isa, *packed, x, g, in, ep);
}

}  // namespace g2d
