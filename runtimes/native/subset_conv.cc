// See subset_conv.h.
#include "subset_conv.h"

#include <algorithm>
#include <cstring>

namespace g2d {


SubsetConv::SubsetConv(const OrtKernelInfo* info, const ConvAttrs& attrs, bool w_const)
    : w_const_(w_const), nchwc_(info, attrs) {}

std::shared_ptr<const TapMajorWeights> SubsetConv::TapMajorFor(const float* w,
                                                               const ConvGeom& g) {
  if (!w_const_) return std::make_shared<const TapMajorWeights>(MakeTapMajor(w, g));
  std::lock_guard<std::mutex> lock(tap_major_mutex_);
  if (!tap_major_) tap_major_ = std::make_shared<const TapMajorWeights>(MakeTapMajor(w, g));
  return tap_major_;
}

void SubsetConv::Run(OrtKernelContext* ctx, const IsaKernels& isa, const float* w,
                     const float* x, const ConvGeom& g, const std::vector<int>& outputs,
                     const std::vector<int>& chans, const RowEpilogue& ep) {
  const int64_t na = int64_t(outputs.size()), Np = g.P();
  if (na == 0) return;
  if (nchwc_.Suits(ctx, na, int64_t(chans.size()))) {
    const auto wt = TapMajorFor(w, g);
    auto make = [&] { return nchwc_.PackFilter(*wt, g, outputs, chans); };
    const auto f = w_const_ ? filter_cache_.Get(outputs, chans, make)
                            : std::make_shared<const NchwcFilter>(make());
    AlignedVec<float>& xb = Scratch<float, 16>();
    AlignedVec<float>& yb = Scratch<float, 17>();
    xb.resize(size_t(f->C * g.H * g.W));
    yb.resize(size_t(f->O * Np));
    nchwc_.GatherBlocked(ctx, isa, x, g, chans, xb.data());
    nchwc_.Run(ctx, g, *f, xb.data(), yb.data());
    // Back from the blocked layout to the destination rows, then the epilogue on each row.
    const int64_t B = nchwc_.Block();
    ParallelFor(ParallelIfLarge(ctx, na * Np), size_t((na + B - 1) / B), [&](size_t blk) {
      const int64_t a0 = int64_t(blk) * B;
      const int valid = int(std::min<int64_t>(B, na - a0));
      float* rows[64];
      for (int l = 0; l < valid; ++l) rows[l] = ep.y + int64_t(ep.rows[a0 + l]) * ep.ld;
      isa.scatter_lanes(yb.data() + a0 * Np, B, Np, rows, valid);
      for (int l = 0; l < valid; ++l) ep.ApplyInPlace(a0 + l, rows[l], Np);
    });
    return;
  }
  auto make = [&] { return PackWeights(isa, w, g, outputs, chans); };
  const auto packed = w_const_ ? packed_cache_.Get(outputs, chans, make)
                               : std::make_shared<const PackedWeights<float>>(make());
  ConvByPanels(ctx, isa, *packed, x, g, chans, ep);
}

}  // namespace g2d
