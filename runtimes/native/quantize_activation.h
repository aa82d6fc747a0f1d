#pragma once
#include "conv_common.h"  // first: it sets ORT_API_MANUAL_INIT for the ORT headers
#include <onnxruntime_lite_custom_op.h>

namespace g2d {
struct QuantizeActivationKernel {
  QuantizeActivationKernel(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& X,
                      Ort::Custom::Tensor<float>& Y);
  float levels_ = 0.f, scale_ = 0.f, eps_ = 1e-7f;
  std::string attr_error_;
};
}  // namespace g2d
