// StreamConv(X, W, B) -> Y: exactly ONNX Conv (any group, bias B) with an optional "Relu"
// (runtimes/OPS.md; reference runtimes/reference.py::stream_conv_reference), for layers
// whose weights outweigh everything else they touch: batch 1 (or a few samples) and output
// maps of a few pixels, the late layers of a CIFAR VGG and of sensAI's fused group models
// (passes/stream_weight_convs.py picks them).
//
// Why: such a layer is mostly a matter of reading its weights. ONNX Runtime's NCHWc conv works
// on one output row at a time and treats the pixels at a border (every pixel of a 2x2 or 4x4
// map) one by one, and ran these layers at 11 GB/s per thread (a chain of sensAI-style
// grouped 3x3 convs, 295 MB of weights at 4x4 and 2x2, Intel Xeon, 2026-12-07). Here the
// weights are packed once as [group][block of vw outputs][C/group * kh * kw][vw] (huge pages;
// the kernels prefetch 4 KiB ahead), and each weight vector is multiplied into up to 16
// output pixels held in registers: one pass over the weights from memory per call, a
// block's weights coming from L2 for the next chunk of pixels (the next samples).
//
// The input side, per chunk of pixels:
// - 3x3, stride 1, dilation 1, padding 1 on a 2x2 or 4x4 map (a CIFAR VGG's last stages; the
//   whole sample within the ISA's register tile): isa.stream_block_3x3 reads the input maps
//   as they are and computes only the products inside the map (the padding is 31% of a 4x4
//   map's taps, 56% of a 2x2's: with them the kernel lost to ONNX Runtime's where the
//   weights stay in cache);
// - the same conv on a map 8, 16 or 32 wide (a CIFAR VGG's 8x8 to 32x32 stages): bands of
//   np_max pixels of a sample (whole rows, or part of a row), isa.stream_block_rows, the rows
//   and columns around the band read from the map itself; a block's weights come from L2
//   (or L1) for every band after the first;
// - anything else: an im2col of up to 16 pixels (cols [K][np] per group and chunk, zeros at
//   the padding; small next to the weights: np values per k against vw * blocks weights),
//   for isa.stream_block, padding products included.
// Zero tails: a block of outputs whose weights are zero from some input channel of its group
// on (sensAI's fused layers pad every group with zero channels at the end: 16% of a fused
// VGG's late weights) is packed and read only up to that channel (StreamWeights::live); a call
// whose input holds an inf or NaN in a left-out channel (0 * inf is NaN in ONNX's Conv) takes
// the plain dense path below.
// A NaN or inf weight would make a padding zero's product NaN where ONNX Runtime's Conv and
// the reference never multiply the padding: W with any non-finite value runs the library's
// plain dense path instead (DenseConvSample, which adds those weights' products over the taps
// that read the input only; checked once for a constant W). Results differ from the reference
// in summation order only. tools/bench_stream_conv.py measures it against ONNX Runtime's conv.
#include "stream_conv.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <new>

#include <sys/mman.h>

namespace g2d {

namespace {

// Calls on the im2col path (0), on DenseConvSample (1: non-finite W, or a non-finite input where
// zero weights were left out), on stream_block_3x3 (2), on stream_block_rows (4); calls that
// left out a zero tail of the weights (3; StreamWeights::live).
std::atomic<int64_t> runs[5];

// Tasks of the im2col fill: this many input channels each.
constexpr int64_t kFillChannels = 64;

int64_t Checked(int64_t a, int64_t b, const char* what) { return BufferElements("StreamConv", what, a, b); }

// The smallest power of two >= n (n <= 16).
int PixelsRounded(int64_t n) {
  int np = 1;
  while (np < n) np *= 2;
  return np;
}

// Storage for the packed weights in 2 MiB pages where the kernel allows it (transparent huge
// pages on request, "madvise" mode): the kernel streams hundreds of megabytes per run, and
// with 4 KiB pages every 64 cache lines cost a TLB miss.
// Below one huge page, plain 64-byte aligned storage.
float* HugeAlloc(int64_t floats) {
  constexpr size_t kHuge = size_t(2) << 20;
  const size_t need = size_t(floats) * sizeof(float);
  const bool huge = need >= kHuge;
  const size_t bytes = huge ? (need + kHuge - 1) / kHuge * kHuge : (need + 63) / 64 * 64;
  void* p = nullptr;
  if (posix_memalign(&p, huge ? kHuge : 64, bytes ? bytes : 64) != 0) throw std::bad_alloc();
  if (huge) madvise(p, bytes, MADV_HUGEPAGE);  // advice only: without THP the pages stay 4 KiB
  return static_cast<float*>(p);
}

std::shared_ptr<const StreamWeights> Pack(const float* w, const ConvGeom& g, int vw) {
  auto p = std::make_shared<StreamWeights>();
  p->vw = vw;
  p->source = w;
  const int64_t og = g.O / g.group, kk = g.kk();
  p->blocks = (og + vw - 1) / vw;
  p->K = g.Cw * kk;
  const int64_t nb = Checked(g.group, p->blocks, "W packed");
  p->live.assign(size_t(nb), 0);
  p->offset.assign(size_t(nb) + 1, 0);
  p->min_live.assign(size_t(g.group), g.Cw);
  for (int64_t gb = 0; gb < nb; ++gb) {  // zero tails: each block's last channel with a nonzero weight
    const int64_t gi = gb / p->blocks, o_end = std::min(og, (gb % p->blocks + 1) * vw);
    int64_t& live = p->live[size_t(gb)];
    for (int64_t o = (gb % p->blocks) * vw; o < o_end; ++o) {
      const float* row = w + (gi * og + o) * p->K;
      int64_t k = p->K;
      while (k > live * kk && row[k - 1] == 0.f) --k;  // -0.f too: a signed zero's products are zeros
      live = std::max(live, (k + kk - 1) / kk);
    }
    p->offset[size_t(gb) + 1] = p->offset[size_t(gb)] + live * kk;
    p->min_live[size_t(gi)] = std::min(p->min_live[size_t(gi)], live);
  }
  p->data.reset(HugeAlloc(Checked(std::max<int64_t>(p->offset.back(), 1), vw, "W packed")));
  for (int64_t gb = 0; gb < nb; ++gb) {
    const int64_t gi = gb / p->blocks, b = gb % p->blocks, words = p->live[size_t(gb)] * kk;
    float* dst = p->data.get() + p->offset[size_t(gb)] * vw;
    for (int l = 0; l < vw; ++l) {
      const int64_t o = b * vw + l;
      const float* src = o < og ? w + (gi * og + o) * p->K : nullptr;
      for (int64_t k = 0; k < words; ++k) dst[k * vw + l] = src ? src[k] : 0.f;
    }
  }
  return p;
}

bool SamePadded3x3(const ConvGeom& g) {  // 3x3, stride 1, dilation 1, padding 1: the output is the map
  return g.kh == 3 && g.kw == 3 && g.sh == 1 && g.sw == 1 && g.dh == 1 && g.dw == 1 && g.pt == 1 &&
         g.pl == 1 && g.pb == 1 && g.pr == 1;
}

// Whether isa.stream_block_3x3 takes the layer: that conv on a 2x2 or 4x4 map, within the
// ISA's register tile.
bool ThreeByThree(const ConvGeom& g, int np_max) {
  return SamePadded3x3(g) && g.H == g.W && (g.H == 2 || g.H == 4) && g.H * g.W <= np_max;
}

// Otherwise, the rows of isa.stream_block_rows' bands where it takes the layer (the same conv
// on a map 8, 16 or 32 wide: bands of np_max / width whole rows, or of np_max columns of a
// row where the row is wider), else 0.
int64_t BandRows(const ConvGeom& g, int np_max) {
  if (!SamePadded3x3(g) || !(g.W == 8 || g.W == 16 || g.W == 32)) return 0;
  const int64_t rows = std::max<int64_t>(1, np_max / g.W);
  return g.H % rows == 0 ? rows : 0;
}

}  // namespace

StreamConvKernel::StreamConvKernel(const OrtApi*, const OrtKernelInfo* info) {
  attrs_ = ReadConvAttrs(info, &attr_error_);
  relu_ = ReadReluAttr(info, &attr_error_);
  w_const_ = InputIsConstant(info, 1);
}

Ort::Status StreamConvKernel::Compute(OrtKernelContext* ctx, const Ort::Custom::Tensor<float>& X,
                                      const Ort::Custom::Tensor<float>& W,
                                      const Ort::Custom::Tensor<float>& B,
                                      Ort::Custom::Tensor<float>& Y) {
  return Guarded("StreamConv", [&] {
    if (!attr_error_.empty()) throw OpError("StreamConv: " + attr_error_);
    const ConvGeom g = MakeGeom("StreamConv", X.Shape(), W.Shape(), attrs_);
    ExpectShape("StreamConv", "B", B.Shape(), {g.O});
    const IsaKernels& isa = BestKernels();
    const int vw = isa.vw, np_max = isa.stream_pixels;
    const int64_t w_size = Checked(g.O, g.Cw * g.kk(), "W");
    const int64_t HW = g.H * g.W, sample = Checked(g.C, HW, "X");
    const float* x = X.Data();
    // The library's plain path (DenseConvSample: no product of the padding, every zero weight
    // multiplied), for what the stream kernels would get wrong: non-finite weights, and a
    // non-finite input in a channel the packed weights left out (zero tails: 0 * inf is NaN).
    auto dense = [&] {
      float* y = Y.Allocate({g.N, g.O, g.OH, g.OW});
      runs[1].fetch_add(1, std::memory_order_relaxed);
      const int64_t P = g.P();
      for (int64_t n = 0; n < g.N; ++n) {
        float* yn = y + n * g.O * P;
        DenseConvSample(ctx, isa, W.Data(), x + n * sample, g, yn);
        for (int64_t o = 0; o < g.O; ++o)
          isa.epilogue_row(yn + o * P, P, 1.f, 1.f, 0.f, B.Data()[o], nullptr, relu_);
      }
    };
    if (!CheckedOnceIfConstant(w_const_, w_finite_, [&] { return AllFinite(isa, W.Data(), w_size); }))
      return dense();
    std::shared_ptr<const StreamWeights> packed;
    if (w_const_) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!packed_ || packed_->vw != vw || packed_->source != W.Data()) packed_ = Pack(W.Data(), g, vw);
      packed = packed_;
    } else {
      packed = Pack(W.Data(), g, vw);
    }
    bool skipped = false;  // zero tails: the channels no block of a group reads, checked finite
    for (int64_t gi = 0; gi < g.group; ++gi) {
      const int64_t from = packed->min_live[size_t(gi)];
      if (from == g.Cw) continue;
      for (int64_t n = 0; n < g.N; ++n)
        if (!AllFinite(isa, x + n * sample + (gi * g.Cw + from) * HW, (g.Cw - from) * HW)) return dense();
      skipped = true;
    }
    if (skipped) runs[3].fetch_add(1, std::memory_order_relaxed);
    float* y = Y.Allocate({g.N, g.O, g.OH, g.OW});
    const int64_t P = g.P(), T = Checked(g.N, P, "N * output pixels");
    if (T == 0 || g.O == 0) return;
    const int64_t kk = g.kk(), K = packed->K, og = g.O / g.group;
    // The input as each chunk of pixels reads it: the input maps themselves where
    // isa.stream_block_3x3 or isa.stream_block_rows takes the geometry (only the products
    // inside the map; each channel's 4x4 map is one cache line, and a group's input stays in
    // L1 beside the weight stream), else an im2col of chunk_px pixels (padding zeros
    // multiplied). Bands of rows read a block's weights once per band, from L2 after the
    // first (a block's weights are live * 9 vectors: 83 KB at 144 channels).
    const bool three = ThreeByThree(g, np_max);
    const int64_t bands = three ? 0 : BandRows(g, np_max);  // rows per band
    runs[three ? 2 : bands ? 4 : 0].fetch_add(1, std::memory_order_relaxed);
    const int64_t chunk_px = three ? P : np_max, chunks = (T + chunk_px - 1) / chunk_px;
    const int64_t chunk_size = three || bands ? 0 : Checked(K, np_max, "im2col");
    AlignedVec<float>& source = Scratch<float, 51>();
    // Where each chunk's pixel j reads tap t (im2col): an offset from its channel's plane in
    // sample 0 (the sample's offset included), -1 at the padding and past the last pixel.
    AlignedVec<int64_t>& at = Scratch<int64_t, 52>();
    const int last_np = PixelsRounded(T - (chunks - 1) * chunk_px);
    auto np_of = [&](int64_t c) { return c + 1 < chunks ? int(chunk_px) : last_np; };
    if (!three && !bands) {
      source.resize(size_t(Checked(Checked(g.group, chunks, "im2col"), chunk_size, "im2col")));
      at.assign(size_t(Checked(Checked(chunks, kk, "taps"), np_max, "taps")), -1);
      for (int64_t q = 0; q < T; ++q) {
        const int64_t n = q / P, p = q % P, oh = p / g.OW, ow = p % g.OW;
        const int64_t c = q / np_max, j = q % np_max;
        for (int64_t t = 0; t < kk; ++t) {
          const int64_t ih = oh * g.sh - g.pt + (t / g.kw) * g.dh, iw = ow * g.sw - g.pl + (t % g.kw) * g.dw;
          if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W)
            at[size_t((c * kk + t) * np_max + j)] = n * sample + ih * g.W + iw;
        }
      }
      const int64_t fill_parts = (g.Cw + kFillChannels - 1) / kFillChannels;
      ParallelFor(ctx, size_t(g.group * chunks * fill_parts), [&](size_t task) {
        const int64_t part = int64_t(task) % fill_parts, gc = int64_t(task) / fill_parts;
        const int64_t gi = gc / chunks, c = gc % chunks;
        float* dst = source.data() + gc * chunk_size;
        const int64_t c_end = std::min(g.Cw, (part + 1) * kFillChannels);
        const int np = np_of(c);
        const int64_t* a = at.data() + c * kk * np_max;
        for (int64_t ci = part * kFillChannels; ci < c_end; ++ci) {
          const float* in = x + (gi * g.Cw + ci) * HW;
          for (int64_t t = 0; t < kk; ++t) {
            float* row = dst + (ci * kk + t) * np;
            const int64_t* src = a + t * np_max;
            for (int j = 0; j < np; ++j) row[j] = src[j] >= 0 ? in[src[j]] : 0.f;
          }
        }
      });
    }
    const float* bias = B.Data();
    ParallelFor(ctx, size_t(g.group * packed->blocks), [&](size_t job) {
      const int64_t gi = int64_t(job) / packed->blocks, b = int64_t(job) % packed->blocks;
      const float* wb = packed->data.get() + packed->offset[job] * vw;
      const int64_t live = packed->live[job];  // input channels read
      const int lanes = int(std::min<int64_t>(vw, og - b * vw));
      alignas(64) float tile[16 * 16];
      // tile pixel j is pixel q0 + j of the batch's N * P (sample-major)
      // The tile is [pixel][lane]; Y wants each output channel's pixels together. Transposed
      // in L1 first, so each channel's pixels of a sample go out as one run (vector stores):
      // 256 scalar stores into Y's lines, which the weight stream has evicted, filled the
      // store buffer while the lines were fetched, 6-9% of the 4x4 and 2x2 layers' time
      // (one-off A/B, 213 MB chains at batch 1 and 4, 2 threads, Intel Xeon, 2026-12-07).
      alignas(64) float col[16 * 16];  // col[l * 16 + j]: lane l, tile pixel j
      auto store = [&](int64_t q0, int64_t count) {
        for (int64_t j = 0; j < count; ++j)
          for (int l = 0; l < lanes; ++l) col[l * 16 + j] = tile[j * vw + l];
        for (int l = 0; l < lanes; ++l) {
          const int64_t o = gi * og + b * vw + l;
          const float bo = bias[o];
          for (int64_t j = 0; j < count;) {
            const int64_t q = q0 + j, n = q / P, p = q % P, run = std::min<int64_t>(P - p, count - j);
            float* dst = y + (n * g.O + o) * P + p;
            const float* src = col + l * 16 + j;
            if (relu_)
              for (int64_t r = 0; r < run; ++r) dst[r] = Relu(src[r] + bo);
            else
              for (int64_t r = 0; r < run; ++r) dst[r] = src[r] + bo;
            j += run;
          }
        }
      };
      if (three) {  // up to np_max / P samples per call, in powers of two
        for (int64_t n = 0; n < g.N;) {
          int m = 1;
          while (m < 4 && 2 * m * P <= np_max && n + 2 * m <= g.N) m *= 2;
          isa.stream_block_3x3(live, wb, x + n * sample + gi * g.Cw * HW, sample, int(g.H), m, tile);
          store(n * P, m * P);
          n += m;
        }
        return;
      }
      if (bands) {  // a band's pixels are consecutive in the sample's map (whole rows, or part of one)
        const int64_t cols = std::min<int64_t>(g.W, np_max);
        for (int64_t n = 0; n < g.N; ++n)
          for (int64_t r = 0; r < g.H; r += bands)
            for (int64_t c0 = 0; c0 < g.W; c0 += cols) {
              const int edges = (r == 0 ? kBandTop : 0) | (r + bands == g.H ? kBandBottom : 0) |
                                (c0 == 0 ? kBandLeft : 0) | (c0 + cols == g.W ? kBandRight : 0);
              isa.stream_block_rows(live, wb, x + n * sample + gi * g.Cw * HW + r * g.W + c0, HW, int(g.W), edges,
                                    tile);
              store(n * P + r * g.W + c0, bands * cols);
            }
        return;
      }
      for (int64_t c = 0; c < chunks; ++c) {
        isa.stream_block(live * kk, wb, source.data() + (gi * chunks + c) * chunk_size, np_of(c), tile);
        store(c * chunk_px, std::min<int64_t>(chunk_px, T - c * chunk_px));
      }
    });
  });
}

}  // namespace g2d

// StreamConv calls so far on the im2col path (path 0), the dense path (1), the 3x3 path (2)
// or the 3x3 bands of rows (4), and those that skipped a zero tail of the weights (3), for
// tests (ctypes).
extern "C" __attribute__((visibility("default"))) int64_t G2DStreamConvRuns(int path) {
  return path >= 0 && path <= 4 ? g2d::runs[path].load(std::memory_order_relaxed) : -1;
}
