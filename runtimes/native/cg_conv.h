#pragma once
#include "conv_common.h"
#include <onnxruntime_lite_custom_op.h>

#include <atomic>
#include <memory>
#include <mutex>

namespace g2d {
// Output channels grouped by their base-path channel set (one group, or p for block-diagonal
// CG), and for several groups a joint second stage over all of them (RunGatedConv).
struct CGPlans {
  std::vector<GatedStagePlan<float>> groups;
  std::unique_ptr<GatedStagePlan<float>> joint_second;  // null: stage 2 per group
};

struct CGConvKernel {
  CGConvKernel(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<float>& W,
                      const Ort::Custom::Tensor<float>& base_mask,
                      const Ort::Custom::Tensor<float>& threshold,
                      OptionalTensor post_scale, OptionalTensor post_shift,
                      Ort::Custom::Tensor<float>& Y);
  // One sample with NaN or inf in X or W, as the reference computes it (see cg_conv.cc).
  void NonFiniteSample(OrtKernelContext* ctx, const IsaKernels& isa, const ConvGeom& g,
                       const float* w, const float* mask, const float* threshold,
                       const float* xn, float* yn);
  std::atomic<int> w_finite_{-1};  // constant W: all finite (1) or not (0); -1 not scanned
  // The last call (RunGatedConv): whether another pool thread ran span tasks, gates on.
  GatedCallRecord last_call_;
  // Whether this call runs on the calling thread (kCGPoolMinMacs, conv_common.h).
  bool OnCallingThread(const ConvGeom& g, const CGPlans& plans) const;
  ConvAttrs attrs_;
  std::string attr_error_;
  PostAttrs post_attrs_;  // the optional epilogue's attributes (OPS.md)
  // W and base_mask constant initializers: plans (packed weights) are built once.
  bool weights_const_ = false;
  std::mutex plans_mutex_;
  std::shared_ptr<const CGPlans> cached_plans_;
};
}  // namespace g2d
