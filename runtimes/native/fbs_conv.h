#pragma once
#include "conv_common.h"
#include "subset_conv.h"
#include <onnxruntime_lite_custom_op.h>

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
  ConvAttrs attrs_;
  std::string attr_error_;
  float density_;
  bool max_pool_ = false;
  bool w_const_ = false;  // W a constant initializer: prepared weights are cached
  std::unique_ptr<SubsetConv> conv_;  // active outputs x active inputs
};
}  // namespace g2d
