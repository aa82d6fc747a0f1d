#pragma once
#include "conv_common.h"  // first: it sets ORT_API_MANUAL_INIT for the ORT headers
#include <onnxruntime_lite_custom_op.h>

namespace g2d {
struct QuantizeActivationKernel {
  QuantizeActivationKernel(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& X,
                      Ort::Custom::Tensor<float>& Y);
  QuantizerAttrs attrs_;
  std::string attr_error_;
};
}  // namespace g2d
