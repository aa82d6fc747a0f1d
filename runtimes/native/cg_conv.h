#pragma once
#include "conv_common.h"
#include <onnxruntime_lite_custom_op.h>

namespace g2d {
struct CGConvKernel {
  CGConvKernel(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<float>& W,
                      const Ort::Custom::Tensor<float>& base_mask,
                      const Ort::Custom::Tensor<float>& threshold, Ort::Custom::Tensor<float>& Y);
  ConvAttrs attrs_;
  std::string attr_error_;
};
}  // namespace g2d
