// CGConv(X, W, base_mask, threshold) -> Y: Channel Gating (runtimes/OPS.md, reference
// runtimes/reference.py::cg_conv_reference).
//
// Output channels are grouped by their base-path channel set (one group when the base path
// is the first C/p channels, p groups for the block-diagonal variant). Per group and sample:
// stage 1 = conv over the base channels (the partial sum Yp, kept where the gate is off);
// stage 2 = conv over the remaining channels, added only where Yp > threshold[o]. With
// several groups, the sparse stage 2 runs once for all of them (RunGatedConv's joint second
// stage; BuildPlans says when).
//
// Stage 2 reads a channel-last copy of the stage-2 channels (TapRows, isa.sparse_dots:
// receptive fields read in place, whole dot products in registers, up to 8 gated-on pixels
// per weight load); G2D_CG_SECOND=fields selects the older gathered-fields form
// (isa.sddmm_chunk). Where the time goes (G2D_STAGE_TIMES=1, 128 ch 28x28 3x3, p = 4, 20% on,
// 1 thread, AVX2 AMD EPYC, 2026-12-04): stage 1 GEMM 714 us, sparse stage 2 718 us (17.3 M
// MACs: ~45% of ONNX Runtime's dense per-MAC rate; the product needs one load per FMA, both
// operands change with each gated-on element), padded and channel-last copies 45 us, gated-on
// lists 52 us, copy to Y 39 us, gate 17 us; the dense conv 2.45 ms. Before (the gathered-fields
// form, per-panel GEMMs, scalar gather and gate packing): stage 1 781, stage 2 2020, gather
// 324, gate 155 us. Layer speed-up vs dense (same machine, 1 thread, min of interleaved runs):
// 0% 2.53x -> 3.0x, 10% 0.84x -> 1.9x, 20% 0.80x -> 1.5-1.55x, 50% 0.59x -> 0.95-0.97x,
// 100% 0.77x -> 0.8x (at 100% both stages are full GEMMs at ~87% of MLAS's rate plus the
// gate: below 1x whatever the sparse form does).
#include <algorithm>
#include <map>

#include "cg_conv.h"
#include "conv_common.h"

namespace g2d {

CGConvKernel::CGConvKernel(const OrtApi*, const OrtKernelInfo* info) {
  attrs_ = ReadConvAttrs(info, &attr_error_);
  post_attrs_ = ReadPostAttrs(info, &attr_error_);
  weights_const_ = InputIsConstant(info, 1) && InputIsConstant(info, 2);
}

namespace {
// Groups outputs by identical base channel sets and packs each group's weights; with several
// groups whose second stages read overlapping channels (block-diagonal: each reads 1 - 1/p of
// them), also the joint second stage over all groups.
CGPlans BuildPlans(const float* w, const float* mask, const ConvGeom& g) {
  std::map<std::vector<bool>, size_t> group_of;
  CGPlans out;
  std::vector<GatedStagePlan<float>>& plans = out.groups;
  for (int64_t o = 0; o < g.O; ++o) {
    std::vector<bool> key(mask + o * g.C, mask + (o + 1) * g.C);
    auto it = group_of.find(key);
    if (it == group_of.end()) {
      it = group_of.emplace(key, plans.size()).first;
      plans.emplace_back();
      for (int64_t c = 0; c < g.C; ++c)
        (key[c] ? plans.back().chans1 : plans.back().chans2).push_back(int(c));
    }
    plans[it->second].outputs.push_back(int(o));
  }
  const IsaKernels& isa = BestKernels();
  for (auto& plan : plans) {  // group == 1: weight channel index == input channel index
    plan.w1 = PackWeights(isa, w, g, plan.outputs, plan.chans1);
    plan.w2 = PackWeights(isa, w, g, plan.outputs, plan.chans2);
  }
  // A joint second stage gathers each span's receptive fields once instead of once per group,
  // at the price of the MACs on the zeros (each group's own base channels). It pays when the
  // groups' stage-2 channel lists add up to at least twice their union (block-diagonal p >= 3;
  // p = 2 gathers the same amount either way and would double the MACs).
  std::vector<bool> in_union(size_t(g.C), false);
  size_t listed = 0;
  for (const auto& plan : plans) {
    listed += plan.chans2.size();
    for (int c : plan.chans2) in_union[size_t(c)] = true;
  }
  const size_t union_size = size_t(std::count(in_union.begin(), in_union.end(), true));
  if (plans.size() > 1 && union_size > 0 && listed >= 2 * union_size) {
    auto joint = std::make_unique<GatedStagePlan<float>>();
    for (const auto& plan : plans)
      joint->outputs.insert(joint->outputs.end(), plan.outputs.begin(), plan.outputs.end());
    for (int64_t c = 0; c < g.C; ++c)
      if (in_union[size_t(c)]) joint->chans2.push_back(int(c));
    std::vector<float> w_rest(w, w + g.O * g.C * g.kk());  // W with each output's base zeroed
    for (int64_t o = 0; o < g.O; ++o)
      for (int64_t c = 0; c < g.C; ++c)
        if (mask[o * g.C + c] != 0.f) std::fill_n(&w_rest[size_t((o * g.C + c) * g.kk())], g.kk(), 0.f);
    if (CGTapSecondStage())
      joint->w2_taps = MakeTapRows(isa, w_rest.data(), g, joint->outputs, joint->chans2);
    else
      joint->w2_rows = MakeWeightRows(isa, w_rest.data(), g, joint->outputs, joint->chans2);
    out.joint_second = std::move(joint);
  }
  // The groups' own sparse second stages: channel-last rows, except beside a joint second
  // stage, where a group's sparse stage runs only in the rare span with most gates on overall
  // but few in that group: the gathered-fields form then, so that no channel-last copy of each
  // group's channels is made on every call for it.
  for (auto& plan : plans) {
    if (CGTapSecondStage() && !out.joint_second)
      plan.w2_taps = MakeTapRows(isa, w, g, plan.outputs, plan.chans2);
    else
      plan.w2_rows = MakeWeightRows(isa, w, g, plan.outputs, plan.chans2);
  }
  return out;
}
}  // namespace

// The seed's formula, element for element: Y = Yf * d + Yp * (1 - d) with Yp = conv(X, W *
// base_mask) over every channel, Yf = conv(X, W), d = Yp > threshold. For finite data this is
// where(d, Yf, Yp), which the two-stage kernel computes without the masked-out channels; with
// NaN or inf in X or W it is NaN wherever Yp or Yf is not finite (0 * inf, 0 * NaN), which
// only the full products give.
void CGConvKernel::NonFiniteSample(OrtKernelContext* ctx, const IsaKernels& isa,
                                   const ConvGeom& g, const float* w, const float* mask,
                                   const float* threshold, const float* xn, float* yn) {
  const int64_t kk = g.kk(), P = g.P();
  std::vector<float> w_base(size_t(g.O * g.C * kk)), yp(size_t(g.O * P));
  for (int64_t oc = 0; oc < g.O * g.C; ++oc)
    for (int64_t t = 0; t < kk; ++t) w_base[size_t(oc * kk + t)] = w[oc * kk + t] * mask[oc];
  DenseConvSample(ctx, isa, w_base.data(), xn, g, yp.data());
  DenseConvSample(ctx, isa, w, xn, g, yn);  // Yf
  for (int64_t o = 0; o < g.O; ++o)
    for (int64_t p = 0; p < P; ++p) {
      const float vp = yp[size_t(o * P + p)], d = vp > threshold[o] ? 1.f : 0.f;
      yn[o * P + p] = yn[o * P + p] * d + vp * (1.f - d);
    }
}

Ort::Status CGConvKernel::Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& X,
                                  const Ort::Custom::Tensor<float>& W,
                                  const Ort::Custom::Tensor<float>& base_mask,
                                  const Ort::Custom::Tensor<float>& threshold,
                                  OptionalTensor post_scale, OptionalTensor post_shift,
                                  Ort::Custom::Tensor<float>& Y) {
  const uint64_t op_clock = StageClockNow();
  Ort::Status status = Guarded("CGConv", [&] {
    if (!attr_error_.empty()) throw OpError("CGConv: " + attr_error_);
    if (attrs_.group != 1) throw OpError("CGConv: group must be 1 (W is [O, C, kh, kw])");
    const ConvGeom g = MakeGeom("CGConv", X.Shape(), W.Shape(), attrs_);
    ExpectShape("CGConv", "base_mask", base_mask.Shape(), {g.O, g.C});
    ExpectShape("CGConv", "threshold", threshold.Shape(), {g.O});
    const PostEpilogue post = MakePostEpilogue("CGConv", post_scale, post_shift, g.O, post_attrs_);
    const float* mask = base_mask.Data();
    auto checked_plans = [&] {  // a constant mask is checked once, with its cached plans
      for (int64_t i = 0; i < g.O * g.C; ++i)
        if (mask[i] != 0.f && mask[i] != 1.f)
          throw OpError("CGConv: base_mask must contain only 0 and 1");
      return std::make_shared<const CGPlans>(BuildPlans(W.Data(), mask, g));
    };
    std::shared_ptr<const CGPlans> plans;
    if (weights_const_) {
      std::lock_guard<std::mutex> lock(plans_mutex_);
      if (!cached_plans_) cached_plans_ = checked_plans();
      plans = cached_plans_;
    } else {
      plans = checked_plans();
    }
    const IsaKernels& isa = BestKernels();
    float* y = Y.Allocate({g.N, g.O, g.OH, g.OW});
    const bool w_finite = CheckedOnceIfConstant(weights_const_, w_finite_,
                                                [&] { return AllFinite(W.Data(), g.O * g.C * g.kk()); });
    // Small layers in a batch: one task per sample (ParallelOverSamples); else each sample's
    // spans in parallel.
    const bool by_sample = ParallelOverSamples(g);
    OrtKernelContext* const pool = !by_sample && OnCallingThread(g, *plans) ? nullptr : ctx;
    OrtKernelContext* inner = by_sample ? nullptr : pool;
    const PostEpilogue channel = post.ChannelPart();
    ParallelFor(by_sample ? ctx : nullptr, size_t(g.N), [&](size_t s) {
      const int64_t n = int64_t(s);
      const float* xn = X.Data() + n * g.C * g.H * g.W;
      float* yn = y + n * g.O * g.P();
      if (w_finite && AllFinite(isa, xn, g.C * g.H * g.W)) {
        RunGatedConv(inner, isa, g, plans->groups, xn, xn, 1.f, 1.f, threshold.Data(), yn,
                     plans->joint_second.get(), &channel, &last_call_);  // with the copy to Y
      } else {
        NonFiniteSample(inner, isa, g, W.Data(), mask, threshold.Data(), xn, yn);
        ApplyPostEpilogue(inner, isa, channel, yn, 1, g.O, g.P());
      }
    });
    ApplyPostEpilogue(pool, isa, post.OutputPart(), y, g.N, g.O, g.P());  // clamp, quantizer
  });
  AddStageTime(kTimeOp, op_clock);
  return status;
}

bool CGConvKernel::OnCallingThread(const ConvGeom& g, const CGPlans& plans) const {
  const CGPool setting = CGPoolSetting();
  if (setting != CGPool::kAuto) return setting == CGPool::kNever;
  const int64_t on = last_call_.gates_on.load(std::memory_order_relaxed);
  if (on < 0) return false;  // first call: the pool, as before the rule
  // Stage 1: each plan's outputs x its base-path channels; stage 2: per gated-on element, the
  // rest of its output's receptive field (the whole layer's MACs less stage 1's, per element).
  const double per_pixel = double(g.kk()) * double(g.P());
  double stage1 = 0.0;
  for (const auto& plan : plans.groups) stage1 += double(plan.outputs.size()) * double(plan.chans1.size()) * per_pixel;
  const double elements = double(g.O) * double(g.P());
  const double whole = double(g.O) * double(g.Cw) * per_pixel;
  const double macs = stage1 + double(on) * (whole - stage1) / std::max(elements, 1.0);
  if (macs >= kCGPoolMinMacs) return false;
  CountSerialCGCall();
  return true;
}

}  // namespace g2d
