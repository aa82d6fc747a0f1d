#pragma once
#include "conv_common.h"
#include <onnxruntime_lite_custom_op.h>

namespace g2d {
struct FBSConvKernel {
  FBSConvKernel(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<float>& W, const Ort::Custom::Tensor<float>& fc_W,
                      const Ort::Custom::Tensor<float>& fc_b,
                      const Ort::Custom::Tensor<float>& bn_scale,
                      const Ort::Custom::Tensor<float>& bn_shift,
                      const Ort::Custom::Tensor<float>& beta, Ort::Custom::Tensor<float>& Y);
  ConvAttrs attrs_;
  std::string attr_error_;
  float density_;
  bool max_pool_ = false;
};
}  // namespace g2d
