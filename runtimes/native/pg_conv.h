#pragma once
#include "conv_common.h"
#include <onnxruntime_lite_custom_op.h>

namespace g2d {
struct PGConvKernel {
  PGConvKernel(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<float>& W,
                      const Ort::Custom::Tensor<float>& threshold, Ort::Custom::Tensor<float>& Y);
  ConvAttrs attrs_;
  std::string attr_error_;
  int64_t abits_, pred_bits_;
  float static_scale_;
  // Integer weights found at session creation when W is a constant initializer.
  bool w_const_ = false, w_int_ = false;
  std::vector<int16_t> w_q_;
  float w_step_ = 1.f;
};
}  // namespace g2d
