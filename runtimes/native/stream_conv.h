#pragma once
#include "conv_common.h"  // first: it sets ORT_API_MANUAL_INIT for the ORT headers
#include <onnxruntime_lite_custom_op.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace g2d {

// W packed for isa.stream_block: for group g, output block b (vw channels of the group, the
// last one padded with zero lanes) and k = c * kk + t, the vw weights at
// ((g * blocks + b) * K + k) * vw.
struct StreamWeights {
  int vw = 0;
  int64_t blocks = 0, K = 0;
  // Zero tails: live[g * blocks + b] = 1 + the last input channel of group g (0..C/group-1)
  // with a nonzero weight in block b (0: the block's weights are all zero); the kernels read
  // only the channels below it. sensAI's fused layers pad every group's channels with zero
  // weights at the end (importers/sensai.py), 18% of a fused VGG's late weights.
  // min_live[g]: the fewest channels any block of group g reads (the channels the run-time
  // input check covers).
  std::vector<int64_t> live, min_live;
  const float* source = nullptr;  // the W it was packed from (a constant's storage is stable)
  std::unique_ptr<float, void (*)(void*)> data{nullptr, std::free};  // 2 MiB aligned (HugeAlloc)
};

struct StreamConvKernel {
  StreamConvKernel(const OrtApi* api, const OrtKernelInfo* info);
  Ort::Status Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& X,
                      const Ort::Custom::Tensor<float>& W, const Ort::Custom::Tensor<float>& B,
                      Ort::Custom::Tensor<float>& Y);
  ConvAttrs attrs_;
  std::string attr_error_;
  bool relu_ = false;  // attribute activation = "Relu"
  bool w_const_ = false;
  std::atomic<int> w_finite_{-1};  // constant W: all finite (1) or not (0); -1 not scanned
  std::mutex mu_;  // guards packed_ (sessions may run concurrently)
  std::shared_ptr<const StreamWeights> packed_;  // constant W: packed on the first call
};

}  // namespace g2d
