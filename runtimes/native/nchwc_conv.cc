// See nchwc_conv.h.
#include "nchwc_conv.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace g2d {

namespace {
std::atomic<int64_t> delegated_runs{0};
}  // namespace

int NchwcBlock() {
  // Mirrors MLAS's platform choice (NchwcBlockSize): AVX-512F -> 16, AVX2 -> 8, else none.
  static const int block = [] {
    if (__builtin_cpu_supports("avx512f")) return 16;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 8;
    return 0;
  }();
  return block;
}

NchwcConv::NchwcConv(const OrtKernelInfo* info, const ConvAttrs& attrs) : attrs_(attrs) {
  block_ = NchwcBlock();
  if (block_ == 0 || attrs.group != 1) return;
  try {
    std::vector<Ort::OpAttr> op_attrs;
    op_attrs.emplace_back("strides", attrs.strides.data(), int(attrs.strides.size()),
                          ORT_OP_ATTR_INTS);
    op_attrs.emplace_back("pads", attrs.pads.data(), int(attrs.pads.size()), ORT_OP_ATTR_INTS);
    op_attrs.emplace_back("dilations", attrs.dilations.data(), int(attrs.dilations.size()),
                          ORT_OP_ATTR_INTS);
    const char* type_names[] = {"T"};
    const ONNXTensorElementDataType type_values[] = {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT};
    op_ = Ort::Op::Create(info, "Conv", "com.microsoft.nchwc", 1, type_names, type_values, 1,
                          op_attrs.data(), op_attrs.size(), 2, 1);
  } catch (const std::exception&) {
    op_ = Ort::Op{nullptr};  // not in this ONNX Runtime build: callers use their own kernels
  }
}

NchwcFilter NchwcConv::PackFilter(OrtKernelContext* ctx, const float* w, const ConvGeom& g,
                                  const std::vector<int>& outputs, const std::vector<int>& chans,
                                  NchwcFilter* reuse) const {
  const int64_t B = block_, kk = g.kk(), na = int64_t(outputs.size()), nc = int64_t(chans.size());
  NchwcFilter f;
  if (reuse) f.data = std::move(reuse->data);  // resize below keeps its capacity
  f.O = Padded(na);
  f.C = nc < B ? nc : Padded(nc);
  f.kh = g.kh;
  f.kw = g.kw;
  f.data.resize(size_t(f.O * f.C * kk));  // every element is written below (padding as 0)
  const int64_t row = g.Cw * kk;           // W is OIHW: output o starts at o * row
  if (nc < B) {  // "OIHWBo" ([O/B][C][kh][kw][B]): small (a network's first conv); plain loops
    for (int64_t ob = 0; ob < f.O / B; ++ob)
      for (int64_t b = 0; b < nc; ++b)
        for (int64_t t = 0; t < kk; ++t)
          for (int64_t lo = 0; lo < B; ++lo) {
            const int64_t a = ob * B + lo;
            f.data[size_t(((ob * nc + b) * kk + t) * B + lo)] =
                a < na ? w[outputs[size_t(a)] * row + int64_t(chans[size_t(b)]) * kk + t] : 0.f;
          }
    return f;
  }
  // "OIHWBiBo": one B x B tile per (output block, input block, tap), read from W directly
  // (only the weights the subsets need; FBS repacks on every run whose active sets changed,
  // and on a 7x7 layer that costs as much as the conv). Parallel over tiles when large.
  const IsaKernels& isa = BestKernels();
  const int64_t blocks_out = f.O / B, blocks_in = f.C / B;
  // (Measured: prefetching the next tile's row segments did not help when W streams from
  // memory, as in a whole network; the pack is then bound by memory bandwidth.)
  ParallelFor(ParallelIfLarge(ctx, na * nc * kk), size_t(blocks_out * blocks_in), [&](size_t i) {
    const int64_t ob = int64_t(i) / blocks_in, ib = int64_t(i) % blocks_in;
    const int n_out = int(std::min(B, na - ob * B)), n_in = int(std::min(B, nc - ib * B));
    int64_t out_off[64];
    int32_t in_off[64];
    for (int lo = 0; lo < n_out; ++lo) out_off[lo] = int64_t(outputs[size_t(ob * B + lo)]) * row;
    for (int li = 0; li < n_in; ++li) in_off[li] = int32_t(chans[size_t(ib * B + li)] * kk);
    isa.pack_filter_tile(w, out_off, n_out, in_off, n_in, kk, int(B),
                         f.data.data() + int64_t(i) * kk * B * B);
  });
  return f;
}

LayoutAttrs ReadLayoutAttrs(const OrtKernelInfo* info, std::string* error) {
  LayoutAttrs l;
  l.input_block = ReadIntAttr(info, "input_block", 0, error);
  l.output_block = ReadIntAttr(info, "output_block", 0, error);
  return l;
}

void CheckLayout(const char* op, const LayoutAttrs& layout) {
  const int64_t B = NchwcBlock();
  for (const auto& [name, value] : {std::pair<const char*, int64_t>{"input_block", layout.input_block},
                                    {"output_block", layout.output_block}})
    if (value != 0 && value != B)
      throw OpError(std::string(op) + ": attribute " + name + " " + std::to_string(value) +
                    " is not this CPU's NCHWc block (" + std::to_string(B) +
                    "): the layout pass ran on another machine");
  if (layout.input_block && !layout.output_block)
    throw OpError(std::string(op) + ": input_block needs output_block");
}

LayoutGeom MakeLayoutGeom(const char* op, const LayoutAttrs& layout,
                          const std::vector<int64_t>& x_shape, const std::vector<int64_t>& w_shape,
                          const ConvAttrs& attrs) {
  CheckLayout(op, layout);
  if (w_shape.size() != 4) throw OpError(std::string(op) + ": W must be 4-D [O, C, kh, kw]");
  const int64_t Bi = layout.input_block, Bo = layout.output_block;
  std::vector<int64_t> planes = x_shape;
  if (Bi) {
    const int64_t channels = w_shape[1];
    if (x_shape.size() != 4 || x_shape[1] != RoundUp(channels, Bi))
      throw OpError(std::string(op) + ": blocked X must have " + std::to_string(RoundUp(channels, Bi)) +
                    " channels (" + std::to_string(channels) + " in blocks of " + std::to_string(Bi) + ")");
    planes[1] = channels;
  }
  LayoutGeom lg{MakeGeom(op, planes, w_shape, attrs), 0, 0};
  lg.x_channels = Bi ? RoundUp(lg.g.C, Bi) : lg.g.C;
  lg.y_channels = Bo ? RoundUp(lg.g.O, Bo) : lg.g.O;
  return lg;
}

void PlanesToBlocked(OrtKernelContext* ctx, const IsaKernels& isa, const float* x,
                     const int64_t* offs, int64_t nc, int64_t HW, int64_t B, float* xb) {
  // Panels of up to isa.nr pixels go through the ISA's register transpose
  // (isa.gather_fields). Parallel over blocks only when large.
  ParallelFor(ParallelIfLarge(ctx, nc * HW), size_t((nc + B - 1) / B), [&](size_t blk_index) {
    const int64_t blk = int64_t(blk_index), valid = std::min(B, nc - blk * B);
    const int64_t* off = offs + blk * B;
    float* dst = xb + blk * HW * B;
    for (int64_t p0 = 0; p0 < HW; p0 += isa.nr)
      isa.gather_fields(x + p0, off, valid, B, dst + p0 * B, int(std::min<int64_t>(isa.nr, HW - p0)));
  });
}

void AllPlanesToBlocked(OrtKernelContext* ctx, const IsaKernels& isa, const float* planes,
                        int64_t C, int64_t HW, int64_t B, float* xb) {
  std::vector<int64_t> offs(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) offs[size_t(c)] = c * HW;
  PlanesToBlocked(ctx, isa, planes, offs.data(), C, HW, B, xb);
}

const float* AsPlanes(OrtKernelContext* ctx, const IsaKernels& isa, const float* x, int64_t C,
                      int64_t HW, int64_t block, AlignedVec<float>& buf) {
  if (!block) return x;
  buf.resize(size_t(C * HW));
  BlockedToPlanes(ctx, isa, x, C, HW, block, buf.data());
  return buf.data();
}

void BlockedToPlanes(OrtKernelContext* ctx, const IsaKernels& isa, const float* xb, int64_t C,
                     int64_t HW, int64_t B, float* x) {
  ParallelFor(ParallelIfLarge(ctx, C * HW), size_t((C + B - 1) / B), [&](size_t blk_index) {
    const int64_t blk = int64_t(blk_index);
    const int valid = int(std::min(B, C - blk * B));
    float* rows[64];
    for (int l = 0; l < valid; ++l) rows[l] = x + (blk * B + l) * HW;
    isa.scatter_lanes(xb + blk * HW * B, B, HW, rows, valid);
  });
}

int LaneSources(const int64_t* source, int valid, int64_t B, int64_t* src_block, int32_t* idx) {
  int nsrc = 0;
  for (int l = 0; l < valid; ++l) {
    if (source[l] < 0) continue;
    const int64_t sb = source[l] / B;
    if (nsrc == 0 || src_block[nsrc - 1] != sb) {
      src_block[nsrc] = sb;
      std::fill(idx + nsrc * B, idx + (nsrc + 1) * B, -1);
      ++nsrc;
    }
    idx[(nsrc - 1) * B + l] = int32_t(source[l] % B);
  }
  return nsrc;
}

void BlockedSubset(OrtKernelContext* ctx, const IsaKernels& isa, const float* xb,
                   const std::vector<int>& chans, int64_t HW, int64_t B, float* dst) {
  const int64_t nc = int64_t(chans.size());
  ParallelFor(ParallelIfLarge(ctx, nc * HW), size_t((nc + B - 1) / B), [&](size_t blk_index) {
    const int64_t first = int64_t(blk_index) * B;
    const int valid = int(std::min(B, nc - first));
    int64_t source[64], src_block[64];
    for (int l = 0; l < valid; ++l) source[l] = chans[size_t(first + l)];
    int32_t idx[64 * 64];
    const int nsrc = LaneSources(source, valid, B, src_block, idx);
    const float* src[64];
    for (int s = 0; s < nsrc; ++s) src[s] = xb + src_block[s] * HW * B;
    isa.permute_lanes(src, nsrc, idx, HW, int(B), dst + int64_t(blk_index) * HW * B);
  });
}

void NchwcConv::GatherBlocked(OrtKernelContext* ctx, const IsaKernels& isa, const float* x,
                              const ConvGeom& g, const std::vector<int>& chans,
                              float* xb) const {
  const int64_t B = block_, HW = g.H * g.W, nc = int64_t(chans.size());
  if (nc < B) {  // the NCHW-input form: the channels' rows, in order
    ParallelFor(ParallelIfLarge(ctx, nc * HW), size_t(nc), [&](size_t c) {
      std::memcpy(xb + int64_t(c) * HW, x + int64_t(chans[c]) * HW, sizeof(float) * size_t(HW));
    });
    return;
  }
  std::vector<int64_t> offs(chans.size());
  for (size_t i = 0; i < chans.size(); ++i) offs[i] = int64_t(chans[i]) * HW;
  PlanesToBlocked(ctx, isa, x, offs.data(), nc, HW, B, xb);
}

void NchwcConv::Run(OrtKernelContext* ctx, const ConvGeom& g, const NchwcFilter& f,
                    const float* xb, float* yb, int64_t batch) const {
  const Ort::MemoryInfo mem = Ort::MemoryInfo::CreateCpu(OrtDeviceAllocator, OrtMemTypeDefault);
  const int64_t x_shape[] = {batch, f.C, g.H, g.W};
  const int64_t w_shape[] = {f.O, f.C, f.kh, f.kw};
  const int64_t y_shape[] = {batch, f.O, g.OH, g.OW};
  // (Sizes: at most the caller's tensors, whose element counts MakeGeom bounded.)
  const size_t x_size = size_t(batch * f.C * g.H * g.W), y_size = size_t(batch * f.O * g.OH * g.OW);
  // The op reads X and W only; the casts are what the C API's Value wrapper asks for.
  Ort::Value inputs[] = {
      Ort::Value::CreateTensor<float>(mem, const_cast<float*>(xb), x_size, x_shape, 4),
      Ort::Value::CreateTensor<float>(mem, const_cast<float*>(f.data.data()), f.data.size(),
                                      w_shape, 4)};
  Ort::Value outputs[] = {Ort::Value::CreateTensor<float>(mem, yb, y_size, y_shape, 4)};
  const_cast<Ort::Op&>(op_).Invoke(ctx, inputs, 2, outputs, 1);
  delegated_runs.fetch_add(1, std::memory_order_relaxed);
}

bool NchwcConv::Available(OrtKernelContext* ctx) const {
  static const bool disabled = [] {
    const char* v = std::getenv("G2D_ORT_CONV");
    return v != nullptr && std::strcmp(v, "0") == 0;
  }();
  if (!op_ || disabled) return false;
  std::call_once(checked_, [&] { ok_ = SelfCheck(ctx); });
  return ok_;
}

bool NchwcConv::Suits(OrtKernelContext* ctx, int64_t outputs, int64_t inputs) const {
  if (outputs < 1 || inputs < 1) return false;
  const double padded = double(Padded(outputs)) * double(inputs < block_ ? inputs : Padded(inputs));
  return padded <= 1.25 * double(outputs) * double(inputs) && Available(ctx);
}

// One small convolution through the delegate against a direct loop: catches a block size or
// filter layout that differs from what this file assumes (they are ONNX Runtime internals).
bool NchwcConv::SelfCheck(OrtKernelContext* ctx) const {
  // Both input forms: whole blocks (with padding) and NCHW input (fewer channels than a block).
  return SelfCheckWith(ctx, block_ + 3) && SelfCheckWith(ctx, 3);
}

bool NchwcConv::SelfCheckWith(OrtKernelContext* ctx, int64_t C) const {
  try {
    const int64_t O = block_ + 5, k = 3;  // not a whole block of outputs: padding is used
    const int64_t H = 2 * (k - 1) * attrs_.dilations[0] + 5;
    const int64_t Wd = 2 * (k - 1) * attrs_.dilations[1] + 4;
    const ConvGeom g = MakeGeom("NchwcConv self-check", {1, C, H, Wd}, {O, C, k, k}, attrs_);
    if (g.OH < 1 || g.OW < 1) return false;
    std::vector<float> x(size_t(C * H * Wd)), w(size_t(O * C * k * k));
    for (size_t i = 0; i < x.size(); ++i) x[i] = float(int(i * 7 % 13) - 6);
    for (size_t i = 0; i < w.size(); ++i) w[i] = float(int(i * 5 % 11) - 5) * 0.25f;
    std::vector<int> outputs(static_cast<size_t>(O)), chans(static_cast<size_t>(C));
    for (int64_t i = 0; i < O; ++i) outputs[size_t(i)] = int(O - 1 - i);  // reordered rows
    for (int64_t i = 0; i < C; ++i) chans[size_t(i)] = int(i);
    const NchwcFilter f = PackFilter(nullptr, w.data(), g, outputs, chans);
    AlignedVec<float> xb(size_t(f.C * H * Wd)), yb(size_t(f.O * g.P()));
    GatherBlocked(nullptr, BestKernels(), x.data(), g, chans, xb.data());
    Run(ctx, g, f, xb.data(), yb.data());
    const int64_t B = block_;
    for (int64_t a = 0; a < O; ++a) {
      const int64_t o = outputs[size_t(a)];
      for (int64_t oy = 0; oy < g.OH; ++oy)
        for (int64_t ox = 0; ox < g.OW; ++ox) {
          double ref = 0.0;  // small integers and quarters: exact in fp32 and double
          for (int64_t c = 0; c < C; ++c)
            for (int64_t i = 0; i < k; ++i)
              for (int64_t j = 0; j < k; ++j) {
                const int64_t iy = oy * g.sh - g.pt + i * g.dh, ix = ox * g.sw - g.pl + j * g.dw;
                if (iy < 0 || iy >= H || ix < 0 || ix >= Wd) continue;
                ref += double(x[size_t((c * H + iy) * Wd + ix)]) *
                       double(w[size_t(((o * C + c) * k + i) * k + j)]);
              }
          const float got = yb[size_t(((a / B) * g.P() + oy * g.OW + ox) * B + a % B)];
          if (std::fabs(double(got) - ref) > 1e-3) return false;
        }
    }
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

}  // namespace g2d

// How many convolutions this process has delegated (tests check a path was really taken;
// read with ctypes from the same library file the session loaded).
extern "C" __attribute__((visibility("default"))) int64_t G2DDelegatedConvRuns() {
  return g2d::delegated_runs.load(std::memory_order_relaxed);
}

// The NCHWc block the kernels' blocked layout uses on this CPU (0: none), for
// runtimes/ort_layout.py.
extern "C" __attribute__((visibility("default"))) int G2DNchwcBlock() { return g2d::NchwcBlock(); }
