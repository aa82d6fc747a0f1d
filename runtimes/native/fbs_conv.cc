// FBSConv(X, W, fc_W, fc_b, bn_scale, bn_shift, beta) -> Y: Feature Boosting and Suppression
// (runtimes/OPS.md, reference runtimes/reference.py::fbs_conv_reference).
//
// Per sample: the saliency g = act(pool(X) @ fc_W^T + fc_b) picks the top-k output channels
// (or those above a fixed threshold);
// the kernel then runs one dense conv (SubsetConv: ONNX Runtime's NCHWc conv or our GEMM)
// over only those output channels and only the input channels that are not entirely zero in
// this sample (a preceding FBS layer zeroes its inactive channels), so the work scales with
// out_density * in_density. Inactive outputs are written as exact zeros.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "fbs_conv.h"

namespace g2d {

namespace {
// sum(a[i] * b[i]) in 16 independent partial sums (a loop the compiler vectorizes; one
// running sum is a chain of dependent adds: ~0.35 ms for a 512 x 512 predictor).
float Dot(const float* a, const float* b, int64_t n) {
  constexpr int kLanes = 16;
  float part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += a[i + l] * b[i + l];
  float sum = 0.f;
  for (; i < n; ++i) sum += a[i] * b[i];
  for (int l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

// "a ranks before b" in descending order with NaN above everything (numpy's and torch's sort
// put NaN last in ascending order): a strict weak order even with NaN, which std::greater is
// not, so nth_element stays defined and the cut is the reference's.
bool RanksBefore(float a, float b) { return a != a ? b == b : a > b; }
}  // namespace

FBSConvKernel::FBSConvKernel(const OrtApi*, const OrtKernelInfo* info) {
  attrs_ = ReadConvAttrs(info, &attr_error_);
  density_ = ReadFloatAttr(info, "density", -1.f, &attr_error_);
  const std::string pool = ReadStringAttr(info, "pool", "avg", &attr_error_);
  const std::string activation = ReadStringAttr(info, "activation", "Relu", &attr_error_);
  pool_pads_ = ReadIntsAttr(info, "pool_pads", {0, 0, 0, 0}, &attr_error_);
  fixed_threshold_ = HasAttr(info, "threshold");
  threshold_ = ReadFloatAttr(info, "threshold", 0.f, &attr_error_);
  pool_ = pool == "max" ? kPoolMax : pool == "l1" ? kPoolAbsSum : pool == "l2" ? kPoolSquareSum : kPoolSum;
  relu_ = activation == "Relu";
  layout_ = ReadLayoutAttrs(info, &attr_error_);
  w_const_ = InputIsConstant(info, 1);
  params_const_ = InputIsConstant(info, 2) && InputIsConstant(info, 3) && InputIsConstant(info, 4) &&
                  InputIsConstant(info, 5) && InputIsConstant(info, 6);
  conv_ = std::make_unique<SubsetConv>(info, attrs_, w_const_);
  const bool pads_ok = pool_pads_.size() == 4 &&
                       std::all_of(pool_pads_.begin(), pool_pads_.end(),
                                   [](int64_t p) { return p >= 0 && p <= kMaxConvAttr; });
  if (!attr_error_.empty()) return;
  if (!HasAttr(info, "density"))
    attr_error_ = "attribute density is required";
  else if (!(density_ > 0.f && density_ <= 1.f))
    attr_error_ = "attribute density must be in (0, 1], got " + std::to_string(density_);
  else if (pool != "avg" && pool != "max" && pool != "l1" && pool != "l2")
    attr_error_ = "attribute pool must be \"avg\", \"max\", \"l1\" or \"l2\", got \"" + pool + "\"";
  else if (activation != "Relu" && activation != "Identity")
    attr_error_ = "attribute activation must be \"Relu\" or \"Identity\", got \"" + activation + "\"";
  else if (!pads_ok)
    attr_error_ = "attribute pool_pads must be 4 ints in [0, " + std::to_string(kMaxConvAttr) +
                  "] (top, left, bottom, right)";
  else if (fixed_threshold_ && !std::isfinite(threshold_))
    attr_error_ = "attribute threshold must be finite, got " + std::to_string(threshold_);
}

void FBSConvKernel::ReferenceSample(OrtKernelContext* ctx, const IsaKernels& isa, const float* w,
                                    const float* xn, const ConvGeom& g,
                                    const std::vector<float>& gamma,
                                    const std::vector<int>& out_active, const float* bn_scale,
                                    const float* bn_shift, const float* beta, float* yn) {
  const int64_t Np = g.P();
  // conv(X, W) for every output channel, into y; then the reference's formula in place.
  DenseConvSample(ctx, isa, w, xn, g, yn);
  std::vector<float> act(size_t(g.O), 0.f);
  for (int o : out_active) act[size_t(o)] = 1.f;
  for (int64_t o = 0; o < g.O; ++o) {
    const float a = act[size_t(o)], ag = a * gamma[size_t(o)], ab = a * beta[o];
    float* yo = yn + o * Np;
    if (relu_)
      for (int64_t p = 0; p < Np; ++p) yo[p] = Relu(ag * (bn_scale[o] * yo[p] + bn_shift[o]) + ab);
    else
      for (int64_t p = 0; p < Np; ++p) yo[p] = ag * (bn_scale[o] * yo[p] + bn_shift[o]) + ab;
  }
}

Ort::Status FBSConvKernel::Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& X,
                                   const Ort::Custom::Tensor<float>& W,
                                   const Ort::Custom::Tensor<float>& fc_W,
                                   const Ort::Custom::Tensor<float>& fc_b,
                                   const Ort::Custom::Tensor<float>& bn_scale,
                                   const Ort::Custom::Tensor<float>& bn_shift,
                                   const Ort::Custom::Tensor<float>& beta,
                                   Ort::Custom::Tensor<float>& Y) {
  return Guarded("FBSConv", [&] {
    if (!attr_error_.empty()) throw OpError("FBSConv: " + attr_error_);
    if (attrs_.group != 1) throw OpError("FBSConv: group must be 1 (W is [O, C, kh, kw])");
    const LayoutGeom lg = MakeLayoutGeom("FBSConv", layout_, X.Shape(), W.Shape(), attrs_);
    const ConvGeom& g = lg.g;
    const int64_t Bi = layout_.input_block, Bo = layout_.output_block;
    const int64_t Cx = lg.x_channels, Oy = lg.y_channels;
    ExpectShape("FBSConv", "fc_W", fc_W.Shape(), {g.O, g.C});
    ExpectShape("FBSConv", "fc_b", fc_b.Shape(), {g.O});
    ExpectShape("FBSConv", "bn_scale", bn_scale.Shape(), {g.O});
    ExpectShape("FBSConv", "bn_shift", bn_shift.Shape(), {g.O});
    ExpectShape("FBSConv", "beta", beta.Shape(), {g.O});
    if (g.H * g.W == 0) throw OpError("FBSConv: X has an empty spatial extent");

    // k = ceil(O * density), density being the float32 attribute, product taken in double.
    const int64_t k = int64_t(std::ceil(double(g.O) * double(density_)));
    const IsaKernels& isa = BestKernels();
    float* y = Y.Allocate({g.N, Oy, g.OH, g.OW});
    const int64_t HW = g.H * g.W, Np = g.P();
    // The saliency pools X zero-padded by pool_pads: the mean divides by the padded area
    // (checked: pads up to 2^31 - 1 each), the max also sees the zeros.
    int64_t pool_h, pool_w, pool_area;
    if (__builtin_add_overflow(g.H, pool_pads_[0] + pool_pads_[2], &pool_h) ||
        __builtin_add_overflow(g.W, pool_pads_[1] + pool_pads_[3], &pool_w) ||
        __builtin_mul_overflow(pool_h, pool_w, &pool_area))
      throw OpError("FBSConv: pool_pads make the pooled area overflow int64");
    const bool pool_padded = pool_area != HW;
    const bool max_pool = pool_ == kPoolMax;
    std::vector<float> pooled(size_t(g.C)), gamma(size_t(g.O)), sorted;
    std::vector<uint8_t> live(size_t(g.C));

    // Non-finite values follow the reference (and the PyTorch module): an inactive channel is
    // 0 * g * (bn_scale * conv + bn_shift) + 0 * beta, which is NaN, not 0, where g or that
    // sum is not finite, and NaN in X or g must reach the top-k as the reference's sort sees
    // it. A sample whose X, saliency or parameters hold a non-finite value is therefore
    // computed as the reference writes it (every output channel convolved, over every input
    // channel: a zero channel times an inf weight is NaN); finite samples take the fast path.
    // (Scanned once where constant: per call, fc_W's scan alone was ~0.6% of FBS ResNet-18's
    // time at density 1, perf, Intel Xeon.)
    const bool params_finite =
        CheckedOnceIfConstant(w_const_, w_finite_,
                              [&] { return AllFinite(W.Data(), g.O * g.Cw * g.kk()); }) &&
        CheckedOnceIfConstant(params_const_, params_finite_, [&] {
          return AllFinite(isa, fc_W.Data(), g.O * g.C) && AllFinite(isa, fc_b.Data(), g.O) &&
                 AllFinite(isa, bn_scale.Data(), g.O) && AllFinite(isa, bn_shift.Data(), g.O) &&
                 AllFinite(isa, beta.Data(), g.O);
        });
    std::vector<uint8_t> channel_finite(size_t(g.C));
    // Consecutive finite samples with every output active that read every input channel in
    // the blocked layout (density 1) run as one batch of the delegate
    // (SubsetConv::InPlaceBlocked), each with its own saliency (kept in batch_gamma).
    InPlaceBatch batch(*conv_, ctx, isa, W.Data(), X.Data(), Cx * HW, g);
    std::vector<float> batch_gamma(Bo ? size_t(g.N * g.O) : 0);

    for (int64_t n = 0; n < g.N; ++n) {
      const float* xn = X.Data() + n * Cx * HW;
      float* yn = y + n * Oy * Np;
      // The sample as NCHW planes, for the paths that read channels one by one (non-finite
      // data): X itself, or converted from the blocked layout once, when first needed.
      const float* planes = Bi ? nullptr : xn;
      auto xplanes = [&]() {
        if (!planes) planes = AsPlanes(ctx, isa, xn, g.C, HW, Bi, Scratch<float, 46>());
        return planes;
      };
      // Saliency, and which input channels carry anything at all (channels switched off
      // upstream are all zero; the scan stops at the first non-zero value of a live channel).
      // An average pool is non-finite iff some value is; a max pool may skip NaN and -inf, so
      // its channels are scanned.
      if (Bi) {  // blocked X: the same figures, a block of channels at a time
        ParallelFor(ParallelIfLarge(ctx, g.C * HW), size_t((g.C + Bi - 1) / Bi), [&](size_t blk) {
          const int64_t c0 = int64_t(blk) * Bi;
          const int valid = int(std::min(Bi, g.C - c0));
          double raw[64];
          uint8_t fin[64];
          isa.block_channel_stats(xn + c0 * HW, HW, int(Bi), valid, pool_, live.data() + c0, raw, fin);
          for (int l = 0; l < valid; ++l) {
            const size_t c = size_t(c0 + l);
            const double r = live[c] ? raw[l] : 0.0;
            pooled[c] = max_pool ? float(r) : float(r / double(pool_area));
            channel_finite[c] = !live[c] || (max_pool ? fin[l] != 0 : std::isfinite(pooled[c]));
          }
        });
      } else {
        ParallelFor(ParallelIfLarge(ctx, g.C * HW), size_t(g.C), [&](size_t c) {
          const float* xc = xn + int64_t(c) * HW;
          live[c] = isa.has_nonzero(xc, HW);
          // Of zeros every pool is 0. A sum of |x| or x * x is non-finite iff some value is or
          // it overflows (then the sample takes the reference path, which is exact anyway).
          const double r = live[c] ? isa.pool_channel(xc, HW, pool_) : 0.0;
          pooled[c] = max_pool ? float(r) : float(r / double(pool_area));
          channel_finite[c] = !live[c] || (max_pool ? AllFinite(isa, xc, HW) : std::isfinite(pooled[c]));
        });
      }
      bool finite = params_finite;
      for (int64_t c = 0; c < g.C && finite; ++c) finite = channel_finite[size_t(c)];
      if (!finite && max_pool) {  // the reference's max: NaN if any value is NaN
        for (int64_t c = 0; c < g.C; ++c) {
          const float* xc = xplanes() + c * HW;
          for (int64_t i = 0; i < HW; ++i)
            if (xc[i] != xc[i]) pooled[size_t(c)] = xc[i];
        }
      }
      if (max_pool && pool_padded)  // the padding's zeros, NaN kept
        for (float& v : pooled) v = Relu(v);
      std::vector<int> in_active;
      for (int64_t c = 0; c < g.C; ++c)
        if (live[size_t(c)]) in_active.push_back(int(c));
      // The predictor, output by output (each output's own dot product, whichever thread: the
      // same bits); split over the pool for the wide layers (512 x 512 is ~40 us on one core).
      ParallelFor(ParallelIfLarge(ctx, g.O * g.C), size_t(g.O), [&](size_t o) {
        const float acc = Dot(pooled.data(), fc_W.Data() + int64_t(o) * g.C, g.C);
        gamma[o] = relu_ ? Relu(acc + fc_b.Data()[o]) : acc + fc_b.Data()[o];
      });
      for (int64_t o = 0; o < g.O; ++o) finite = finite && std::isfinite(gamma[size_t(o)]);
      std::vector<int> out_active;
      if (fixed_threshold_) {  // Mayo's local / global threshold: NaN is never above it
        for (int64_t o = 0; o < g.O; ++o)
          if (gamma[o] > threshold_) out_active.push_back(int(o));
      } else if (k >= g.O) {
        out_active = Indices(g.O);
      } else {
        sorted = gamma;  // (k+1)-th largest = element k of the descending order
        std::nth_element(sorted.begin(), sorted.begin() + k, sorted.end(), RanksBefore);
        const float cut = sorted[k];
        for (int64_t o = 0; o < g.O; ++o)
          if (gamma[o] > cut) out_active.push_back(int(o));
      }
      if (Bo && finite && int64_t(out_active.size()) == g.O &&
          conv_->InPlaceBlocked(ctx, g, Bi, Bo, g.O, in_active)) {
        float* const gain = batch_gamma.data() + n * g.O;
        std::copy(gamma.begin(), gamma.end(), gain);
        BlockedEpilogue eb{yn, Bo, gain, bn_scale.Data(), bn_shift.Data(), beta.Data()};
        eb.relu = relu_;
        batch.Add(n, eb);
        continue;
      }
      batch.Flush();
      if (!finite) {
        if (!Bo) {
          ReferenceSample(ctx, isa, W.Data(), xplanes(), g, gamma, out_active, bn_scale.Data(),
                          bn_shift.Data(), beta.Data(), yn);
          continue;
        }
        AlignedVec<float>& yp = Scratch<float, 47>();
        yp.resize(size_t(g.O * Np));
        ReferenceSample(ctx, isa, W.Data(), xplanes(), g, gamma, out_active, bn_scale.Data(),
                        bn_shift.Data(), beta.Data(), yp.data());
        AllPlanesToBlocked(ctx, isa, yp.data(), g.O, Np, Bo, yn);
        continue;
      }
      if (Bo) {  // blocked Y: the subset conv writes every channel (inactive ones as zeros)
        BlockedEpilogue eb{yn, Bo, gamma.data(), bn_scale.Data(), bn_shift.Data(), beta.Data()};
        eb.relu = relu_;
        conv_->RunBlocked(ctx, isa, W.Data(), xn, Bi, g, out_active, in_active, eb);
        continue;
      }
      // Inactive output channels are exact zeros; active ones are written by the conv below.
      std::vector<int> inactive;
      for (int64_t o = 0, a = 0; o < g.O; ++o) {
        if (a < int64_t(out_active.size()) && out_active[size_t(a)] == o)
          ++a;
        else
          inactive.push_back(int(o));
      }
      ParallelFor(ParallelIfLarge(ctx, int64_t(inactive.size()) * Np), inactive.size(),
                  [&](size_t i) { std::memset(yn + inactive[i] * Np, 0, sizeof(float) * Np); });
      if (out_active.empty()) continue;

      // Only active outputs x active inputs: a dense conv over those channels.
      const size_t na = out_active.size();
      std::vector<float> gain(na), scale(na), shift(na), bias(na);
      for (size_t a = 0; a < na; ++a) {
        const int o = out_active[a];
        gain[a] = gamma[o];
        scale[a] = bn_scale.Data()[o];
        shift[a] = bn_shift.Data()[o];
        bias[a] = beta.Data()[o];
      }
      RowEpilogue ep{out_active.data(), yn, Np, gain.data(), scale.data(), shift.data(),
                     bias.data()};
      ep.relu = relu_;
      conv_->Run(ctx, isa, W.Data(), xn, g, out_active, in_active, ep);
    }
    batch.Flush();
  });
}

}  // namespace g2d
