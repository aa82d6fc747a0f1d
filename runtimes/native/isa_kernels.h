// Inner loops that depend on the CPU's vector instruction set.
//
// isa_kernels.cc is compiled three times (generic x86-64, AVX2+FMA, AVX-512 with VNNI), each
// copy in its own namespace; conv_common.cc picks one table at load time with a cpuid check
// (__builtin_cpu_supports). So the library runs on any x86-64 CPU and still uses the widest
// vectors the machine has. Everything outside this file is plain portable C++.
//
// Data layouts (shared by all ISAs, parameterised by the table's mr/nr):
//   packed A (weights): panels of `mr` rows; panel i holds, for each k (or k pair), its mr
//     values: a[i*Kp*mr + k*mr + r]. int16 uses pairs: a[(i*Kp/2 + k/2)*mr*2 + r*2 + k%2].
//   packed B (im2col): panels of `nr` columns; b[j*Kp*nr + k*nr + c] (int16: pairs likewise).
//   Kp = K rounded up to the pair size (1 for float, 2 for int16); padding is zero.
#pragma once
#include <cstddef>
#include <cstdint>

namespace g2d {

enum PoolKind { kPoolSum = 0, kPoolMax = 1, kPoolAbsSum = 2, kPoolSquareSum = 3 };

// For each byte value: the positions of its set bits, in order (padded to 8 with zeros), and
// their count: a branch-free list of the gated-on columns (a loop over the set bits
// mispredicts its exit once per byte). gated_columns below (without AVX-512) and PG's int8
// stage 2 (pg_int8.cc). Defined in conv_common.cc.
struct SetBitTable {
  alignas(32) int32_t at[256][8];
  int32_t count[256];
  SetBitTable();
};
extern const SetBitTable kSetBitPositions;

// The sign-magnitude quantizer's parameters as quantize_sign_magnitude takes them: the level of
// a >= 0 is, as the seeds compute it,
//   r(a) = round_half_even(min(a / s, 1) * levels)     (a / s an IEEE division)
// and where the table applies (R >= 0), the kernels find the same r without dividing: an IEEE
// division per element was most of QuantizeActivation's time (perf, PG ResNet-20, AMD EPYC
// Zen 4). r is monotone in a, so r(a) = #{k >= 1 : a >= t_k} with t_k the least float of level
// k; a kernel rounds r0 = min(a * inv, R) (one rounding more than r: never more than one level
// off) and corrects it by lo[r0] = t_r0 and hi[r0] = t_(r0 + 1). MakeQuantLevels
// (conv_common.cc) finds each t_k exactly with the scalar r, once per call; R < 0 (s not finite
// and positive, or more levels than a vector's lanes): the kernels divide.
struct QuantLevels {
  static constexpr int kMaxEntries = 16;  // levels 0 .. R in one AVX-512 vector
  float s = 0.f, levels = 0.f;
  int R = -1;
  float inv = 0.f;                         // levels / s
  alignas(64) float lo[kMaxEntries] = {};  // lo[j] = t_j (lo[0] = 0)
  alignas(64) float hi[kMaxEntries] = {};  // hi[j] = t_(j + 1), NaN for j >= R (no level above)
  alignas(64) float value[kMaxEntries] = {};  // (j / levels) * s: QuantizeActivation's magnitude
};
// `lanes`: the vector width of the kernels that will read the table (IsaKernels::vw).
QuantLevels MakeQuantLevels(float s, float levels, int lanes);

// isa.stream_block_rows' edges: which borders of the map its band touches.
constexpr int kBandTop = 1, kBandBottom = 2, kBandLeft = 4, kBandRight = 8;

struct IsaKernels {
  const char* name;
  int mr, nr;  // fp32 micro-tile: mr rows x nr columns
  int imr, inr;  // int16 micro-tile
  int vw;              // floats per vector register
  int sddmm_max_vecs;  // longest weight chunk sddmm_chunk holds in registers, in vectors
  // C[m_valid x n_valid] (row stride ldc) = (or +=) A_panel(K) * B_panel(K)
  void (*sgemm_micro)(int64_t K, const float* a, const float* b, float* c, int64_t ldc,
                      int m_valid, int n_valid, bool accumulate);
  // The same with B read in place: row k of the panel is the nr floats at base + off[k]
  // (fp32 convolutions over a zero-padded input, strided ones over its phase planes: no
  // im2col copy).
  void (*sgemm_indirect_micro)(int64_t K, const float* a, const float* base, const int64_t* off,
                               float* c, int64_t ldc, int m_valid, int n_valid, bool accumulate);
  // int32 C = int16 A * int16 B; Kp even, counts pairs of k
  void (*igemm_micro)(int64_t Kp, const int16_t* a, const int16_t* b, int32_t* c, int64_t ldc,
                      int m_valid, int n_valid, bool accumulate);
  // fields[t * Lpad + k] = base[off[k] + t] for t < n (n <= nr), k < K; zeros for K <= k <
  // Lpad; rows t >= n are not written: the receptive fields of a panel's columns, one
  // contiguous row each, or a channel-last copy of n pixels (AVX-512: 16 x 16 register
  // transposes, a partial block by masked loads; AVX2: 8 x 8 for whole blocks of 8 columns).
  void (*gather_fields)(const float* base, const int64_t* off, int64_t K, int64_t Lpad,
                        float* fields, int n);
  // Stage 1 epilogue of a gated convolution over one panel [M, nr] (acc's row stride nr; out
  // and gate rows ld apart, so they land in the caller's span buffers directly):
  // out = scale * acc; gate[m, t] = out[m, t] > thr[m] and valid[t] (0/1 bytes); returns
  // the number of gated-on elements.
  int64_t (*gate_panel)(const float* acc, int64_t M, float scale, const float* thr,
                        const uint8_t* valid, float* out, uint8_t* gate, int64_t ld);
  // A gated convolution's dense second stage selected into its outputs, one panel [M, nr]
  // (acc's row stride nr; out and gate rows ld apart): for m < M, t < nr,
  //   out[m * ld + t] += scale * acc[m * nr + t]  where gate[m * ld + t] is 1 (0: unchanged).
  // Branch-free (the gates are unpredictable); the product is rounded before the add on every
  // ISA (no fused multiply-add), so all tables give the same bits.
  void (*select_add)(const float* acc, int64_t M, float scale, const uint8_t* gate, float* out,
                     int64_t ld);
  // Sampled dense-dense product, one weight row chunk at a time: for i < n,
  //   acc_i = lanewise sum over v < nvec of w[v*vw ..] * fields[cols[i]*ld + v*vw ..]
  //   (+ partial[i*vw ..] if accumulate); then out[i] = horizontal sum of acc_i if out is
  //   non-null, else partial[i*vw ..] = acc_i.
  // The nvec (<= sddmm_max_vecs) weight vectors stay in registers while the row's gated-on
  // pixels stream past them, so each weight load serves every gated-on pixel of the panel.
  void (*sddmm_chunk)(int nvec, const float* w, const float* fields, int64_t ld,
                      const int32_t* cols, int n, float* partial, bool accumulate, float* out);
  // out[i] = dot(x, rows[i]) for i < nrows (nrows <= 4); len a multiple of 32, arrays 64-byte
  // padded with zeros.
  void (*idot_rows)(const int16_t* x, const int16_t* const* rows, int nrows, int64_t len,
                    int32_t* out);
  // dst[l][t] = src[t * ld + l] for l < lanes, t < n: a pixel-major blocked tile (e.g. an
  // NCHWc channel block) back to `lanes` separate channel rows (AVX-512: 16 x 16 transposes).
  void (*scatter_lanes)(const float* src, int64_t ld, int64_t n, float* const* dst, int lanes);
  // One (output block, input block) of an NCHWc filter, for taps t < kk:
  //   dst[(t * B + li) * B + lo] = w[out_off[lo] + in_off[li] + t]  for lo < n_out, li < n_in,
  //   0 for the other lanes of the B x B tile.
  // w is OIHW (out_off = o * C * kk, in_off = c * kk). AVX-512 with B = 16: per tap, 16
  // gathers (one per output row) and a 16 x 16 register transpose; reads only the weights
  // the subset needs (nchwc_conv.cc packs FBS's per-input filters with it).
  void (*pack_filter_tile)(const float* w, const int64_t* out_off, int n_out,
                           const int32_t* in_off, int n_in, int64_t kk, int B, float* dst);
  // v[i] = act(g * (s * v[i] + sh) + b (+ r[i] if r)), act = ReLU if relu, for i < n: the
  // RowEpilogue (conv_common.h) over one row, vectorized with the table's ISA.
  void (*epilogue_row)(float* v, int64_t n, float g, float s, float sh, float b, const float* r,
                       bool relu);
  // True if any x[i] != 0 (-0.0 counts as zero, NaN as non-zero, as with `x[i] != 0.f`):
  // which input channels a previous FBS layer switched off.
  bool (*has_nonzero)(const float* x, int64_t n);
  // One channel's n > 0 values reduced for FBSConv's saliency pool: kPoolMax their max, else
  // the sum of x (kPoolSum), |x| (kPoolAbsSum) or x * x (kPoolSquareSum), accumulated in
  // float partials and returned in double (the caller divides by the pooled area). The same
  // result on every ISA (16 lane-wise partials, combined in a fixed order).
  double (*pool_channel)(const float* x, int64_t n, int kind);
  // PG's activation split (runtimes/OPS.md), as integer-valued floats: for i < n,
  //   q = round_half_even(min(|x[i]| / s, 1) * levels)   (q < 2^16)
  //   hb[i] = sign(x[i]) * (q >> shift), lb[i] = sign(x[i]) * (q & (2^shift - 1)).
  // Plain C++ the compiler vectorizes with the table's ISA.
  void (*pg_split)(const float* x, int64_t n, float s, float levels, int shift, float* hb,
                   float* lb);
  // The same split of four channels x[0..3] (n activations each) as int8 counts, four channels
  // to an int32 word (channel c in byte c, two's complement): msb[i] byte c = sign * (q >> shift)
  // and lsb[i] byte c = sign * (q & (2^shift - 1)) of x[c][i] (PG's int8 layout; the caller
  // keeps |count| <= 127). The same values as pg_split, no float planes (AVX2 / AVX-512:
  // intrinsics that pack the counts into words; the generic tier: pg_split's inline helper).
  void (*pg_split_words)(const float* const* x, int64_t n, float s, float levels, int shift,
                         int32_t* msb, int32_t* lsb);
  // Every step-th word of `rows` rows: dst[r * dst_ld + i] = src[r * src_ld + i * step] for
  // i < n, reading no word of a row past its last dealt one (PG's strided layers deal their
  // split rows to the stride phases' planes, and copy stride-1 rows into their padded layout).
  // AVX-512: step 2 by two-source permutes, step 1 by masked copies.
  void (*deal_words)(const int32_t* src, int64_t src_ld, int64_t rows, int64_t n, int64_t step,
                     int32_t* dst, int64_t dst_ld);
  // Sampled dense-dense product read from a channel-last (NHWC) copy of the input, for i < n:
  //   out[i] = sum over t < ntaps, c < len of w[t * len + c] * x[(pix[i] + toff[t]) * ld + c]
  // len a multiple of vw (ld: floats from one pixel to the next). A pixel's field is ntaps
  // contiguous runs of len channels, read in place (no gather); up to eight pixels per pass share
  // each weight load, and the whole dot product stays in registers (no partial sums through
  // memory).
  void (*sparse_dots)(const float* w, int64_t ld, int64_t len, int ntaps, const int64_t* toff,
                      const float* x, const int32_t* pix, int n, float* out);
  // The gated-on columns of gate [M, ld] (bytes 0 / 1), row by row: the k-th (k counting over
  // all rows, m = 0 first) in cols[k], ascending within a row; start[m] = row m's first k,
  // start[M] = the count. cols needs M * n + 16 entries (whole vectors are stored past the
  // last). Branch-free (the gates are unpredictable): AVX-512 compresses 16 columns per
  // instruction, the others go through kSetBitPositions.
  void (*gated_columns)(const uint8_t* gate, int64_t ld, int64_t M, int64_t n, int32_t* cols,
                        int32_t* start);
  // Rows r < H of a zero-padded plane: dst[r * Wp + j] = x[r * W + j] for j < W, then `gap`
  // zeros (a row's right padding and the next one's left), `last_gap` after the last row.
  // Stores nothing else. The stride-1 padded copy of the fp32 convs (conv_common.cc
  // FillSource), whose rows are 8-32 floats in CIFAR networks: masked vectors on AVX-512
  // (the baseline build's 4-float copies took ~5 us of a 16-channel 32x32 CG layer, perf).
  void (*pad_rows)(const float* x, int64_t H, int64_t W, float* dst, int64_t Wp, int64_t gap,
                   int64_t last_gap);
  // One input row's two stride-2 phase rows, padding included: even[0 .. Wp) = at_even zeros,
  // x[0], x[2], ..., then zeros; odd[0 .. Wp) = at_odd zeros, x[1], x[3], ..., then zeros
  // ((n + 1) / 2 and n / 2 values, which the caller fits in Wp; n = 0: two rows of zeros,
  // x unread). The phase planes of the fp32 convs at stride 2 (conv_common.cc FillSource),
  // whose rows are 8-17 floats in CIFAR networks: on AVX-512 a 32-float input row is two
  // loads, two two-register permutes and a few masked stores. In FillSource's own loop, per
  // row four zero runs (which GCC made memset calls) and an SSE2 split took 8.6% of a stride-2
  // ResNet-20 CG layer's samples (perf; the kernel ~65%).
  void (*split_pairs)(const float* x, int64_t n, float* even, float* odd, int64_t at_even,
                      int64_t at_odd, int64_t Wp);
  // A gated convolution's span rows copied to Y, run by run of consecutive output pixels, its
  // post-epilogue fused into the copy (CGConv: no second pass over Y): for m < M, r < nruns,
  // i < len[r]:
  //   y[rows[m] * ld_y + dst[r] + i] = act(epi(src[m * ld + at[r] + i])),
  // epi(v) = 1 * (scale[o] * v + 0) + shift[o] (o = rows[m]: epilogue_row's arithmetic, so the
  // fused form rounds as the separate pass did) where scale (and shift) are non-null, else v;
  // act = ReLU if relu. (The baseline build's 4-float copy loop and the separate pass were ~10%
  // of a 16-channel 32x32 CG layer's call at 20% gated on, perf.)
  void (*store_runs)(const float* src, int64_t ld, int64_t M, const int* rows, const int32_t* at,
                     const int32_t* len, const int64_t* dst, int nruns, const float* scale,
                     const float* shift, bool relu, float* y, int64_t ld_y);
  // max |x[i]| over i < n (0 for n = 0); NaN if some x[i] is NaN. PG's dynamic scale: in
  // pg_conv.cc's baseline build this loop took ~5% of a 16-channel 32x32 layer's call (perf).
  float (*abs_max)(const float* x, int64_t n);

  // ONNX Runtime's NCHWc layout (a block of B <= 64 channels: pixel p, lane l at p * B + l;
  // the layout runtimes/ort_layout.py lets FBSConv and SparseInputConv read and write).
  // For the `valid` channels (lanes) of one block of n pixels: live[l] = has_nonzero of the
  // channel, finite[l] (if non-null) = every value finite, pooled[l] (if non-null) =
  // pool_channel(channel, n, kind) computed with the same float operations in the same order
  // (so a saliency is the same bit for bit in either layout).
  void (*block_channel_stats)(const float* x, int64_t n, int B, int valid, int kind,
                              uint8_t* live, double* pooled, uint8_t* finite);
  // epilogue_row over one block of n pixels with per-lane parameters g, s, sh, b [valid]
  // (r: a residual block in the same layout, or null); lanes valid..B-1 become 0.
  void (*epilogue_block)(float* v, int64_t n, int B, int valid, const float* g, const float* s,
                         const float* sh, const float* b, const float* r, bool relu);
  // dst[p * B + l] = src[s][p * B + idx[s * B + l]] for the source s whose idx is >= 0 at
  // lane l (at most one), 0 if none, for p < n: lanes of up to `nsrc` (<= 64) blocks
  // gathered into one (a subset of channels in, or an active subset out). dst may be one of
  // the sources (each pixel is read whole before it is written; SubsetConv::RunBlocked fills
  // Y in place).
  void (*permute_lanes)(const float* const* src, int nsrc, const int32_t* idx, int64_t n, int B,
                        float* dst);
  // The seed's sign-magnitude quantizer (QuantizeActivation, runtimes/OPS.md) for i < n, in
  // the chain's float operations: y = ((round_half_even(clip(|x| / s, 0, 1) * levels) /
  // levels) * s) * sign(x), sign(0) = 0, NaN propagated; s and levels from q, whose table
  // (where it applies) gives the levels without the divisions, and the same bits.
  void (*quantize_sign_magnitude)(const float* x, int64_t n, const QuantLevels& q, float* y);
  // v[i] = min(v[i], c) for i < n as ONNX Min: NaN in v stays NaN (c is never NaN). A gated
  // conv's fused clamp (PostEpilogue::clip_max).
  void (*clip_max_row)(float* v, int64_t n, float c);

  // StreamConv (stream_conv.cc): one block of vw output channels over np pixels, np a power
  // of two <= stream_pixels (16 on AVX-512's 32 registers, 8 on the 16-register tiers):
  //   out[p * vw + l] = sum over k < K of w[k * vw + l] * cols[k * np + p]   for p < np.
  // Each weight vector is loaded once and multiplied into all np accumulators, which stay in
  // registers over the whole K: a layer whose weights dwarf its few output pixels reads
  // them from memory once. Fused multiply-adds where the tier has them.
  int stream_pixels;
  void (*stream_block)(int64_t K, const float* w, const float* cols, int np, float* out);
  // The same for `samples` samples of a 3x3 conv with stride 1, dilation 1 and padding 1 on
  // a side x side map (side 2 with 1, 2 or 4 samples, side 4 with 1; samples * side * side
  // <= stream_pixels), reading the input maps themselves (sample m's channel c at
  // x + m * stride + c * side^2, as the layer's NCHW input holds them) instead of an im2col:
  // for m < samples, p < side^2,
  //   out[(m * side^2 + p) * vw + l] = sum over c < C, taps t whose input is inside the map of
  //                                    w[(c * 9 + t) * vw + l] * (sample m's input there).
  // Only those products: a 4x4 map's border taps are 31% of all, a 2x2 map's 56%, which the
  // im2col path multiplies by its zeros (the padding is not multiplied, as ONNX's Conv).
  void (*stream_block_3x3)(int64_t C, const float* w, const float* x, int64_t stride, int side,
                           int samples, float* out);
  // The same conv on a map `width` wide (8, 16 or 32), one band of stream_pixels pixels of
  // one sample: stream_pixels / width whole rows where a row fits, else stream_pixels columns
  // of one row. x is the band's first pixel in channel 0's map (channel c at x + c * plane);
  // edges (kBand* bits): the band holds the map's first row / last row / first column /
  // last column, beyond which is padding, never read; every other neighbouring row and
  // column is read from the map. Out: the band's pixels in row-major order. Only the
  // products inside the map, as above.
  void (*stream_block_rows)(int64_t C, const float* w, const float* x, int64_t plane, int width, int edges,
                            float* out);
};

namespace isa_generic { extern const IsaKernels kKernels; }
namespace isa_avx2 { extern const IsaKernels kKernels; }
namespace isa_avx512 { extern const IsaKernels kKernels; }

// The widest table this CPU supports (G2D_ISA=generic|avx2|avx512 forces one, for tests).
const IsaKernels& BestKernels();

}  // namespace g2d
