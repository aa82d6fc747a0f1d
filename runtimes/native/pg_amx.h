// PG's two integer stages on Intel AMX int8 tiles (Sapphire Rapids and later).
//
// PGConv's stages are integer sums: q_w (|q_w| <= 255) times the MSB or LSB activation counts
// (small integers). AMX multiplies int8 by int8 into exact int32 sums (tdpbssd), at many times
// the fp32 FMA rate, so both stages together cost less than one dense fp32 conv. The results
// are the same integers as the int16 and fp32-delegate paths, scaled and gated by the same
// float formulas, so the output is bit for bit the same (tested).
//
// How 9-bit weights fit int8: when some |q_w| > 127, each weight is split as
// q_w = 2 * hi + lo (hi = floor(q_w / 2) in [-128, 127], lo in {0, 1}) and the activation is
// stored twice, as 2x (multiplied by hi) and as x (multiplied by lo): one GEMM with K doubled,
// whose sum is x * q_w. That needs |2x| <= 127; weights within int8 use one copy.
//
// Layout (no im2col): the activations of one sample are quantized (isa.pg_split) and written
// once as int8 in blocks of 4 channels, [phase][channel / 4][position][4], over the
// zero-padded input split into stride phases. Within a phase a convolution tap is a constant shift of the flattened
// position, so one tile of 16 output positions (consecutive in the flattened, padded grid)
// times 64 channels is a single strided tile load for every tap, in the VNNI layout tdpbssd
// wants. Positions that fall in the padding columns are computed and dropped.
// The weights are packed once: [output tile of 16][tap][K chunk][16 rows][chunk bytes].
//
// Per block of 32 positions x 32 output channels: stage 1 into four int32 tiles, the gate
// decided in registers, stage 2 only if some gate of the block is on, then the epilogue
// writes NCHW output, each tile row as masked vector stores of its runs of consecutive output
// pixels. Blocks are spread over the session's thread pool.
//
// Measured (tools/bench_gated_ops.py --ops pg, 128 ch 28x28, in-kernel cycle counts while
// developing): the tile loop runs at about 2.3x tdpbssd's peak cycles per tile product, and
// about 1.5x with every operand forced into L1, so the rest is waiting for tile loads from
// L2 (software prefetch of the next step's rows gained under 10%, within noise; not kept).
// Only 8 tile registers: 2x2 output tiles leave no room to double-buffer the inputs.
#pragma once
#include "conv_common.h"

#include <cstdint>
#include <memory>

namespace g2d {

// True if the CPU has AMX-INT8, the OS grants this process the tile state, and the
// environment variable G2D_AMX is not "0" (tests use it to compare against the other paths).
bool AmxAvailable();

// The packed weights of one layer (group 1 only).
struct PGAmxWeights {
  int64_t O = 0, C = 0, kk = 0;
  bool split = false;   // weights stored as 2 * hi + lo (some |q_w| > 127)
  int64_t lo_offset = 0;  // channel of the second activation copy (split only)
  int64_t Kc = 0;       // bytes per K chunk (a multiple of 4, at most 64)
  int64_t Cxp = 0;      // stored channels per position (both copies, padded): nk * Kc
  int64_t nk = 0;       // K chunks per tap
  int64_t otiles = 0;   // output tiles of 16 channels
  AlignedVec<int8_t> data;
  // Largest |activation count| the layout holds exactly (63 split, 127 otherwise).
  int64_t MaxActivation() const { return split ? 63 : 127; }
};

// Where one sample's int8 activations live (shared with pg_int8.h): [phase][channel / 4]
// [position][4] bytes over the zero-padded input split into stride phases; a convolution tap
// is the constant byte offset tap_off[t] from an output position's own offset (position * 4)
// within a group's plane. Positions q = oh * Ws + ow (ow < Ws; ow >= OW are padding columns),
// computed in blocks of block_positions.
struct PGActLayout {
  int64_t phases, Ws, nq, blocks, plane_len, groups;
  int64_t PlaneBytes() const { return plane_len * 4; }
  int64_t Bytes() const { return phases * groups * PlaneBytes(); }
  // The word of padded input pixel (hp, wp) (padding included: hp = ih + pt, wp = iw + pl) in
  // channel group `group`, counted from the buffer's start: row hp / sh, column wp / sw of
  // phase (hp % sh, wp % sw). The layout's one definition: both kernels' fills (pg_amx.cc,
  // pg_int8.cc) write through it, and a tap's offset is the word of its (dy * dh, dx * dw).
  int64_t WordOf(const ConvGeom& g, int64_t hp, int64_t wp, int64_t group) const {
    return (((hp % g.sh) * g.sw + wp % g.sw) * groups + group) * plane_len + (hp / g.sh) * Ws +
           wp / g.sw;
  }
};
PGActLayout MakePGActLayout(const ConvGeom& g, int64_t stored_channels, int64_t block_positions,
                            std::vector<int64_t>* tap_off);

// Packs integer weights q_w[O, C, kh, kw] (|q_w| <= 255) of a group-1 convolution.
std::shared_ptr<const PGAmxWeights> PackPGAmxWeights(const int16_t* w_q, const ConvGeom& g);

// PG's activation split (isa.pg_split): q = round_half_even(min(|x| / s, 1) * levels);
// MSB count q >> shift, LSB count q & (2^shift - 1), both times sign(x).
struct PGSplit {
  float s, levels;
  int shift;
};

// Both stages of every sample of x [N, C, H, W] (split into MSB and LSB counts as it is read;
// each count must satisfy |count| <= w.MaxActivation()); writes y [N, O, OH, OW]:
//   v = scale1 * acc1;  y = v + [v > threshold[o]] * (scale2 * acc2).
// The layout and the output tables are built once per call, for all samples.
void RunPGAmx(OrtKernelContext* ctx, const PGAmxWeights& w, const ConvGeom& g, const float* x,
              const PGSplit& split, float scale1, float scale2, const float* threshold,
              float* y);

}  // namespace g2d
