// CGConv(X, W, base_mask, threshold) -> Y: Channel Gating (runtimes/OPS.md, reference
// runtimes/reference.py::cg_conv_reference).
//
// Output channels are grouped by their base-path channel set (one group when the base path
// is the first C/p channels, p groups for the block-diagonal variant). Per group and sample:
// stage 1 = conv over the base channels (the partial sum Yp, kept where the gate is off);
// stage 2 = conv over the remaining channels, added only where Yp > threshold[o].
#include <map>

#include "cg_conv.h"
#include "conv_common.h"

namespace g2d {

CGConvKernel::CGConvKernel(const OrtApi*, const OrtKernelInfo* info) {
  attrs_ = ReadConvAttrs(info, &attr_error_);
  relu_ = ReadReluAttr(info, &attr_error_);
  weights_const_ = InputIsConstant(info, 1) && InputIsConstant(info, 2);
}

namespace {
// Groups outputs by identical base channel sets and packs each group's weights.
std::vector<GatedStagePlan<float>> BuildPlans(const float* w, const float* mask, const ConvGeom& g) {
  std::map<std::vector<bool>, size_t> group_of;
  std::vector<GatedStagePlan<float>> plans;
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
    plan.w2_rows = MakeWeightRows(isa, w, g, plan.outputs, plan.chans2);
  }
  return plans;
}
}  // namespace

Ort::Status CGConvKernel::Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& X,
                                  const Ort::Custom::Tensor<float>& W,
                                  const Ort::Custom::Tensor<float>& base_mask,
                                  const Ort::Custom::Tensor<float>& threshold,
                                  OptionalTensor post_scale, OptionalTensor post_shift,
                                  Ort::Custom::Tensor<float>& Y) {
  return Guarded("CGConv", [&] {
    if (!attr_error_.empty()) throw OpError("CGConv: " + attr_error_);
    if (attrs_.group != 1) throw OpError("CGConv: group must be 1 (W is [O, C, kh, kw])");
    const ConvGeom g = MakeGeom("CGConv", X.Shape(), W.Shape(), attrs_);
    ExpectShape("CGConv", "base_mask", base_mask.Shape(), {g.O, g.C});
    ExpectShape("CGConv", "threshold", threshold.Shape(), {g.O});
    const PostEpilogue post = MakePostEpilogue("CGConv", post_scale, post_shift, g.O, relu_);
    const float* mask = base_mask.Data();
    for (int64_t i = 0; i < g.O * g.C; ++i)
      if (mask[i] != 0.f && mask[i] != 1.f)
        throw OpError("CGConv: base_mask must contain only 0 and 1");

    std::shared_ptr<const std::vector<GatedStagePlan<float>>> plans;
    if (weights_const_) {
      std::lock_guard<std::mutex> lock(plans_mutex_);
      if (!cached_plans_)
        cached_plans_ = std::make_shared<const std::vector<GatedStagePlan<float>>>(
            BuildPlans(W.Data(), mask, g));
      plans = cached_plans_;
    } else {
      plans = std::make_shared<const std::vector<GatedStagePlan<float>>>(
          BuildPlans(W.Data(), mask, g));
    }
    const IsaKernels& isa = BestKernels();
    float* y = Y.Allocate({g.N, g.O, g.OH, g.OW});
    for (int64_t n = 0; n < g.N; ++n) {
      const float* xn = X.Data() + n * g.C * g.H * g.W;
      float* yn = y + n * g.O * g.P();
      RunGatedConv(ctx, isa, g, *plans, xn, xn, 1.f, 1.f, threshold.Data(), yn);
    }
    ApplyPostEpilogue(ctx, isa, post, y, g.N, g.O, g.P());
  });
}

}  // namespace g2d
