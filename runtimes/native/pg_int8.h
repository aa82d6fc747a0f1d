// PG's two integer stages on 8-bit SIMD where AMX is absent: AVX2 (vpmaddubsw) and AVX-512
// VNNI (vpdpbusd on 512-bit vectors; stage 2's dot products take a tap's last 32 channels on
// 256-bit ones).
//
// Both stages are integer sums of activation counts (|count| <= 2^pred_bits - 1 for the MSB
// stage, 2^(abits - pred_bits) - 1 for the LSB stage) times the weights' grid integers q_w
// (|q_w| <= 255). vpmaddubsw / vpdpbusd multiply an UNSIGNED byte by a signed byte; neither
// operand is unsigned here, and q_w needs 9 bits. Two ways round it:
// - AVX2 (both stages) and VNNI's stage-2 dot products: the unsigned operand is |q_w| (u8
//   holds 255) and the signed one the count with q_w's sign applied (vpsignb; on 512-bit
//   vectors, which lack it, a masked byte negation): |q_w| * (sign(q_w) * count) = q_w * count.
// - VNNI's stage 1 (and stage 2 as whole blocks): the count + 128 is the unsigned operand (one
//   xor per k step, shared by the block's rows), q_w = c + 2e is split into two signed bytes
//   (e nonzero only where |q_w| > 127: a short second pass over the listed words), and 128 *
//   sum(q_w) is taken off each output: no instruction per row besides the products (the sign
//   instruction per row and k step had held this stage at the dense fp32 conv's rate).
//
// Exactness bounds (checked per call; PGInt8Fits): AVX2's vpmaddubsw adds two products into a
// SATURATING int16, so 2 * max|q_w| * max|count| <= 32767 (counts up to 64 with 8-bit
// weights); its int16 sums are then accumulated for m k-steps with m * 2 * max|q_w| * max|count|
// <= 32767 and widened to int32 (vpmaddwd with ones). VNNI sums into int32 directly. Every
// int32 total is below K * 255 * max|count| < 2^31 (checked); VNNI's offset partial sums may
// pass 2^31 on the way, but vector adds wrap modulo 2^32, so the total is still exact.
//
// Layout: the activations are written once per sample as int8 in pg_amx.h's PGActLayout
// ([phase][channel / 4][position][4]; strided layers in stride-phase planes, one phase at stride
// 1; pg_conv.cc says which kernel takes them): one 32-byte load is 8
// positions x 4 channels, and a tap (any dilation) is a constant offset, so no im2col. Weights: [output block of 4][k = group * kk + tap][4
// outputs] as int32 words of 4 channels' |q_w| bytes (and a twin of sign bytes; VNNI: the c
// bytes), broadcast per output. A block is 4 output channels x 16 positions: stage 1 in registers
// (VNNI: two output blocks x two blocks per register tile, pg_int8.cc StageVnniTile), the gate, then
// stage 2: nothing if no gate of the block is on; for a few gates on (fewer than a cost
// model in pg_int8.cc puts at break-even: AVX2 about half the block's 64 at 128 channels, 15%
// at 16; VNNI 31% to join a run of whole blocks, 39% alone at 128 channels, 8% and 11% at 16),
// one dot product per gated-on output over the LSB counts stored a second time
// position-major ([position][Cp], 32 channels of a tap per load on AVX2, 64 on VNNI, against
// the output's weight row; a row's dot products run over all blocks of a task at once); else
// the block as in stage 1. Then the
// epilogue (v = scale1 * acc1; y = v + [v > threshold] * (scale2 * acc2), the same float
// operations as the other integer paths, no FMA), written to NCHW output: a plain store per
// vector of 8 consecutive output pixels, lane by lane for vectors crossing a row end
// (pg_int8.cc VecStore). G2D_SECOND_STAGE=sparse|dense forces one kind.
#pragma once
#include "conv_common.h"
#include "pg_amx.h"

#include <cstdint>
#include <memory>
#include <mutex>

namespace g2d {

enum class PGInt8Isa { kNone = 0, kAvx2 = 1, kVnni = 2 };

// Which int8 kernel this process runs for ISA table `isa`: VNNI under the avx512 table, AVX2
// under the avx2 table (or avx512 with G2D_PG_INT8=avx2, for its numerics), none under the
// generic table or with G2D_PG_INT8=0 (tests use it to force the other paths).
PGInt8Isa PGInt8For(const IsaKernels& isa);
const char* PGInt8Name(PGInt8Isa k);

struct PGInt8Weights {
  int64_t O = 0, C = 0, kk = 0;
  int64_t groups = 0;   // channel groups of 4
  int64_t K = 0;        // k steps: groups * kk
  int64_t oblocks = 0;  // output blocks of 4
  int32_t wmax = 0;     // max |q_w|
  AlignedVec<int32_t> mag, sgn;  // [oblock][k][4 outputs]: 4 bytes |q_w| / sign(q_w)
  // The VNNI stage's split of each q_w = c + 2 * e (pg_int8.cc StageVnni): lo, the same index
  // as mag, 4 bytes c; hi, the nonzero e words (k step, word) of output o at [hi_start[o],
  // hi_start[o + 1]) (o = ob * 4 + r, padded to whole blocks); offset[o] = 128 * the sum of
  // output o's q_w (the counts' +128 offset).
  struct HiWord {
    int32_t k, word;
  };
  AlignedVec<int32_t> lo;
  std::vector<HiWord> hi;
  std::vector<uint32_t> hi_start;
  std::vector<int32_t> offset;
  // The same per output row, for stage 2's sparse dot products: [o][tap][Cp] bytes.
  int64_t Cp = 0;  // C rounded up to 32
  AlignedVec<uint8_t> row_mag;
  AlignedVec<int8_t> row_sgn;
  // RunPGInt8's layout and output tables for the last geometry it ran (they depend on the
  // geometry only; building them was ~5% of a 16-channel 32x32 layer's call, perf).
  mutable std::mutex tables_mutex;
  mutable std::shared_ptr<const struct PGInt8Tables> tables;
};

// Packs integer weights q_w[O, C, kh, kw] (|q_w| <= 255) of a group-1 convolution; null if
// the layer does not fit (group != 1 or |q_w| > 255).
std::shared_ptr<const PGInt8Weights> PackPGInt8Weights(const int16_t* w_q, const ConvGeom& g);

// True if kernel k computes both stages exactly for counts up to max_count (bounds above).
bool PGInt8Fits(const PGInt8Weights& w, PGInt8Isa k, int64_t max_count);

// Both stages of every sample of x [N, C, H, W] into y [N, O, OH, OW] (as RunPGAmx), any
// stride; msb_max / lsb_max bound the stages' |counts|.
void RunPGInt8(OrtKernelContext* ctx, PGInt8Isa k, const PGInt8Weights& w, const ConvGeom& g,
               const float* x, const PGSplit& split, int64_t msb_max, int64_t lsb_max,
               float scale1, float scale2, const float* threshold, float* y);

}  // namespace g2d
