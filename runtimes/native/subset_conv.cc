// See subset_conv.h.
#include "subset_conv.h"

#include <algorithm>
#include <atomic>
#include <cstring>

namespace g2d {

namespace {
std::atomic<int64_t> blocked_runs{0};  // samples RunBlocked computed (G2DBlockedLayoutRuns)
std::atomic<int64_t> whole_runs{0};    // samples computed as the whole layer (G2DWholeLayerRuns)
std::atomic<int64_t> batched_runs{0};  // samples that shared a delegate call (G2DBatchedBlockedRuns)
}  // namespace

SubsetConv::SubsetConv(const OrtKernelInfo* info, const ConvAttrs& attrs, bool w_const)
    : w_const_(w_const), nchwc_(info, attrs) {}

const std::vector<int>& SubsetConv::InputsToRead(const ConvGeom& g, const std::vector<int>& chans,
                                                 std::vector<int>* all) {
  // Nearly every input live: read them all (zero channels add exact zeros). Skipping the few
  // dead ones would save little and key the prepared weights on a set that changes from input
  // to input (measured: FBS ResNet-18 at density 1 with input-dependent saliency ran at half
  // speed, repacking every layer's weights on every run).
  if (!ReadsAllInputs(g, chans) || int64_t(chans.size()) == g.C) return chans;
  *all = Indices(g.C);
  return *all;
}

bool SubsetConv::ReadsAllInputs(const ConvGeom& g, const std::vector<int>& chans) {
  return int64_t(chans.size()) == g.C ||
         (double(chans.size()) > kReadAllInputsAbove * double(g.C) && g.group == 1);
}

std::shared_ptr<const NchwcFilter> SubsetConv::Filter(OrtKernelContext* ctx, const float* w,
                                                      const ConvGeom& g,
                                                      const std::vector<int>& outputs,
                                                      const std::vector<int>& in) {
  return filter_cache_.Get(w_const_, outputs, in, [&](NchwcFilter* reuse) {
    return nchwc_.PackFilter(ctx, w, g, outputs, in, reuse);
  });
}

// MAC-equivalents of packing one weight of a subset's filter (nchwc_conv.cc PackFilter): the
// pack streams W from memory, gathers and writes the tile. The whole layer runs where its
// extra MACs per output pixel, (O * C - subset) * OH * OW, are below this many times the
// subset's weights. Fitted on an Intel Xeon (FBS ResNet-18, active sets changing per input,
// builds timed in alternating blocks): at density 0.75 the 7x7 layers gain as the whole layer
// (FBSConv: 21 extra MACs per subset weight; repacking had cost +1.4-1.6 ms per conv, ~1.1 ns
// per weight), while a SparseInputConv reading half of its inputs (49 extra MACs per weight)
// ran 3-5% slower that way at density 0.5: so between 38 and 49. A heuristic of this machine;
// timing both forms per layer on the target would be the general answer.
constexpr double kPackMacsPerWeight = 45.0;

std::shared_ptr<const NchwcFilter> SubsetConv::WholeFilter(OrtKernelContext* ctx, const float* w,
                                                           const ConvGeom& g) {
  std::call_once(whole_once_, [&] {
    w_finite_ = AllFinite(w, g.O * g.Cw * g.kk());
    whole_inputs_ = Indices(g.C);
    whole_filter_ = std::make_shared<const NchwcFilter>(
        nchwc_.PackFilter(ctx, w, g, Indices(g.O), whole_inputs_));
  });
  return whole_filter_;
}

bool SubsetConv::UseWhole(OrtKernelContext* ctx, const float* w, const ConvGeom& g,
                          const std::vector<int>& outputs, const std::vector<int>& in) {
  const int64_t na = int64_t(outputs.size()), nc = int64_t(in.size());
  if (!w_const_ || g.group != 1 || g.C < nchwc_.Block() || (na == g.O && nc == g.C)) return false;
  // Extra MACs of the whole layer against the pack of the subset (per output pixel: weights).
  const double subset = double(na) * double(nc), whole = double(g.O) * double(g.C);
  if ((whole - subset) * double(g.P()) >= kPackMacsPerWeight * subset) return false;
  if (!nchwc_.Suits(ctx, g.O, g.C) || filter_cache_.Holds(outputs, in)) return false;
  {
    // The same subset twice in a row (fixed active sets: the common case where saliencies do
    // not depend on the input) is packed and kept: its later runs then hit the cache. Without
    // this the whole layer ran on every run, since it never fills the cache (measured: FBS
    // ResNet-18 at density 0.5 with fixed sets 9% slower).
    std::lock_guard<std::mutex> lock(last_mu_);
    const bool repeated = outputs == last_out_ && in == last_in_;
    last_out_ = outputs;
    last_in_ = in;
    if (repeated) return false;
  }
  WholeFilter(ctx, w, g);
  if (w_finite_) whole_runs.fetch_add(1, std::memory_order_relaxed);
  // Non-finite weights of an input that is all zeros would give NaN (0 * inf), which the
  // subset never reads (FBSConv and SparseInputConv take such weights to their dense path
  // before they get here; the check keeps SubsetConv's own contract for any caller).
  return w_finite_;
}

std::shared_ptr<const PackedWeights<float>> SubsetConv::Packed(const IsaKernels& isa,
                                                               const float* w, const ConvGeom& g,
                                                               const std::vector<int>& outputs,
                                                               const std::vector<int>& in) {
  return packed_cache_.Get(w_const_, outputs, in, [&](PackedWeights<float>*) {
    return PackWeights(isa, w, g, outputs, in);
  });
}

const float* SubsetConv::DelegateInput(OrtKernelContext* ctx, const IsaKernels& isa,
                                       const float* x, const ConvGeom& g,
                                       const std::vector<int>& in, const NchwcFilter& f) const {
  // Below one block the delegate reads plain NCHW: with every channel, in order, that is x
  // itself, and the copy is skipped (a network's RGB stem: 224x224x3 copied per call).
  bool x_as_is = int64_t(in.size()) == g.C && g.C < nchwc_.Block();
  for (size_t c = 0; x_as_is && c < in.size(); ++c) x_as_is = in[c] == int(c);
  if (x_as_is) return x;
  AlignedVec<float>& xb = Scratch<float, 16>();
  xb.resize(size_t(f.C * g.H * g.W));
  nchwc_.GatherBlocked(ctx, isa, x, g, in, xb.data());
  return xb.data();
}

void SubsetConv::Run(OrtKernelContext* ctx, const IsaKernels& isa, const float* w,
                     const float* x, const ConvGeom& g, const std::vector<int>& outputs,
                     const std::vector<int>& chans, const RowEpilogue& ep) {
  const int64_t na = int64_t(outputs.size()), Np = g.P();
  if (na == 0) return;
  std::vector<int> all_chans;
  const std::vector<int>& in = InputsToRead(g, chans, &all_chans);
  if (nchwc_.Suits(ctx, na, int64_t(in.size()))) {
    // The whole layer (UseWhole): every output from every input; row a of the product is
    // then the result's row outputs[a], else row a.
    const bool whole = UseWhole(ctx, w, g, outputs, in);
    const auto f = whole ? WholeFilter(ctx, w, g) : Filter(ctx, w, g, outputs, in);
    const std::vector<int>& read = whole ? whole_inputs_ : in;  // set by WholeFilter
    const int64_t rows_out = whole ? g.O : na;
    std::vector<int> index_of(size_t(rows_out), -1);  // result row -> product row a, or -1
    for (int64_t a = 0; a < na; ++a) index_of[size_t(whole ? outputs[size_t(a)] : a)] = int(a);
    AlignedVec<float>& yb = Scratch<float, 17>();
    yb.resize(size_t(f->O * Np));
    const float* xin = DelegateInput(ctx, isa, x, g, read, *f);
    nchwc_.Run(ctx, g, *f, xin, yb.data());
    // Back from the blocked layout to the destination rows, then the epilogue on each row,
    // chunk by chunk of pixels: a block's rows of one chunk (16 x kChunk floats) are still in
    // L1 when the epilogue reads them back, where whole rows (ResNet-18's stem: 12544 pixels)
    // had left it. Result rows of inactive outputs (the whole layer) go to a scratch row.
    const int64_t B = nchwc_.Block();
    constexpr int64_t kChunk = 512;
    ParallelFor(ParallelIfLarge(ctx, rows_out * Np), size_t((rows_out + B - 1) / B), [&](size_t blk) {
      const int64_t r0 = int64_t(blk) * B;
      int valid = 0;  // lanes up to the block's last product row
      for (int l = 0; l < int(std::min<int64_t>(B, rows_out - r0)); ++l)
        if (index_of[size_t(r0 + l)] >= 0) valid = l + 1;
      if (valid == 0) return;
      float* rows[64];
      float discard[kChunk];
      for (int l = 0; l < valid; ++l) {
        const int a = index_of[size_t(r0 + l)];
        rows[l] = a >= 0 ? ep.y + int64_t(ep.rows[a]) * ep.ld : nullptr;
      }
      float* at[64];
      for (int64_t p0 = 0; p0 < Np; p0 += kChunk) {
        const int64_t n = std::min(kChunk, Np - p0);
        for (int l = 0; l < valid; ++l) at[l] = rows[l] ? rows[l] + p0 : discard;
        isa.scatter_lanes(yb.data() + r0 * Np + p0 * B, B, n, at, valid);
        for (int l = 0; l < valid; ++l)
          if (rows[l]) ep.ApplyToRun(isa, index_of[size_t(r0 + l)], at[l], p0, n);
      }
    });
    return;
  }
  ConvByPanels(ctx, isa, *Packed(isa, w, g, outputs, in), x, g, in, ep);
}

void SubsetConv::RunBlocked(OrtKernelContext* ctx, const IsaKernels& isa, const float* w,
                            const float* x, int64_t x_block, const ConvGeom& g,
                            const std::vector<int>& outputs, const std::vector<int>& chans,
                            const BlockedEpilogue& ep) {
  const int64_t na = int64_t(outputs.size()), Np = g.P(), HW = g.H * g.W, B = ep.B;
  const int64_t oblocks = (g.O + B - 1) / B;
  blocked_runs.fetch_add(1, std::memory_order_relaxed);
  if (na == 0) {
    std::memset(ep.y, 0, sizeof(float) * size_t(oblocks * Np * B));
    return;
  }
  std::vector<int> all_chans;
  const std::vector<int>& in = InputsToRead(g, chans, &all_chans);
  const bool all_in = int64_t(in.size()) == g.C;  // ascending and unique: every channel
  // Channel o's active index, -1 if inactive.
  std::vector<int> at(size_t(g.O), -1);
  for (int64_t a = 0; a < na; ++a) at[size_t(outputs[size_t(a)])] = int(a);
  // Per block of outputs: the epilogue's parameters by lane, zeros for inactive outputs (their
  // lanes hold zeros, which then stay zeros).
  auto block_params = [&](int64_t ob, float* gl, float* sl, float* shl, float* bl) {
    const int valid = int(std::min(B, g.O - ob * B));
    for (int l = 0; l < valid; ++l) {
      const int64_t o = ob * B + l;
      const bool on = at[size_t(o)] >= 0;
      gl[l] = on ? ep.gain[o] : 0.f;
      sl[l] = on ? ep.scale[o] : 0.f;
      shl[l] = on ? ep.shift[o] : 0.f;
      bl[l] = on ? ep.bias[o] : 0.f;
    }
    return valid;
  };
  if (nchwc_.Block() == B && nchwc_.Suits(ctx, na, int64_t(in.size()))) {
    // The whole layer (UseWhole): every output from every input, the inactive outputs'
    // lanes then dropped like the lanes of a subset's result.
    const bool whole = UseWhole(ctx, w, g, outputs, in);
    const auto f = whole ? WholeFilter(ctx, w, g) : Filter(ctx, w, g, outputs, in);
    const std::vector<int>& read = whole ? whole_inputs_ : in;  // set by WholeFilter
    const bool read_all = whole || all_in;
    const float* xin = x;  // blocked x with every channel: the delegate's input as it is
    if (!x_block || int64_t(read.size()) < B) {  // NCHW x, or fewer than a block (read as NCHW)
      xin = DelegateInput(ctx, isa, AsPlanes(ctx, isa, x, g.C, HW, x_block, Scratch<float, 18>()),
                          g, read, *f);
    } else if (!read_all) {
      AlignedVec<float>& xb = Scratch<float, 16>();
      xb.resize(size_t(f->C * HW));
      BlockedSubset(ctx, isa, x, in, HW, B, xb.data());
      xin = xb.data();
    }
    if (na == g.O) return RunInPlace(ctx, isa, g, *f, xin, 1, &ep);  // every output
    // The result (f->O <= Y's channels: the active ones, or the whole layer's) is written into
    // Y's own first blocks, and each block of Y then takes its active channels' lanes in place,
    // chunk by chunk of pixels (the chunk still in L1 for the epilogue), the last block first:
    // block ob reads result blocks <= ob only (sorted outputs: a block's active indices are a
    // run, within at most two blocks, never above its own; in the whole result channel o is at
    // o), none of which a higher block's fill has overwritten, and permute_lanes reads a pixel
    // before it writes it. A scratch result cost a pass of its own: FBS ResNet-18's stem at
    // density 0.5 wrote and read 1.6 MB more at 112x112 and ran at 0.92x its twin's conv for
    // half the multiply-adds (ONNX Runtime profile, Intel Xeon).
    nchwc_.Run(ctx, g, *f, xin, ep.y);
    constexpr int64_t kChunk = 512;
    const int64_t chunks = (Np + kChunk - 1) / kChunk;
    ParallelFor(ParallelIfLarge(ctx, g.O * Np), size_t(chunks), [&](size_t chunk) {
      const int64_t p0 = int64_t(chunk) * kChunk, n = std::min(kChunk, Np - p0);
      for (int64_t ob = oblocks - 1; ob >= 0; --ob) {
        float gl[64], sl[64], shl[64], bl[64];
        const int valid = block_params(ob, gl, sl, shl, bl);
        const int64_t o0 = ob * B;
        int64_t source[64], src_block[64];
        for (int l = 0; l < valid; ++l)
          source[l] = at[size_t(o0 + l)] < 0 ? -1 : whole ? o0 + l : at[size_t(o0 + l)];
        int32_t idx[64 * 64];
        const int nsrc = LaneSources(source, valid, B, src_block, idx);
        float* dst = ep.y + (o0 * Np + p0 * B);
        if (nsrc == 0) {
          std::memset(dst, 0, sizeof(float) * size_t(n * B));
          continue;
        }
        const float* src[64];
        for (int src_i = 0; src_i < nsrc; ++src_i) src[src_i] = ep.y + (src_block[src_i] * Np + p0) * B;
        isa.permute_lanes(src, nsrc, idx, n, int(B), dst);
        isa.epilogue_block(dst, n, int(B), valid, gl, sl, shl, bl,
                           ep.residual ? ep.residual + o0 * Np + p0 * B : nullptr, ep.relu);
      }
    });
    return;
  }
  // No delegate for this subset: our GEMM on NCHW planes, converted on the way in and out.
  const float* planes = AsPlanes(ctx, isa, x, g.C, HW, x_block, Scratch<float, 18>());
  AlignedVec<float>& yp = Scratch<float, 19>();
  yp.assign(size_t(g.O * Np), 0.f);  // inactive outputs stay zero
  std::vector<float> gain(static_cast<size_t>(na)), scale(gain), shift(gain), bias(gain);
  for (int64_t a = 0; a < na; ++a) {
    const int o = outputs[size_t(a)];
    gain[size_t(a)] = ep.gain[o], scale[size_t(a)] = ep.scale[o];
    shift[size_t(a)] = ep.shift[o], bias[size_t(a)] = ep.bias[o];
  }
  RowEpilogue rows{outputs.data(), yp.data(), Np, gain.data(), scale.data(), shift.data(), bias.data()};
  rows.relu = ep.relu;
  if (ep.residual) rows.residual = AsPlanes(ctx, isa, ep.residual, g.O, Np, B, Scratch<float, 20>());
  ConvByPanels(ctx, isa, *Packed(isa, w, g, outputs, in), planes, g, in, rows);
  AllPlanesToBlocked(ctx, isa, yp.data(), g.O, Np, B, ep.y);
}

bool SubsetConv::InPlaceBlocked(OrtKernelContext* ctx, const ConvGeom& g, int64_t x_block,
                                int64_t B, int64_t na, const std::vector<int>& chans) const {
  // RunBlocked's conditions for its in-place form with every input read (InputsToRead), the
  // whole layer's filter being the (all outputs, all inputs) subset's: UseWhole declines it.
  return na == g.O && ReadsAllInputs(g, chans) && x_block != 0 && x_block == B && nchwc_.Block() == B &&
         g.C >= B && nchwc_.Suits(ctx, g.O, g.C);
}

void SubsetConv::RunBlockedSamples(OrtKernelContext* ctx, const IsaKernels& isa, const float* w,
                                   const float* x, const ConvGeom& g, int64_t samples,
                                   const BlockedEpilogue* eps) {
  if (samples < 1) return;
  blocked_runs.fetch_add(samples, std::memory_order_relaxed);
  if (samples > 1) batched_runs.fetch_add(samples, std::memory_order_relaxed);
  // RunBlocked's filter for every output from every input (the subset (all, all), cached).
  RunInPlace(ctx, isa, g, *Filter(ctx, w, g, Indices(g.O), Indices(g.C)), x, samples, eps);
}

void SubsetConv::RunInPlace(OrtKernelContext* ctx, const IsaKernels& isa, const ConvGeom& g,
                            const NchwcFilter& f, const float* xin, int64_t samples,
                            const BlockedEpilogue* eps) const {
  const int64_t Np = g.P(), B = eps[0].B, oblocks = (g.O + B - 1) / B;
  float* const y = eps[0].y;
  const int64_t y_sample = f.O * Np;  // == RoundUp(O, B) * Np: Y's channels, blocked
  nchwc_.Run(ctx, g, f, xin, y, samples);
  // Per sample and block of outputs, the epilogue in place (every output active: each lane's
  // parameters are its channel's).
  ParallelFor(ParallelIfLarge(ctx, samples * g.O * Np), size_t(samples * oblocks), [&](size_t task) {
    const int64_t s = int64_t(task) / oblocks, ob = int64_t(task) % oblocks;
    const BlockedEpilogue& ep = eps[s];
    const int64_t o0 = ob * B;
    const int valid = int(std::min(B, g.O - o0));
    isa.epilogue_block(y + s * y_sample + o0 * Np, Np, int(B), valid, ep.gain + o0, ep.scale + o0,
                       ep.shift + o0, ep.bias + o0, ep.residual ? ep.residual + o0 * Np : nullptr,
                       ep.relu);
  });
}

}  // namespace g2d

// Samples computed in the blocked layout since load (runtimes/ort_layout.py; benchmarks print
// it as the "blocked" path).
extern "C" __attribute__((visibility("default"))) int64_t G2DBlockedLayoutRuns() {
  return g2d::blocked_runs.load(std::memory_order_relaxed);
}

// Samples SubsetConv's in-place blocked form ran in one delegate call with another sample
// (RunBlockedSamples; tests check that the path runs).
extern "C" __attribute__((visibility("default"))) int64_t G2DBatchedBlockedRuns() {
  return g2d::batched_runs.load(std::memory_order_relaxed);
}

// Samples SubsetConv computed as the whole layer instead of repacking a subset (UseWhole;
// tests check that the path runs).
extern "C" __attribute__((visibility("default"))) int64_t G2DWholeLayerRuns() {
  return g2d::whole_runs.load(std::memory_order_relaxed);
}
