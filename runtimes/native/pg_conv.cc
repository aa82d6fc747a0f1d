// PGConv(X, W, threshold) -> Y: Precision Gating (runtimes/OPS.md, reference
// runtimes/reference.py::pg_conv_reference).
//
// X is quantized to abits B (sign-magnitude, per-tensor scale) and split into its top
// pred_bits (MSB part) and the rest (LSB part). Stage 1 = conv of the MSB part for every
// output; stage 2 = conv of the LSB part added only where out_msb > threshold[o].
//
// Integer arithmetic: W arrives de-quantized, but it lies on a grid step * q_w with
// |q_w| <= 2^wbits - 1 (wbits <= 8). When that grid is found (checked exactly, below) and
// B <= 8, both stages are integer sums scaled to float once per output, so they are exact
// (at least as accurate as the fp32 reference). Paths 1-4 below compute the same integers
// and the same float epilogue, so they agree bit for bit (tested); the first that applies
// runs. The order is the speed measured on each tier (figures: dense fp32 conv time / PG
// time, 128 ch, 28x28, 3x3, batch 1; tools/bench_gated_ops.py --ops pg, and for path 2
// interleaved single-thread runs of the same layer):
//  1. Intel AMX int8 tiles (pg_amx.h): group 1, activation counts within int8 (the 9-bit
//     weights are split in two). Both stages on tiles, stage 2 skipped per block of 32
//     positions x 32 outputs with no gate on. Measured: 1.8x dense fp32 at 20% on, 2.5x at 0%.
//  2. int8 SIMD where AMX is absent (pg_int8.h): AVX-512 VNNI vpdpbusd under the avx512
//     table, AVX2 vpmaddubsw under the avx2 table; group 1, any stride on VNNI, stride 1 on
//     AVX2 (measured: its strided layers ran slower than on path 3), |counts| <= 127 and, on AVX2,
//     2 * max|q_w| * max|count| <= 32767 (its saturating int16 pair sums). Stage 2 per block
//     of 4 outputs x 16 positions: skipped with no gate on, dot products of the gated-on
//     outputs while a cost model says that is cheaper, else whole. Measured on AVX2 (AMD
//     EPYC, Zen 3; abits 3 / pred 2, wbits 8; 1 thread, min of 60 interleaved runs, the
//     2-thread bench being swamped by other load): 1.12x dense at 0% on, 0.83x at 20%, 0.68x
//     at 50%, 0.62x at 100%, against 0.91 / 0.49 / 0.48 / 0.49x for path 3 and 0.61 / 0.32 /
//     0.32 / 0.33x for path 4; ResNet-20's 16-64 channel stride-1 layers 15-35% faster than on
//     path 3, its stride-2 layers slower (0.44x dense against 0.56x at 16 -> 32 ch, 0.67x
//     against 0.79x at 128 ch 28x28; the stride-phase fill of the whole input costs more
//     than the quartered conv saves), so AVX2's strided layers take path 3. An int8 stage costs
//     about one dense fp32 conv here: per 32 multiply-adds vpsignb + vpmaddubsw + vpaddw
//     against four FMAs on Zen 3's two full-rate FMA pipes, so the gain is stage 2's skipped
//     work, not stage 1. The VNNI kernel is checked for numerics only (no AVX-512 machine
//     was at hand to time it).
//  3. ONNX Runtime's NCHWc fp32 conv (subset_conv.h), on integer-valued float operands: every
//     partial sum is an integer below 2^24, so fp32 sums are exact in any order. Both stages
//     dense; stage 2 only if some gate is on; a per-element select. Needs group 1 and whole
//     channel blocks (SubsetConv::Delegates): where paths 1-2 do not apply (strided layers
//     without AMX, counts past the int8 bounds).
//  4. int16 x int16 -> int32 GEMMs / dot products (AVX-512 VNNI vpdpwssd or AVX2 vpmaddwd).
//  5. Float weights or B > 8: the same stages in fp32 on our GEMM.
// G2D_AMX=0, G2D_PG_INT8=0|avx2 and G2D_ORT_CONV=0 switch paths off (tests, other tiers).
// (ONNX Runtime's MatMulInteger was measured before AMX tiles were used directly: fast for
// int8 weights, but wbits = 8 needs two GEMMs plus a u8 im2col, an estimated 1.0-1.2x.)

#include "pg_conv.h"

#include <limits>

namespace g2d {

namespace {
// Finds step and q with w == step * q (to 1e-3 of a step) for the smallest wbits in 1..8.
bool FindWeightGrid(const float* w, int64_t n, std::vector<int16_t>* q, float* step) {
  float wmax = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    // (each value checked: std::max drops a NaN, and W = {NaN} had passed as all zeros, found
    // by the fuzzer)
    if (!std::isfinite(w[i])) return false;
    wmax = std::max(wmax, std::fabs(w[i]));
  }
  q->assign(size_t(n), 0);
  if (wmax == 0.f) {
    *step = 1.f;
    return true;
  }
  for (int bits = 1; bits <= 8; ++bits) {
    const float levels = float((1 << bits) - 1), st = wmax / levels;
    bool ok = true;
    for (int64_t i = 0; i < n && ok; ++i) {
      const float r = w[i] / st, ri = std::nearbyint(r);
      ok = std::fabs(r - ri) <= 1e-3f && std::fabs(ri) <= levels;
      (*q)[i] = int16_t(ri);
    }
    if (ok) {
      *step = st;
      return true;
    }
  }
  return false;
}

// True if some x[i] is NaN (a loop the compiler vectorizes: no early exit).
bool HasNaN(const float* x, int64_t n) {
  int nan = 0;
  for (int64_t i = 0; i < n; ++i) nan |= x[i] != x[i];
  return nan != 0;
}

// One plan per convolution group: both stages read the group's input channels with the same
// weights (stage 1 the MSB activations, stage 2 the LSB activations).
template <class T>
std::vector<GatedStagePlan<T>> BuildPlans(const T* w, const ConvGeom& g) {
  const IsaKernels& isa = BestKernels();
  const int64_t Og = g.O / g.group;
  std::vector<GatedStagePlan<T>> plans(size_t(g.group));
  for (int64_t gi = 0; gi < g.group; ++gi) {
    auto& plan = plans[gi];
    std::vector<int> w_chans;  // channel indices within W's Cw dimension
    for (int64_t o = gi * Og; o < (gi + 1) * Og; ++o) plan.outputs.push_back(int(o));
    for (int64_t c = 0; c < g.Cw; ++c) {
      w_chans.push_back(int(c));
      plan.chans1.push_back(int(gi * g.Cw + c));  // input channel indices within X
    }
    plan.chans2 = plan.chans1;
    plan.w1 = PackWeights(isa, w, g, plan.outputs, w_chans);
    plan.w2_is_w1 = true;
    plan.w2_rows = MakeWeightRows(isa, w, g, plan.outputs, w_chans);
  }
  return plans;
}

template <class T>
std::shared_ptr<const std::vector<GatedStagePlan<T>>> PlansFor(
    bool cacheable, std::mutex& mu, std::shared_ptr<const std::vector<GatedStagePlan<T>>>& cache,
    const T* w, const ConvGeom& g) {
  if (!cacheable) return std::make_shared<const std::vector<GatedStagePlan<T>>>(BuildPlans(w, g));
  std::lock_guard<std::mutex> lock(mu);
  if (!cache) cache = std::make_shared<const std::vector<GatedStagePlan<T>>>(BuildPlans(w, g));
  return cache;
}

// A kernel's packed weights: for constant W packed once per node (under `mutex`; `packed`
// because a packer returns null where its layout does not fit the layer), else per call.
template <class Packed, class Pack>
std::shared_ptr<const Packed> PackedWeightsOnce(bool w_const, std::mutex& mutex, bool& packed,
                                                std::shared_ptr<const Packed>& cached, Pack pack) {
  if (!w_const) return pack();
  std::lock_guard<std::mutex> lock(mutex);
  if (!packed) cached = pack(), packed = true;
  return cached;
}
}  // namespace

PGConvKernel::PGConvKernel(const OrtApi*, const OrtKernelInfo* info) {
  attrs_ = ReadConvAttrs(info, &attr_error_);
  abits_ = ReadIntAttr(info, "abits", -1, &attr_error_);
  pred_bits_ = ReadIntAttr(info, "pred_bits", -1, &attr_error_);
  static_scale_ = ReadFloatAttr(info, "static_scale", 0.f, &attr_error_);
  post_attrs_ = ReadPostAttrs(info, &attr_error_);
  if (attr_error_.empty() && (!HasAttr(info, "abits") || !HasAttr(info, "pred_bits")))
    attr_error_ = "attributes abits and pred_bits are required";
  else if (attr_error_.empty() && (abits_ < 2 || abits_ > 16))
    attr_error_ = "attribute abits must be in [2, 16], got " + std::to_string(abits_);
  else if (attr_error_.empty() && (pred_bits_ < 1 || pred_bits_ >= abits_))
    attr_error_ = "attribute pred_bits must be in [1, abits - 1], got " + std::to_string(pred_bits_);
  else if (attr_error_.empty() && !(static_scale_ >= 0.f && std::isfinite(static_scale_)))
    attr_error_ = "attribute static_scale must be finite and >= 0";
  // Constant weights: find the integer grid once, not per run.
  int is_const = 0;
  const OrtValue* w_value = nullptr;
  OrtStatus* st = Ort::GetApi().KernelInfoGetConstantInput_tensor(info, 1, &is_const, &w_value);
  if (st) {
    Ort::GetApi().ReleaseStatus(st);
  } else if (is_const && w_value) {
    Ort::ConstValue v(w_value);
    auto info_shape = v.GetTensorTypeAndShapeInfo();
    if (info_shape.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      w_const_ = true;
      w_int_ = FindWeightGrid(v.GetTensorData<float>(), int64_t(info_shape.GetElementCount()),
                              &w_q_, &w_step_);
      if (w_int_) w_qf_.assign(w_q_.begin(), w_q_.end());
    }
  }
  conv_ = std::make_unique<SubsetConv>(info, attrs_, w_const_);
}

Ort::Status PGConvKernel::Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& X,
                                  const Ort::Custom::Tensor<float>& W,
                                  const Ort::Custom::Tensor<float>& threshold,
                                  OptionalTensor post_scale, OptionalTensor post_shift,
                                  Ort::Custom::Tensor<float>& Y) {
  return Guarded("PGConv", [&] {
    if (!attr_error_.empty()) throw OpError("PGConv: " + attr_error_);
    const ConvGeom g = MakeGeom("PGConv", X.Shape(), W.Shape(), attrs_);
    ExpectShape("PGConv", "threshold", threshold.Shape(), {g.O});
    const PostEpilogue post = MakePostEpilogue("PGConv", post_scale, post_shift, g.O, post_attrs_);
    float* y = Y.Allocate({g.N, g.O, g.OH, g.OW});
    const IsaKernels& isa = BestKernels();
    RunStages(ctx, isa, g, X.Data(), W.Data(), threshold.Data(), y);
    ApplyPostEpilogue(ctx, isa, post, y, g.N, g.O, g.P());
  });
}

// Both stages into y, on the first path that applies (see the top of this file).
void PGConvKernel::RunStages(OrtKernelContext* ctx, const IsaKernels& isa, const ConvGeom& g,
                             const float* x, const float* w_data, const float* thr_data,
                             float* y) {
  const int64_t B = abits_, Bh = pred_bits_, shift = B - Bh;
  const int64_t nx = g.N * g.C * g.H * g.W, nw = g.O * g.Cw * g.kk();

  // Per-tensor scale over the whole batch (the seed's dynamic scale) unless static.
  // Non-finite X, as the reference (and the PyTorch module) computes it: with the dynamic
  // scale, a NaN or inf anywhere makes s NaN or inf, and every quantized activation
  // (q / (2^B-1)) * s * sign is then NaN (0 * inf included); with a static scale, inf clamps
  // to the top level (finite) and only a NaN activation is NaN. NaN planes cannot be integers:
  // such runs take the fp32 path below, and NaN propagates through its convolutions (outputs
  // whose receptive field lies in the zero padding stay finite, as in the reference).
  float s = static_scale_;
  bool nan_planes = false;
  if (s <= 0.f) {
    const float amax = isa.abs_max(x, nx);
    nan_planes = !std::isfinite(amax);
    s = amax + 1e-7f;
  } else {
    nan_planes = HasNaN(x, nx);
  }
  const float levels = float((int64_t(1) << B) - 1);

  std::vector<int16_t> w_q_local;
  const std::vector<int16_t>* w_q = &w_q_;
  float w_step = w_step_;
  bool int_path = w_int_;
  if (!w_const_) {
    int_path = FindWeightGrid(w_data, nw, &w_q_local, &w_step);
    w_q = &w_q_local;
  }
  // int16 operands and exact int32 sums: B <= 8 keeps |q| <= 255; bound the sum.
  int_path = int_path && !nan_planes && B <= 8 &&
             double(g.Cw) * g.kk() * 255.0 * 255.0 < 2147483647.0;

  // Integer paths: stage sums times one activation step times one weight step (the MSB
  // plane counts in units of 2^shift steps).
  const float unit = s / levels * w_step;
  const float scale1 = unit * float(int64_t(1) << shift), scale2 = unit;

  // Largest |MSB count| and |LSB count| of the split activations.
  const int64_t msb_max = (int64_t(1) << Bh) - 1, lsb_max = (int64_t(1) << shift) - 1;

  // Integer stages on AMX int8 tiles (pg_amx.h): exact int32 sums, so the same result. It
  // splits X itself (isa.pg_split, row by row, straight into its int8 layout).
  if (int_path && g.group == 1 && AmxAvailable()) {
    const std::shared_ptr<const PGAmxWeights> amx_w = PackedWeightsOnce(
        w_const_, plans_mutex_, amx_packed_, amx_w_, [&] { return PackPGAmxWeights(w_q->data(), g); });
    if (amx_w && std::max(msb_max, lsb_max) <= amx_w->MaxActivation()) {
      RunPGAmx(ctx, *amx_w, g, x, PGSplit{s, levels, int(shift)}, scale1, scale2, thr_data, y);
      return;
    }
  }

  // Integer stages on 8-bit SIMD (pg_int8.h: AVX2 vpmaddubsw, AVX-512 VNNI vpdpbusd): exact
  // int32 sums, the same result. Where AMX is absent, the fastest exact path measured at
  // every gate-on fraction (see the top of this file).
  // Strided layers: on the VNNI kernel (its phase-plane fill, pg_int8.cc FillGroup), 1.5-2.0x
  // faster than the NCHWc path below at 0 / 36 / 100% on, bit for bit the same, on ResNet-20's
  // two stride-2 layers (AMD EPYC Zen 4, 1 and 2 threads; the network 6-8% faster at 1
  // thread). The AVX2 kernel keeps them on the paths below: measured there (Zen 3, with an
  // earlier fill), its stride-2 layer ran 0.44x dense against 0.56x on the NCHWc path.
  const PGInt8Isa int8_isa = int_path && g.group == 1 ? PGInt8For(isa) : PGInt8Isa::kNone;
  const PGInt8Isa int8 =
      (g.sh == 1 && g.sw == 1) || int8_isa == PGInt8Isa::kVnni ? int8_isa : PGInt8Isa::kNone;
  if (int8 != PGInt8Isa::kNone) {
    const std::shared_ptr<const PGInt8Weights> w8 = PackedWeightsOnce(
        w_const_, plans_mutex_, int8_packed_, int8_w_, [&] { return PackPGInt8Weights(w_q->data(), g); });
    if (w8 && PGInt8Fits(*w8, int8, std::max(msb_max, lsb_max))) {
      RunPGInt8(ctx, int8, *w8, g, x, PGSplit{s, levels, int(shift)}, msb_max, lsb_max, scale1,
                scale2, thr_data, y);
      return;
    }
  }

  // Quantize X once, as the reference does (q = round_half_even(min(|x| / s, 1) * (2^B-1))
  // in fp32; isa.pg_split, vectorized): integer-valued planes sign(x) * (q >> shift) and
  // sign(x) * (q & (2^shift - 1)). Each path below takes them as they are, as int16 or
  // de-quantized.
  AlignedVec<float>& msb = Scratch<float, 10>();
  AlignedVec<float>& lsb = Scratch<float, 11>();
  msb.resize(size_t(nx));
  lsb.resize(size_t(nx));
  isa.pg_split(x, nx, s, levels, int(shift), msb.data(), lsb.data());

  // The two-stage convolution on our GEMM, every sample and group (int16 or float planes).
  auto run = [&](const auto& plans, float scale1, float scale2, const auto* hb,
                 const auto* lb) {
    for (int64_t n = 0; n < g.N; ++n)
      RunGatedConv(ctx, isa, g, plans, hb + n * g.C * g.H * g.W, lb + n * g.C * g.H * g.W,
                   scale1, scale2, thr_data, y + n * g.O * g.P());
  };

  // Integer stages as fp32 convs on ONNX Runtime's NCHWc kernel: with integer-valued
  // operands and every partial sum below 2^24 in magnitude, fp32 sums are exact in any
  // order, so this equals the int16 path bit for bit, at MLAS's speed. Both stages are
  // dense convs (stage 2 only when some gate is on) and the gate selects per element.
  const double kk_c = double(g.Cw) * double(g.kk());
  const double w_max = double((int64_t(1) << 8) - 1);
  if (int_path && g.group == 1 &&
      kk_c * double(std::max(msb_max, lsb_max)) * w_max < 16777216.0 &&
      conv_->Delegates(ctx, g.O, g.C)) {
    std::vector<float> w_qf_local;
    const float* wq = w_qf_.data();
    if (!w_const_) {
      w_qf_local.assign(w_q->begin(), w_q->end());
      wq = w_qf_local.data();
    }
    AlignedVec<float>& stage2 = Scratch<float, 15>();
    const int64_t Np = g.P(), HW = g.H * g.W;
    const std::vector<int> outputs = Indices(g.O), chans = Indices(g.C);
    const std::vector<float> ones(size_t(g.O), 1.f), zeros(size_t(g.O), 0.f);
    const std::vector<float> s1(size_t(g.O), scale1);
    const float* thr = thr_data;
    stage2.resize(size_t(g.O * Np));
    for (int64_t n = 0; n < g.N; ++n) {
      float* yn = y + n * g.O * Np;
      // out_msb = scale1 * acc1 (as the int16 path: gain 1 x (scale1 x acc + 0) + 0).
      RowEpilogue ep1{outputs.data(), yn, Np, ones.data(), s1.data(), zeros.data(), zeros.data()};
      ep1.relu = false;
      conv_->Run(ctx, isa, wq, msb.data() + n * g.C * HW, g, outputs, chans, ep1);
      bool any_on = false;
      for (int64_t o = 0; o < g.O && !any_on; ++o)
        for (int64_t p = 0; p < Np; ++p)
          if (yn[o * Np + p] > thr[o]) {
            any_on = true;
            break;
          }
      if (!any_on) continue;
      RowEpilogue ep2{outputs.data(), stage2.data(), Np, ones.data(), ones.data(), zeros.data(),
                      zeros.data()};
      ep2.relu = false;
      conv_->Run(ctx, isa, wq, lsb.data() + n * g.C * HW, g, outputs, chans, ep2);
      ParallelFor(ParallelIfLarge(ctx, g.O * Np), size_t(g.O), [&](size_t o) {
        float* __restrict yo = yn + int64_t(o) * Np;
        const float* __restrict zo = stage2.data() + int64_t(o) * Np;
        const float t_o = thr[o], sc2 = scale2;
        // Arithmetic, not a branch (the gates are unpredictable: as a branch, this loop cost
        // a third of the stage-2 conv at 20% on); restrict lets the compiler vectorize it.
        // A gate is 0 or 1, so v + gate * add is v or v + add (add is finite: both operands
        // are bounded integers times a finite scale).
        for (int64_t p = 0; p < Np; ++p) {
          const float v = yo[p];
          yo[p] = v + float(v > t_o) * (sc2 * zo[p]);
        }
      });
    }
    return;
  }
  if (int_path) {  // the planes as int16 (exact: |values| <= 255)
    const auto plans = PlansFor<int16_t>(w_const_, plans_mutex_, int_plans_, w_q->data(), g);
    AlignedVec<int16_t>& hb = Scratch<int16_t, 21>();
    AlignedVec<int16_t>& lb = Scratch<int16_t, 22>();
    hb.resize(size_t(nx));
    lb.resize(size_t(nx));
    for (int64_t i = 0; i < nx; ++i) {
      hb[size_t(i)] = int16_t(msb[size_t(i)]);
      lb[size_t(i)] = int16_t(lsb[size_t(i)]);
    }
    run(*plans, scale1, scale2, hb.data(), lb.data());
  } else {  // float weights: de-quantized planes, in the reference's (and seed's) order
    const float hb_step = float(int64_t(1) << shift);
    for (int64_t i = 0; i < nx; ++i) {
      const float h = msb[size_t(i)], l = lsb[size_t(i)];
      msb[size_t(i)] = std::copysign((std::fabs(h) * hb_step / levels) * s, h);
      lsb[size_t(i)] = std::copysign((std::fabs(l) / levels) * s, l);
    }
    if (nan_planes && std::isfinite(s))  // (a non-finite s made every plane value NaN above)
      for (int64_t i = 0; i < nx; ++i)
        if (x[i] != x[i]) msb[size_t(i)] = lsb[size_t(i)] = std::numeric_limits<float>::quiet_NaN();
    if (nan_planes || !CheckedOnceIfConstant(w_const_, w_finite_, [&] { return AllFinite(w_data, nw); })) {
      // The reference's Y = out_msb + gate * out_lsb element for element: gate * out_lsb is
      // NaN where out_lsb is, even with the gate off (0 * NaN), which the two-stage kernel
      // (stage 2 only where the gate is on) would not give.
      AlignedVec<float>& out_lsb = Scratch<float, 15>();
      out_lsb.resize(size_t(g.O * g.P()));
      for (int64_t n = 0; n < g.N; ++n) {
        const int64_t xo = n * g.C * g.H * g.W, P = g.P();
        float* yn = y + n * g.O * P;
        DenseConvSample(ctx, isa, w_data, msb.data() + xo, g, yn);
        DenseConvSample(ctx, isa, w_data, lsb.data() + xo, g, out_lsb.data());
        for (int64_t o = 0; o < g.O; ++o)
          for (int64_t p = 0; p < P; ++p) {
            const float gate = yn[o * P + p] > thr_data[o] ? 1.f : 0.f;
            yn[o * P + p] += gate * out_lsb[size_t(o * P + p)];
          }
      }
      return;
    }
    const auto plans = PlansFor<float>(w_const_, plans_mutex_, float_plans_, w_data, g);
    run(*plans, 1.f, 1.f, msb.data(), lsb.data());
  }
}

}  // namespace g2d
