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

// W packed for isa.stream_block: for group g and output block b (vw channels of the group,
// the last one padded with zero lanes), block gb = g * blocks + b holds k = c * kk + t for the
// block's live input channels c < live[gb] only, its vw weights at (offset[gb] + k) * vw.
// Zero tails: live[gb] = 1 + the last input channel of the group (0..C/group-1) with a nonzero
// weight in the block (0: all zero); the channels after it are neither stored nor read.
// sensAI's fused layers pad every group's channels with zero weights at the end
// (importers/sensai.py): 16% of a fused VGG's late weights. min_live[g]: the fewest channels a
// block of group g reads (from it on, the run-time input check covers the channels).
struct StreamWeights {
  int vw = 0;
  int64_t blocks = 0, K = 0;  // K: C/group * kh * kw, a block's words when every channel is live
  std::vector<int64_t> live, offset, min_live;
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
