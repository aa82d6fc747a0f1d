// SparseInputConv(X, W, B[, R]) -> Y: exactly ONNX Conv (group 1, with bias), plus the
// optional residual R and activation ("Relu") the pass fuses from a following Add and Relu
// (runtimes/OPS.md, reference runtimes/reference.py::sparse_input_conv_reference), for inputs
// whose channels are often entirely zero per sample: the output of an FBS layer, whose
// inactive channels are exact zeros. Per sample, only the input channels holding a non-zero
// value are read and multiplied (a zero channel adds exactly 0 to every sum), so the work
// scales with the sample's input channel density.
#include "sparse_input_conv.h"

namespace g2d {

SparseInputConvKernel::SparseInputConvKernel(const OrtApi*, const OrtKernelInfo* info) {
  attrs_ = ReadConvAttrs(info, &attr_error_);
  relu_ = ReadReluAttr(info, &attr_error_);
  layout_ = ReadLayoutAttrs(info, &attr_error_);
  w_const_ = InputIsConstant(info, 1);
  conv_ = std::make_unique<SubsetConv>(info, attrs_, w_const_);
}

Ort::Status SparseInputConvKernel::Compute(OrtKernelContext* ctx,
                                           const Ort::Custom::Tensor<float>& X,
                                           const Ort::Custom::Tensor<float>& W,
                                           const Ort::Custom::Tensor<float>& B,
                                           OptionalTensor R, Ort::Custom::Tensor<float>& Y) {
  return Guarded("SparseInputConv", [&] {
    if (!attr_error_.empty()) throw OpError("SparseInputConv: " + attr_error_);
    if (attrs_.group != 1) throw OpError("SparseInputConv: group must be 1 (W is [O, C, kh, kw])");
    const LayoutGeom lg = MakeLayoutGeom("SparseInputConv", layout_, X.Shape(), W.Shape(), attrs_);
    const ConvGeom& g = lg.g;
    const int64_t Bi = layout_.input_block, Bo = layout_.output_block;
    const int64_t Cx = lg.x_channels, Oy = lg.y_channels;
    ExpectShape("SparseInputConv", "B", B.Shape(), {g.O});
    const float* residual = nullptr;
    if (const Ort::Custom::Tensor<float>* r = OptionalInput(R)) {
      ExpectShape("SparseInputConv", "R", r->Shape(), {g.N, Oy, g.OH, g.OW});
      residual = r->Data();
    }
    const IsaKernels& isa = BestKernels();
    float* y = Y.Allocate({g.N, Oy, g.OH, g.OW});
    const int64_t HW = g.H * g.W, Np = g.P();
    const std::vector<int> outputs = Indices(g.O);
    const std::vector<float> ones(size_t(g.O), 1.f), zeros(size_t(g.O), 0.f);
    // A NaN or inf weight makes a zero channel (and a padding tap) contribute NaN (0 * inf),
    // as in the reference: then every channel and tap is multiplied (DenseConvSample).
    const bool w_finite = CheckedOnceIfConstant(w_const_, w_finite_,
                                                [&] { return AllFinite(W.Data(), g.O * g.C * g.kk()); });
    // Consecutive samples that read every input channel in the blocked layout run as one
    // batch of the delegate (SubsetConv::InPlaceBlocked).
    InPlaceBatch batch(*conv_, ctx, isa, W.Data(), X.Data(), Cx * HW, g);
    for (int64_t n = 0; n < g.N; ++n) {
      const float* xn = X.Data() + n * Cx * HW;
      float* yn = y + n * Oy * Np;
      const float* rn = residual ? residual + n * Oy * Np : nullptr;
      if (!w_finite) {  // NCHW planes through the plain dense path, blocked back if asked
        const float* planes = AsPlanes(ctx, isa, xn, g.C, HW, Bi, Scratch<float, 48>());
        AlignedVec<float>& yp = Scratch<float, 49>();
        float* out = yn;
        if (Bo) {
          yp.resize(size_t(g.O * Np));
          out = yp.data();
        }
        RowEpilogue ep{outputs.data(), out, Np, ones.data(), ones.data(), zeros.data(), B.Data()};
        ep.relu = relu_;
        ep.residual = rn ? AsPlanes(ctx, isa, rn, g.O, Np, Bo, Scratch<float, 50>()) : nullptr;
        DenseConvSample(ctx, isa, W.Data(), planes, g, out);
        for (int64_t o = 0; o < g.O; ++o) ep.ApplyToRun(isa, o, out + o * Np, 0, Np);
        if (Bo) AllPlanesToBlocked(ctx, isa, out, g.O, Np, Bo, yn);
        continue;
      }
      std::vector<int> live;
      if (Bi) {
        std::vector<uint8_t> on(size_t(RoundUp(g.C, Bi)));
        for (int64_t c0 = 0; c0 < g.C; c0 += Bi)
          isa.block_channel_stats(xn + c0 * HW, HW, int(Bi), int(std::min(Bi, g.C - c0)), kPoolSum,
                                  on.data() + c0, nullptr, nullptr);
        for (int64_t c = 0; c < g.C; ++c)
          if (on[size_t(c)]) live.push_back(int(c));
      } else {
        for (int64_t c = 0; c < g.C; ++c)
          if (isa.has_nonzero(xn + c * HW, HW)) live.push_back(int(c));
      }
      if (Bo) {
        BlockedEpilogue eb{yn, Bo, ones.data(), ones.data(), zeros.data(), B.Data()};
        eb.residual = rn;
        eb.relu = relu_;
        if (conv_->InPlaceBlocked(ctx, g, Bi, Bo, g.O, live)) {
          batch.Add(n, eb);
          continue;
        }
        batch.Flush();
        conv_->RunBlocked(ctx, isa, W.Data(), xn, Bi, g, outputs, live, eb);
        continue;
      }
      RowEpilogue ep{outputs.data(), yn, Np, ones.data(), ones.data(), zeros.data(), B.Data()};
      ep.relu = relu_;
      ep.residual = rn;
      conv_->Run(ctx, isa, W.Data(), xn, g, outputs, live, ep);
    }
    batch.Flush();
  });
}

}  // namespace g2d
