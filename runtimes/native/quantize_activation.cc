// QuantizeActivation(X) -> Y: the seed's sign-magnitude activation quantizer (runtimes/OPS.md,
// reference runtimes/reference.py::quantize_activation_reference), which a quantized
// non-gated conv of a PG network (dnn-gating's QuantizedConv2d) applies to its input.
//
// Why a kernel: exported, the quantizer is a chain of eleven standard ops (Sign, Abs,
// ReduceMax, Add, Div, Clip, Mul, Round, Div, Mul, Mul), each a pass over the tensor: in the PG
// ResNet-20 those chains took about half of the network's time (ONNX Runtime profile, 1 thread,
// Intel Xeon: ~0.8 of 1.6 ms). passes/fuse_activation_quantizer.py fuses each chain into this
// op for --target ort: one pass for the scale (max |X| over the whole tensor, exact in any
// order) and one for the values, the chain's float operations in its order (bit for bit).
#include "quantize_activation.h"

#include <algorithm>
#include <cmath>

namespace g2d {

QuantizeActivationKernel::QuantizeActivationKernel(const OrtApi*, const OrtKernelInfo* info) {
  attrs_ = ReadQuantizerAttrs(info, "", true, &attr_error_);
}

Ort::Status QuantizeActivationKernel::Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& X,
                                              Ort::Custom::Tensor<float>& Y) {
  return Guarded("QuantizeActivation", [&] {
    if (!attr_error_.empty()) throw OpError("QuantizeActivation: " + attr_error_);
    const std::vector<int64_t> shape = X.Shape();
    const int64_t n = X.NumberOfElement();
    if (n > kMaxBufferElements) throw OpError("QuantizeActivation: X has more than 2^31 elements");
    float* y = Y.Allocate(shape);
    if (n == 0) return;
    const float* x = X.Data();
    const IsaKernels& isa = BestKernels();
    constexpr int64_t kChunk = int64_t(1) << 15;
    const size_t chunks = size_t((n + kChunk - 1) / kChunk);
    OrtKernelContext* par = ParallelIfLarge(ctx, n);
    float s = attrs_.scale;
    if (!(s > 0.f)) {  // the dynamic scale: max |X| + eps (max is exact in any order; NaN sticks)
      std::vector<float> part(chunks);
      ParallelFor(par, chunks, [&](size_t c) {
        const int64_t i0 = int64_t(c) * kChunk;
        part[c] = isa.abs_max(x + i0, std::min(kChunk, n - i0));
      });
      s = CombineAbsMax(part) + attrs_.eps;
    }
    const QuantLevels levels = MakeQuantLevels(s, attrs_.levels, isa.vw);
    ParallelFor(par, chunks, [&](size_t c) {
      const int64_t i0 = int64_t(c) * kChunk;
      isa.quantize_sign_magnitude(x + i0, std::min(kChunk, n - i0), levels, y + i0);
    });
  });
}

}  // namespace g2d
