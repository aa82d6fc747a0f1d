#pragma once
#include "conv_common.h"
#include "subset_conv.h"
#include <onnxruntime_lite_custom_op.h>

#include <atomic>
#include <memory>

namespace g2d {
struct FBSConvKernel {
  FBSConvKernel(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<float>& W, const Ort::Custom::Tensor<float>& fc_W,
                      const Ort::Custom::Tensor<float>& fc_b,
                      const Ort::Custom::Tensor<float>& bn_scale,
                      const Ort::Custom::Tensor<float>& bn_shift,
                      const Ort::Custom::Tensor<float>& beta, Ort::Custom::Tensor<float>& Y);
  // Reference semantics for a sample with non-finite values (see Compute).
  void ReferenceSample(OrtKernelContext* ctx, const IsaKernels& isa, const float* w,
                       const float* xn, const ConvGeom& g, const std::vector<float>& gamma,
                       const std::vector<int>& out_active, const float* bn_scale,
                       const float* bn_shift, const float* beta, float* yn);
  // W, and fc_W / fc_b / bn_scale / bn_shift / beta, all finite: scanned once where they are
  // constant initializers (CheckedOnceIfConstant), else on every call.
  std::atomic<int> w_finite_{-1};       // -1: not scanned yet
  std::atomic<int> params_finite_{-1};  // -1: not scanned yet
  bool params_const_ = false;           // inputs 2-6 constant initializers
  ConvAttrs attrs_;
  std::string attr_error_;
  float density_;
  int pool_ = kPoolSum;        // PoolKind (isa_kernels.h): avg = kPoolSum / area
  bool relu_ = true;           // activation "Relu" (default) or "Identity"
  std::vector<int64_t> pool_pads_{0, 0, 0, 0};  // saliency-only zero padding (t, l, b, r)
  bool fixed_threshold_ = false;  // attribute threshold given: active = g > threshold_
  float threshold_ = 0.f;
  LayoutAttrs layout_;    // NCHW or blocked X / Y (runtimes/ort_layout.py)
  bool w_const_ = false;  // W a constant initializer: prepared weights are cached
  std::unique_ptr<SubsetConv> conv_;  // active outputs x active inputs
};
}  // namespace g2d
