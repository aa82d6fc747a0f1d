#pragma once
#include "conv_common.h"
#include "pg_amx.h"
#include "pg_int8.h"
#include "subset_conv.h"
#include <onnxruntime_lite_custom_op.h>

#include <atomic>
#include <memory>
#include <mutex>

namespace g2d {
struct PGConvKernel {
  PGConvKernel(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<float>& W,
                      const Ort::Custom::Tensor<float>& threshold,
                      OptionalTensor post_scale, OptionalTensor post_shift,
                      Ort::Custom::Tensor<float>& Y);
  // Both stages into y (every sample), on the first path that applies.
  void RunStages(OrtKernelContext* ctx, const IsaKernels& isa, const ConvGeom& g, const float* x,
                 const float* w_data, const float* thr_data, float* y);
  std::atomic<int> w_finite_{-1};  // W all finite (CheckedOnceIfConstant); -1: not scanned yet
  ConvAttrs attrs_;
  std::string attr_error_;
  PostAttrs post_attrs_;  // the optional epilogue's attributes (OPS.md)
  int64_t abits_, pred_bits_;
  float static_scale_;
  // Integer weights found at session creation when W is a constant initializer.
  bool w_const_ = false, w_int_ = false;
  std::vector<int16_t> w_q_;
  float w_step_ = 1.f;
  // Packed weights, built on the first run when W is constant (one of the two is used).
  std::mutex plans_mutex_;
  std::shared_ptr<const std::vector<GatedStagePlan<int16_t>>> int_plans_;
  std::shared_ptr<const std::vector<GatedStagePlan<float>>> float_plans_;
  // Integer weights as floats (exact), for the stages run as fp32 convs (see pg_conv.cc).
  std::vector<float> w_qf_;
  std::unique_ptr<SubsetConv> conv_;
  // AMX int8 weights (pg_amx.h), packed on the first run when W is constant (null if the
  // layer does not fit that path).
  bool amx_packed_ = false;
  std::shared_ptr<const PGAmxWeights> amx_w_;
  // int8 weights for AVX2 / AVX-512 VNNI (pg_int8.h), likewise.
  bool int8_packed_ = false;
  std::shared_ptr<const PGInt8Weights> int8_w_;
};
}  // namespace g2d
