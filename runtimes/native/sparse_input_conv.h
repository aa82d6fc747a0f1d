#pragma once
#include "subset_conv.h"  // first: conv_common.h sets ORT_API_MANUAL_INIT for the ORT headers
#include <onnxruntime_lite_custom_op.h>

#include <atomic>
#include <memory>

namespace g2d {
struct SparseInputConvKernel {
  SparseInputConvKernel(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<float>& W, const Ort::Custom::Tensor<float>& B,
                      OptionalTensor R, Ort::Custom::Tensor<float>& Y);
  ConvAttrs attrs_;
  std::string attr_error_;
  bool relu_ = false;  // attribute activation = "Relu"
  LayoutAttrs layout_;  // NCHW or blocked X / R / Y (runtimes/ort_layout.py)
  bool w_const_ = false;
  std::atomic<int> w_finite_{-1};  // constant W: all finite (1) or not (0); -1 not scanned
  std::unique_ptr<SubsetConv> conv_;  // all outputs x the sample's non-zero inputs
};
}  // namespace g2d
