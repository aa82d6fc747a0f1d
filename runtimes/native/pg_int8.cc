// See pg_int8.h.
//
// As in pg_amx.cc, only the functions marked G2D_INT8_AVX2 / G2D_INT8_VNNI use those
// instructions (target attributes, not file-wide -m flags: the inline and template code the
// library shares must stay baseline x86-64). The epilogue is compiled for AVX2 without FMA so
// that v + scale2 * acc2 is a rounded product then a rounded sum, as on the other paths.
#include "pg_int8.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 9)
#define G2D_HAVE_INT8 1
#include <immintrin.h>
#define G2D_INT8_AVX2 __attribute__((target("avx2")))
#define G2D_INT8_VNNI __attribute__((target("avx2,avx512f,avx512bw,avx512vl,avx512vnni")))
#else
#define G2D_HAVE_INT8 0
#endif

namespace g2d {

namespace {

constexpr int kR = 4;                  // output channels per block (StageAvx2 names 4 rows)
constexpr int kVec = 8;                // positions per vector (int32 lanes of a ymm)
constexpr int kP = 2;                  // position vectors per block
constexpr int64_t kBlock = kVec * kP;  // positions per block
constexpr int64_t kBlocksPerTask = 8;
// Stage 2 of a block runs as dot products when that costs less than the whole block. Cost
// model (cycles, AVX2 on Zen 3, fitted to tools/bench_gated_ops.py and perf runs of 16-128
// channel layers): a block costs kBlockStep per k step (K = C/4 * kk steps for its 64
// outputs); a dot product kDotStep per 32 channels of a tap plus kDotFixed (horizontal sum,
// gathering the gates). At 128 channels 3x3 the model puts a dot product at about 1.85x its
// share of the block (break-even near half the block on; fitted with one position per dot:
// sharing each weight load among 4 positions since made dot products as cheap as the
// whole block up to ~65% on, so the model errs toward whole blocks, within a few percent
// there); at 16 channels (one 32-channel step half empty) about 6.5x (break-even near 15%).
constexpr double kBlockStep = 12.0, kDotStep = 2.1, kDotFixed = 25.0;
// VNNI's whole block (one vpdpbusd per row and k step) costs less per k step, relative to its
// dot products, than AVX2's, and a run of 2-4 whole blocks on one tile (RunBlocks) less than a
// block alone: a block runs whole when it joins a run with more than kBlockStepVnni's break-even
// on, or alone with more than kBlockStepVnniAlone's (model: 20 and 25 of 64 at 128 channels 3x3).
// Fitted in one process, two builds' sessions alternating run by run (G2D_AMX=0, Intel Xeon
// Emerald Rapids, 1 thread, 128 ch 28x28, 200 runs per fraction), once stage 2's dot products
// ran over a task's blocks (RunBlocks): one threshold of 5.5 (the value before) against 9.0,
// 9.0 was 7-12% faster at 20-30% on and 6-7% slower at 40-50% (it broke runs); 7.0 / 9.0 as here
// was within 1-2% of 9.0 at 15-40% and 8% faster at 50%. The AVX2 figures are 54%, 43% and 15%
// at 128 ch 28x28, 64 ch 8x8 and 16 ch 32x32 (one threshold: no runs there).
constexpr double kBlockStepVnni = 7.0, kBlockStepVnniAlone = 9.0;
// Layers below this many multiply-adds per stage run on the calling thread (waking a pool
// thread costs more than it takes over).
constexpr double kParallelMacs = double(1 << 20);
std::atomic<int64_t> int8_runs{0};

// Where the 8 positions of one vector go in the output plane: all 8 lanes to consecutive
// output pixels (one plain store), none (padding columns, the tail), or some, lane by lane
// through the output index. Masked stores for the partial vectors (those crossing a row end)
// were slower: vmaskmovps stores are microcoded on AMD Zen, and the lane-by-lane stores took
// the "store" stage (G2D_STAGE_TIMES) of ResNet-20's PG layers from 9.0 to 6.6 us at 16
// channels 32x32 and from 4.6 to 3.0 at 64 channels 8x8 (AMD EPYC Zen 4, 1 thread).
struct VecStore {
  enum Kind : int32_t { kNone = 0, kFull = 1, kLanes = -1 } kind;
  int32_t base;  // kFull: output index of lane 0
};

// A chunk of a stage-2 dot product: its bytes' offsets in act2_rows from the position's own
// (x) and in the weight row (w).
struct ChunkOff {
  int64_t x, w;
};

struct Job;
using DotFn = void (*)(const Job&, int64_t o, const int32_t* q, int n, int32_t* out);

struct Job {
  const PGInt8Weights* w;
  const int8_t *act1, *act2;
  const int8_t* act2_rows;   // LSB counts position-major: [position][Cp]
  const int64_t* row_off;    // per tap: byte offset in act2_rows from a position's own
  const ChunkOff* chunks;    // VNNI dot products: each tap's 64-channel chunks, in order
  int64_t nchunks;
  const ChunkOff* tails;     // and each tap's last 32 channels where Cp % 64 == 32
  int64_t ntails;
  DotFn dot;
  int sparse_max;            // most gates on for a block to stay out of a run of whole blocks
                             // (VNNI; AVX2: the only threshold, no runs)
  int sparse_max_alone;      // most gates on for dot products outside a run
  const int64_t* koff;       // per k step: byte offset of (group, tap) from a position's own
  const int32_t* out_index;  // per position: output pixel, -1 for none
  const int32_t* valid;      // per position: -1 if an output pixel, else 0
  const VecStore* stores;    // per position vector
  int64_t P;
  int m1, m2;  // AVX2: k steps per int16 accumulation, per stage
  float scale1, scale2;
  const float* thr;
  float* y;
};

using StageFn = void (*)(const Job&, const int8_t* act, int64_t ob, int64_t q0, int m,
                         int32_t* sums);

#if G2D_HAVE_INT8

// One stage of a block: sums[r * kBlock + i] = the int32 sum of output ob * kR + r at position
// q0 + i. int16 partial sums over m k-steps (no saturation: PGInt8Fits), then widened.
G2D_INT8_AVX2 void StageAvx2(const Job& j, const int8_t* act, int64_t ob, int64_t q0, int m,
                             int32_t* sums) {
  const PGInt8Weights& w = *j.w;
  const int32_t* wm = w.mag.data() + ob * w.K * kR;
  const int32_t* ws = w.sgn.data() + ob * w.K * kR;
  const int8_t* base = act + q0 * 4;
  const __m256i ones = _mm256_set1_epi16(1);
  // The int32 totals live in `sums` (memory), not in registers: 8 int16 accumulators, the two
  // activation vectors and the broadcasts fill the 16 registers; with the totals in registers
  // too, the compiler spilled an int16 accumulator and the loop waited on store forwarding.
  for (int i = 0; i < kR * kBlock; i += kVec)
    _mm256_store_si256(reinterpret_cast<__m256i*>(sums + i), _mm256_setzero_si256());
  for (int64_t k0 = 0; k0 < w.K; k0 += m) {
    const int64_t k1 = std::min<int64_t>(w.K, k0 + m);
    // Named accumulators, one output row at a time (arrays of them made GCC shuffle and
    // spill registers in this loop).
    __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00,
            a21 = a00, a30 = a00, a31 = a00;
    for (int64_t k = k0; k < k1; ++k) {
      const int8_t* xa = base + j.koff[k];
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa + 32));
      const int32_t* mk = wm + k * kR;
      const int32_t* sk = ws + k * kR;
#define G2D_PG_INT8_ROW(r)                                                               \
  {                                                                                      \
    const __m256i a = _mm256_set1_epi32(mk[r]), s = _mm256_set1_epi32(sk[r]);            \
    a##r##0 = _mm256_add_epi16(a##r##0, _mm256_maddubs_epi16(a, _mm256_sign_epi8(x0, s))); \
    a##r##1 = _mm256_add_epi16(a##r##1, _mm256_maddubs_epi16(a, _mm256_sign_epi8(x1, s))); \
  }
      G2D_PG_INT8_ROW(0)
      G2D_PG_INT8_ROW(1)
      G2D_PG_INT8_ROW(2)
      G2D_PG_INT8_ROW(3)
#undef G2D_PG_INT8_ROW
    }
    const __m256i acc[kR][kP] = {{a00, a01}, {a10, a11}, {a20, a21}, {a30, a31}};
    for (int r = 0; r < kR; ++r)
      for (int p = 0; p < kP; ++p) {
        __m256i* total = reinterpret_cast<__m256i*>(sums + r * kBlock + p * kVec);
        _mm256_store_si256(total, _mm256_add_epi32(_mm256_load_si256(total),
                                                   _mm256_madd_epi16(acc[r][p], ones)));
      }
  }
}

// acc + the products of x's unsigned bytes with the signed bytes of *w (a 4-byte word
// broadcast from memory), as vpdpbusd. Inline assembly: GCC 12's intrinsic copied each
// accumulator to another register and back around every product (two vector moves per
// vpdpbusd in StageVnni's loop, perf), and the broadcast rides in the instruction.
G2D_INT8_VNNI inline __m512i DpbusdBroadcast(__m512i acc, __m512i x, const int32_t* w) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(x), "m"(*w));
  return acc;
}

// StageAvx2's stage with vpdpbusd on 512-bit vectors (VNNI's stage 2 in whole blocks; its stage 1
// runs on StageVnniTile), one vector the block's 16 positions x 4 channels, in the other operand
// order: the counts are the unsigned operand and q_w the signed one,
// so no per-row sign instruction is needed (AVX-512 has no vpsignb: a masked negation per row and k
// step held this stage at the dense fp32 conv's rate, forced G2D_AMX=0 on an Intel Xeon). The
// counts are signed: each byte is offset by 128 (x ^ 0x80 = x + 128, one instruction per k step for
// all four rows), and 128 * sum(q_w) is taken off each output's total (w.offset). q_w needs 9 bits:
// it is split as c + 2 * e with c in [-128, 127] (PackPGInt8Weights); the e words, nonzero only
// where |q_w| > 127 (a few percent of the weights), are listed per output block and row (w.hi) and
// added in a second, short pass. All sums wrap modulo 2^32 and the result fits in int32
// (PGInt8Fits), so the total is exact.
G2D_INT8_VNNI void StageVnni(const Job& j, const int8_t* act, int64_t ob, int64_t q0, int,
                             int32_t* sums) {
  static_assert(kBlock == 16, "one 512-bit vector of int32 sums per output row");
  const PGInt8Weights& w = *j.w;
  const int32_t* wc = w.lo.data() + ob * w.K * kR;
  const int8_t* base = act + q0 * 4;
  const __m512i flip = _mm512_set1_epi8(char(0x80)), zero = _mm512_setzero_si512();
  __m512i e0 = zero, e1 = zero, e2 = zero, e3 = zero, o0 = zero, o1 = zero, o2 = zero, o3 = zero;
  // Two accumulator sets (even and odd k) so that no vpdpbusd waits on the previous one.
#define G2D_PG_VNNI_STEP(k, a0, a1, a2, a3)                                          \
  {                                                                                \
    const __m512i x = _mm512_xor_si512(_mm512_loadu_si512(base + j.koff[k]), flip); \
    const int32_t* ck = wc + (k) * kR;                                             \
    a0 = DpbusdBroadcast(a0, x, ck);                                               \
    a1 = DpbusdBroadcast(a1, x, ck + 1);                                           \
    a2 = DpbusdBroadcast(a2, x, ck + 2);                                           \
    a3 = DpbusdBroadcast(a3, x, ck + 3);                                           \
  }
  int64_t k = 0;
  for (; k + 2 <= w.K; k += 2) {
    G2D_PG_VNNI_STEP(k, e0, e1, e2, e3)
    G2D_PG_VNNI_STEP(k + 1, o0, o1, o2, o3)
  }
  if (k < w.K) G2D_PG_VNNI_STEP(k, e0, e1, e2, e3)
#undef G2D_PG_VNNI_STEP
  // The e words, row r's at [hi_start[ob * kR + r], hi_start[ob * kR + r + 1]), one word of
  // each row per round, each row into its own register: four independent chains (indexing an
  // array of accumulators by the word's row kept them in memory, a store-to-load round trip
  // per word: a quarter of the stage's time, perf).
  const PGInt8Weights::HiWord* h = w.hi.data();
  const uint32_t* at = w.hi_start.data() + ob * kR;
  const PGInt8Weights::HiWord *p0 = h + at[0], *p1 = h + at[1], *p2 = h + at[2], *p3 = h + at[3];
  __m512i h0 = zero, h1 = zero, h2 = zero, h3 = zero;
#define G2D_PG_VNNI_HI(acc, p, stop)                                                         \
  if (p < stop) {                                                                            \
    acc = DpbusdBroadcast(acc, _mm512_xor_si512(_mm512_loadu_si512(base + j.koff[p->k]), flip), \
                          &p->word);                                                         \
    ++p;                                                                                     \
    more = true;                                                                             \
  }
  for (bool more = true; more;) {
    more = false;
    G2D_PG_VNNI_HI(h0, p0, h + at[1])
    G2D_PG_VNNI_HI(h1, p1, h + at[2])
    G2D_PG_VNNI_HI(h2, p2, h + at[3])
    G2D_PG_VNNI_HI(h3, p3, h + at[4])
  }
#undef G2D_PG_VNNI_HI
  const __m512i hi[kR] = {h0, h1, h2, h3};
  const __m512i acc[kR] = {_mm512_add_epi32(e0, o0), _mm512_add_epi32(e1, o1),
                           _mm512_add_epi32(e2, o2), _mm512_add_epi32(e3, o3)};
  for (int r = 0; r < kR; ++r) {
    const __m512i total = _mm512_add_epi32(acc[r], _mm512_slli_epi32(hi[r], 1));
    _mm512_storeu_si512(sums + r * kBlock,
                        _mm512_sub_epi32(total, _mm512_set1_epi32(w.offset[size_t(ob * kR + r)])));
  }
}

// Stage 1 on VNNI (and stage 2 in whole blocks: RunBlocks, on act2) for NOB consecutive output
// blocks and NV consecutive position blocks, from output block ob and position q0: a register tile of NOB * kR x NV accumulators, each k step's
// weight words broadcast into registers once, each position vector loaded once for all rows.
// Output block ob + i, position block v: sums[(i * kTileStride + v) * kR * kBlock + r * kBlock +
// t], as StageVnni writes one block. Why: StageVnni's 4 x 1 tile loads a broadcast word per
// product and a 64-byte position vector per four, and every output block streams the whole
// layer's counts from L2 again; with vpdpbusd at two per cycle (as vfmadd231ps: Intel Xeon
// Emerald Rapids, microbenchmark) its stage 1 ran at ~150 G multiply-adds/s, ~40% of that rate
// (G2D_STAGE_TIMES, 128 ch 28x28, G2D_AMX=0, 1 thread).
constexpr int64_t kTileStride = kBlocksPerTask;  // position blocks per output block in sums

G2D_INT8_VNNI inline __m512i Dpbusd(__m512i acc, __m512i x, __m512i w) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));  // see DpbusdBroadcast
  return acc;
}

template <int NOB, int NV>
G2D_INT8_VNNI void StageVnniTile(const Job& j, const int8_t* act, int64_t ob, int64_t q0,
                                 int32_t* sums) {
  static_assert(kBlock == 16 && NOB * kR * NV <= 16, "one 512-bit vector per row and block");
  constexpr int kRows = NOB * kR;
  const PGInt8Weights& w = *j.w;
  const int32_t* wc[NOB];
  for (int i = 0; i < NOB; ++i) wc[i] = w.lo.data() + (ob + i) * w.K * kR;
  const int8_t* base = act + q0 * 4;
  const __m512i flip = _mm512_set1_epi8(char(0x80)), zero = _mm512_setzero_si512();
  __m512i acc[kRows][NV];
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = zero;
  for (int64_t k = 0; k < w.K; ++k) {
    const int8_t* xk = base + j.koff[k];
    __m512i x[NV];
    for (int v = 0; v < NV; ++v) x[v] = _mm512_xor_si512(_mm512_loadu_si512(xk + 64 * v), flip);
    for (int r = 0; r < kRows; ++r) {
      const __m512i wr = _mm512_set1_epi32(wc[r / kR][k * kR + r % kR]);
      for (int v = 0; v < NV; ++v) acc[r][v] = Dpbusd(acc[r][v], x[v], wr);
    }
  }
  auto sums_at = [&](int r, int v) {
    return sums + ((r / kR) * kTileStride + v) * kR * kBlock + (r % kR) * kBlock;
  };
  for (int r = 0; r < kRows; ++r) {
    const __m512i offset = _mm512_set1_epi32(w.offset[size_t(ob * kR + r)]);
    for (int v = 0; v < NV; ++v)
      _mm512_storeu_si512(sums_at(r, v), _mm512_sub_epi32(acc[r][v], offset));
  }
  // The e words (StageVnni), added to the stored sums, output block by output block: one word
  // of each of its four rows per round, so that the rows' chains of vpdpbusd are independent
  // and their accumulators stay in registers (all the tile's rows at once spilled them: a
  // store and a load around every product).
  const PGInt8Weights::HiWord* h = w.hi.data();
  for (int i = 0; i < NOB; ++i) {
    const PGInt8Weights::HiWord *p[kR], *stop[kR];
    __m512i hi[kR][NV];
#pragma GCC unroll 4
    for (int r = 0; r < kR; ++r) {
      p[r] = h + w.hi_start[size_t((ob + i) * kR + r)];
      stop[r] = h + w.hi_start[size_t((ob + i) * kR + r + 1)];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) hi[r][v] = zero;
    }
    for (bool more = true; more;) {
      more = false;
#pragma GCC unroll 4
      for (int r = 0; r < kR; ++r) {
        if (p[r] != stop[r]) {
          const int8_t* xk = base + j.koff[p[r]->k];
          const __m512i word = _mm512_set1_epi32(p[r]->word);
#pragma GCC unroll 4
          for (int v = 0; v < NV; ++v)
            hi[r][v] =
                Dpbusd(hi[r][v], _mm512_xor_si512(_mm512_loadu_si512(xk + 64 * v), flip), word);
          ++p[r];
          more = true;
        }
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < kR; ++r)
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) {
        int32_t* at = sums_at(i * kR + r, v);
        const __m512i twice = _mm512_slli_epi32(hi[r][v], 1);
        _mm512_storeu_si512(at, _mm512_add_epi32(_mm512_loadu_si512(at), twice));
      }
  }
}

// Stage 1 of output blocks ob .. ob + nob - 1 (nob <= kTileOBlocks) at position blocks b0 ..
// b1 - 1 (at most kTileStride) into sums (StageVnniTile's layout), two position blocks per tile
// where there are two: 8 x 2 vectors (the fastest of 4 x 4, 8 x 2 and 16 x 1, G2D_STAGE_TIMES
// stage1 595 / 580 / 720 us, 128 ch 28x28, G2D_AMX=0, Intel Xeon Emerald Rapids, 1 thread).
constexpr int kTileOBlocks = 2;
G2D_INT8_VNNI void StageVnniChunk(const Job& j, int64_t ob, int nob, int64_t b0, int64_t b1,
                                  int32_t* sums) {
  for (int64_t b = b0; b < b1; b += 2) {
    int32_t* at = sums + (b - b0) * kR * kBlock;
    const int64_t q0 = b * kBlock;
    if (b + 2 <= b1)
      (nob == 2 ? StageVnniTile<2, 2> : StageVnniTile<1, 2>)(j, j.act1, ob, q0, at);
    else
      (nob == 2 ? StageVnniTile<2, 1> : StageVnniTile<1, 1>)(j, j.act1, ob, q0, at);
  }
}

// The sum of the 8 int32 lanes of v (the end of each stage-2 dot product, both kernels).
G2D_INT8_AVX2 inline int32_t SumLanes(__m256i v) {
  __m128i h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4e));
  h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xb1));
  return _mm_cvtsi128_si32(h);
}

// Stage 2 of output o at positions q[0 .. N-1]: dot products of o's weight row with the LSB
// counts of each position's receptive field, 32 channels of a tap per step; each weight load
// serves the N positions (int16 partial sums as StageAvx2).
template <int N>
G2D_INT8_AVX2 inline void DotsAvx2(const Job& j, int64_t o, const int32_t* q, int32_t* out) {
  const PGInt8Weights& w = *j.w;
  const uint8_t* wm = w.row_mag.data() + o * w.kk * w.Cp;
  const int8_t* ws = w.row_sgn.data() + o * w.kk * w.Cp;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[N], total[N];
  for (int i = 0; i < N; ++i) acc[i] = total[i] = _mm256_setzero_si256();
  int steps = 0;
  for (int64_t t = 0; t < w.kk; ++t) {
    const int8_t* xt = j.act2_rows + j.row_off[t];
    for (int64_t c = 0; c < w.Cp; c += 32, wm += 32, ws += 32) {
      const __m256i a = _mm256_load_si256(reinterpret_cast<const __m256i*>(wm));
      const __m256i s = _mm256_load_si256(reinterpret_cast<const __m256i*>(ws));
      for (int i = 0; i < N; ++i) {
        const __m256i x =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xt + q[i] * w.Cp + c));
        acc[i] = _mm256_add_epi16(acc[i], _mm256_maddubs_epi16(a, _mm256_sign_epi8(x, s)));
      }
      if (++steps == j.m2) {
        for (int i = 0; i < N; ++i) {
          total[i] = _mm256_add_epi32(total[i], _mm256_madd_epi16(acc[i], ones));
          acc[i] = _mm256_setzero_si256();
        }
        steps = 0;
      }
    }
  }
  for (int i = 0; i < N; ++i)
    out[i] = SumLanes(_mm256_add_epi32(total[i], _mm256_madd_epi16(acc[i], ones)));
}

// One 64-channel chunk of N dot products (DotsVnni): the counts negated where q_w < 0 (a masked
// byte negation, its mask the sign bytes' top bits), times |q_w|.
template <int N>
G2D_INT8_VNNI inline void DotChunk(const uint8_t* wm, const int8_t* ws, const int8_t* const* xq,
                                   const ChunkOff& at, __m512i* acc) {
  const __m512i zero = _mm512_setzero_si512();
  const __m512i m = _mm512_loadu_si512(wm + at.w);
  const __mmask64 neg = _mm512_movepi8_mask(_mm512_loadu_si512(ws + at.w));
  for (int i = 0; i < N; ++i) {
    const __m512i x = _mm512_loadu_si512(xq[i] + at.x);
    acc[i] = _mm512_dpbusd_epi32(acc[i], m, _mm512_mask_sub_epi8(x, neg, zero, x));
  }
}

// Stage 2 of output o at positions q[0 .. N-1]: 64 channels of a tap per step on 512-bit
// vectors (Job::chunks), a last 32 on 256-bit ones (Job::tails, vpsignb for the sign). Here the
// counts stay the signed operand, q_w's sign applied to them: each weight load serves N
// positions, and the offset form of StageVnni would need a second product for the e bytes of
// most rows. N = 8 or 4: the lane sums of all N positions in one hadd tree.
template <int N>
G2D_INT8_VNNI inline void DotsVnni(const Job& j, int64_t o, const int32_t* q, int32_t* out) {
  const PGInt8Weights& w = *j.w;
  const uint8_t* wm = w.row_mag.data() + o * w.kk * w.Cp;
  const int8_t* ws = w.row_sgn.data() + o * w.kk * w.Cp;
  const int8_t* xq[N];
  for (int i = 0; i < N; ++i) xq[i] = j.act2_rows + int64_t(q[i]) * w.Cp;
  const __m512i zero = _mm512_setzero_si512();
  __m512i wide[N];
  __m256i total[N];
  for (int i = 0; i < N; ++i) {
    wide[i] = zero;
    total[i] = _mm256_setzero_si256();
  }
  for (int64_t k = 0; k < j.nchunks; ++k) DotChunk<N>(wm, ws, xq, j.chunks[k], wide);
  for (int64_t t = 0; t < j.ntails; ++t) {  // Cp % 64 == 32: each tap's last 32 channels
    const ChunkOff& at = j.tails[t];
    const __m256i m = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wm + at.w));
    const __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + at.w));
    for (int i = 0; i < N; ++i) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq[i] + at.x));
      total[i] = _mm256_dpbusd_epi32(total[i], m, _mm256_sign_epi8(x, s));
    }
  }
  __m256i y[N];  // each position's sums folded to 8 lanes
  for (int i = 0; i < N; ++i)
    y[i] = _mm256_add_epi32(total[i], _mm256_add_epi32(_mm512_castsi512_si256(wide[i]),
                                                       _mm512_extracti64x4_epi64(wide[i], 1)));
  if constexpr (N == 8 || N == 4) {  // the lanes summed for all positions at once (hadd tree)
    __m256i h[N / 2];
    for (int i = 0; i < N / 2; ++i) h[i] = _mm256_hadd_epi32(y[2 * i], y[2 * i + 1]);
    const __m256i lo = _mm256_hadd_epi32(h[0], h[1]);  // per 128-bit half: positions 0-3
    if constexpr (N == 8) {
      const __m256i hi = _mm256_hadd_epi32(h[2], h[3]);  // positions 4-7
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                          _mm256_add_epi32(_mm256_permute2x128_si256(lo, hi, 0x20),
                                           _mm256_permute2x128_si256(lo, hi, 0x31)));
    } else {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out),
                       _mm_add_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1)));
    }
  } else {
    for (int i = 0; i < N; ++i) out[i] = SumLanes(y[i]);
  }
}

// Stage 2 of output o at n positions q (out[i] for q[i]), four at a time.
G2D_INT8_AVX2 void DotAvx2(const Job& j, int64_t o, const int32_t* q, int n, int32_t* out) {
  for (; n >= 4; n -= 4, q += 4, out += 4) DotsAvx2<4>(j, o, q, out);
  if (n == 3) DotsAvx2<3>(j, o, q, out);
  if (n == 2) DotsAvx2<2>(j, o, q, out);
  if (n == 1) DotsAvx2<1>(j, o, q, out);
}

G2D_INT8_VNNI void DotVnni(const Job& j, int64_t o, const int32_t* q, int n, int32_t* out) {
  for (; n >= 8; n -= 8, q += 8, out += 8) DotsVnni<8>(j, o, q, out);
  if (n >= 4) {
    DotsVnni<4>(j, o, q, out);
    n -= 4, q += 4, out += 4;
  }
  if (n == 3) DotsVnni<3>(j, o, q, out);
  if (n == 2) DotsVnni<2>(j, o, q, out);
  if (n == 1) DotsVnni<1>(j, o, q, out);
}

// The gates of row r's position vector p of the block at q0 of output block ob (v: its stage-1
// values, scale1 * s1).
G2D_INT8_AVX2 inline __m256 BlockGate(const Job& j, __m256 sc1, const int32_t* s1, int64_t ob,
                                      int64_t q0, int r, int p, __m256* v) {
  *v = _mm256_mul_ps(sc1, _mm256_cvtepi32_ps(_mm256_load_si256(
                              reinterpret_cast<const __m256i*>(s1 + r * kBlock + p * kVec))));
  const __m256 valid = _mm256_castsi256_ps(
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(j.valid + q0 + p * kVec)));
  return _mm256_and_ps(valid, _mm256_cmp_ps(*v, _mm256_set1_ps(j.thr[ob * kR + r]), _CMP_GT_OQ));
}

// How many gates of that block are on (its first `rows` rows), as RunBlocks counts them.
G2D_INT8_AVX2 int CountOn(const Job& j, const int32_t* s1, int64_t ob, int64_t q0, int rows) {
  const __m256 sc1 = _mm256_set1_ps(j.scale1);
  int on = 0;
  for (int r = 0; r < rows; ++r)
    for (int p = 0; p < kP; ++p) {
      __m256 v;
      const __m256 gate = BlockGate(j, sc1, s1, ob, q0, r, p, &v);
      on += __builtin_popcount(unsigned(_mm256_movemask_ps(gate)));
    }
  return on;
}

// The end of block b of output block ob: stage 2's sums (s2, null where no gate is on) added
// where the gate is on (mul then add, no FMA: this function's target has none), the store.
G2D_INT8_AVX2 inline void FinishBlock(const Job& j, int64_t ob, int64_t b, int rows,
                                      __m256 (&v)[kR][kP], const __m256 (&gate)[kR][kP],
                                      const int32_t* s2) {
  const int64_t q0 = b * kBlock;
  if (s2) {
    const __m256 sc2 = _mm256_set1_ps(j.scale2);
    for (int r = 0; r < rows; ++r)
      for (int p = 0; p < kP; ++p) {
        const __m256i sums =
            _mm256_load_si256(reinterpret_cast<const __m256i*>(s2 + r * kBlock + p * kVec));
        const __m256 add = _mm256_mul_ps(sc2, _mm256_cvtepi32_ps(sums));
        v[r][p] = _mm256_add_ps(v[r][p], _mm256_and_ps(gate[r][p], add));  // off: v + 0
      }
  }
  for (int p = 0; p < kP; ++p) {
    const int64_t vec = q0 / kVec + p;
    const VecStore& store = j.stores[vec];
    if (store.kind == VecStore::kNone) continue;
    for (int r = 0; r < rows; ++r) {
      float* yo = j.y + (ob * kR + r) * j.P;
      if (store.kind == VecStore::kFull) {
        _mm256_storeu_ps(yo + store.base, v[r][p]);
        continue;
      }
      alignas(32) float lanes[kVec];
      _mm256_store_ps(lanes, v[r][p]);
      for (int l = 0; l < kVec; ++l) {
        const int32_t at = j.out_index[vec * kVec + l];
        if (at >= 0) yo[at] = lanes[l];
      }
    }
  }
}

// Blocks [b0, b1) of output blocks ob0 .. ob0 + nob - 1 (nob <= kTileOBlocks, at most
// kTileStride blocks): stage 1, the gate, stage 2 where some gate is on, the epilogue and store
// (FinishBlock). Three passes over the task's blocks:
//   1. block by block, each output block in turn: stage 1 (AVX2; VNNI's is done: s1_done), the
//      gates; blocks with no gate on and blocks whose stage 2 runs whole are finished here;
//      the others add their gated-on positions to their rows' lists (branch-free, with
//      kSetBitPositions: a loop over the set bits, mispredicting its exit once per row and
//      vector, had cost ~30% of stage 2 at 20% on);
//   2. the dot products row by row over the whole task: a row's weights are loaded once per
//      eight (or four) of its positions across all the task's blocks (block by block, a row had
//      ~3 gated-on positions per block at 20% on, so most calls ran one to three positions);
//   3. the blocks of pass 2 are finished.
// s1_done: stage 1's sums, output block ob0 + i's block b at s1_done + (i * kTileStride + b -
// b0) * kR * kBlock (StageVnniChunk), or null: computed here by `stage`.
G2D_INT8_AVX2 void RunBlocks(const Job& j, StageFn stage, int64_t ob0, int nob, int64_t b0,
                             int64_t b1, const int32_t* s1_done) {
  bool ran[2] = {false, false};  // stage 2 as dot products / as a block, for the counters
  // Per-stage cycles (G2D_STAGE_TIMES=1), summed here and added once: a block is too short
  // for an atomic add per stage. Off: one predictable branch per stage.
  const bool timing = StageTimesOn();
  uint64_t cycles[kStageTimers] = {}, clock = timing ? __rdtsc() : 0;
  auto lap = [&](StageTimer which) {
    if (timing) {
      const uint64_t now = __rdtsc();
      cycles[which] += now - clock;
      clock = now;
    }
  };
  // Per slot (output block ob0 + i, block b: slot i * kTileStride + b - b0, StageVnniTile's
  // order): stage 2's sums; for the slots finished in pass 3, the stage-1 values and gates.
  constexpr int64_t kSlots = kTileOBlocks * kTileStride;
  alignas(64) int32_t s2[kSlots * kR * kBlock];
  __m256 v[kSlots][kR][kP], gate[kSlots][kR][kP];  // the slots of pass 2 (dots[])
  int64_t dots[kSlots];
  int ndots = 0;
  // per row: gated-on positions (dots), at most kTileStride * kBlock; appended 8 lanes at a
  // time (the lanes past the set ones are never read), kVec of slack for safety only
  int32_t list[kTileOBlocks * kR][kTileStride * kBlock + kVec];
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int nlist[kTileOBlocks * kR] = {};
  alignas(32) int32_t s1_one[kR * kBlock];
  const int64_t O = j.w->O;
  const __m256 sc1 = _mm256_set1_ps(j.scale1);
  // VNNI (s1_done): stage 2 in whole blocks runs up to kAhead consecutive blocks of an output
  // block on one StageVnniTile<1, n> (n vectors x 4 rows of independent accumulators, each
  // vector load serving four rows; StageVnni, one block, has 8 chains), writing their slots.
  // How many of the next blocks run whole is counted when a block first does (stage 1's sums of
  // the chunk are ready): counting every block up front cost 3-5% of the layer at 10% on, where
  // no block runs whole.
  constexpr int kAhead = 4;
  int64_t whole_until[kTileOBlocks] = {b0, b0};  // blocks before it ran whole in a run
  auto slot_of = [&](int64_t ob, int64_t b) { return (ob - ob0) * kTileStride + (b - b0); };
  auto runs_whole = [&](int64_t ob, int64_t b) {  // some gate on, more than sparse_max
    const int32_t* s1 = s1_done + slot_of(ob, b) * kR * kBlock;
    const int rows = int(std::min<int64_t>(kR, O - ob * kR));
    const int on = CountOn(j, s1, ob, b * kBlock, rows);
    return on > 0 && on > j.sparse_max;  // none on: the block skips stage 2 (forced dense too)
  };
  for (int64_t i = 0; i < (b1 - b0) * nob; ++i) {  // pass 1
    const int64_t b = b0 + i / nob, ob = ob0 + i % nob, slot = slot_of(ob, b);
    const int rows = int(std::min<int64_t>(kR, O - ob * kR));
    const int64_t q0 = b * kBlock;
    const int32_t* s1 = s1_one;
    if (s1_done)
      s1 = s1_done + slot * kR * kBlock;
    else
      stage(j, j.act1, ob, q0, j.m1, s1_one);
    lap(kTimeStage1);
    int any_on = 0, on = 0;
    __m256 vb[kR][kP], gb[kR][kP];
    for (int r = 0; r < rows; ++r) {
      for (int p = 0; p < kP; ++p) {
        gb[r][p] = BlockGate(j, sc1, s1, ob, q0, r, p, &vb[r][p]);
        const int bits = _mm256_movemask_ps(gb[r][p]);
        any_on |= bits;
        on += __builtin_popcount(unsigned(bits));
      }
    }
    lap(kTimeGate);
    if (!any_on) {
      FinishBlock(j, ob, b, rows, vb, gb, nullptr);
      lap(kTimeStore);
      continue;
    }
    int64_t& until = whole_until[ob - ob0];
    // A block runs whole when it is in a run of whole blocks (more than sparse_max on: its own
    // and the next), or alone when it has more than sparse_max_alone on.
    const bool in_run = b < until;
    const bool starts_run = !in_run && on > j.sparse_max && s1_done && b + 1 < b1 &&
                            runs_whole(ob, b + 1);
    if (in_run || starts_run || on > j.sparse_max_alone) {
      ran[1] = true;
      int32_t* out = s2 + slot * kR * kBlock;
      if (in_run) {
        // computed by the run that started at an earlier block
      } else if (starts_run) {
        int run = 2;  // consecutive blocks from b that run whole (above)
        while (run < kAhead && b + run < b1 && runs_whole(ob, b + run)) ++run;
        using Tile = void (*)(const Job&, const int8_t*, int64_t, int64_t, int32_t*);
        static constexpr Tile kTiles[kAhead + 1] = {nullptr, nullptr, StageVnniTile<1, 2>,
                                                    StageVnniTile<1, 3>, StageVnniTile<1, 4>};
        kTiles[run](j, j.act2, ob, q0, out);
        until = b + run;
      } else {
        stage(j, j.act2, ob, q0, j.m2, out);
      }
      lap(kTimeDense2);
      FinishBlock(j, ob, b, rows, vb, gb, out);
      lap(kTimeStore);
    } else {
      ran[0] = true;
      dots[ndots++] = slot;
      std::memcpy(v[slot], vb, sizeof vb);
      std::memcpy(gate[slot], gb, sizeof gb);
      for (int r = 0; r < rows; ++r) {
        int32_t* row_list = list[(ob - ob0) * kR + r];
        int n = nlist[(ob - ob0) * kR + r];
        for (int p = 0; p < kP; ++p) {
          const unsigned bits = unsigned(_mm256_movemask_ps(gb[r][p]));
          const __m256i at = _mm256_add_epi32(_mm256_set1_epi32(int32_t(q0 + p * kVec)), iota);
          const __m256i lanes =  // the set lanes first (vpermd indices)
              _mm256_load_si256(reinterpret_cast<const __m256i*>(kSetBitPositions.at[bits]));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(row_list + n),
                              _mm256_permutevar8x32_epi32(at, lanes));
          n += kSetBitPositions.count[bits];
        }
        nlist[(ob - ob0) * kR + r] = n;
      }
      lap(kTimeSparse);
    }
  }
  for (int rr = 0; rr < nob * kR; ++rr) {  // pass 2: the dot products, row by row
    const int n = nlist[rr];
    if (n == 0) continue;
    const int64_t ob = ob0 + rr / kR;
    const int r = rr % kR;
    int32_t sum[kTileStride * kBlock];
    j.dot(j, ob * kR + r, list[rr], n, sum);
    for (int i = 0; i < n; ++i) {
      const int64_t q = list[rr][i];
      s2[slot_of(ob, q / kBlock) * kR * kBlock + r * kBlock + q % kBlock] = sum[i];
    }
  }
  lap(kTimeSparse);
  for (int d = 0; d < ndots; ++d) {  // pass 3
    const int64_t slot = dots[d], ob = ob0 + slot / kTileStride, b = b0 + slot % kTileStride;
    const int rows = int(std::min<int64_t>(kR, O - ob * kR));
    FinishBlock(j, ob, b, rows, v[slot], gate[slot], s2 + slot * kR * kBlock);
  }
  lap(kTimeStore);
  for (int dense = 0; dense < 2; ++dense)
    if (ran[dense]) CountSecondStage(dense == 1);
  for (int t = 0; t < kStageTimers; ++t) AddStageCycles(StageTimer(t), cycles[t]);
}

// Channels 4 * c4 .. 4 * c4 + 3 of the sample x [C, H, W], split by isa.pg_split_words (row by
// row where it can, see below) into group c4 of act1 (MSB counts) and act2 (LSB counts), int8 words of 4
// channels (through float planes and a repack, the split took as long as stage 1 at 16
// channels 32x32: perf, G2D_AMX=0), and the padding around the rows zeroed (the planes are
// scratch shared with other layers; clearing the whole buffers first cost 4% of the 16 channel
// layer). The position-major copy of the LSB counts is made afterwards (TransposeLsbCounts),
// not here: groups filled on different threads writing their 4 bytes into the same 64-byte
// lines of it made the fill 3x slower with 2 threads than with 1 (false sharing;
// G2D_STAGE_TIMES "pad", 128 ch 28x28 on AMD EPYC Zen 4).
void FillGroup(const IsaKernels& isa, const float* x, const PGSplit& split, const ConvGeom& g,
               const PGActLayout& L, int64_t c4, int8_t* act1, int8_t* act2) {
  AlignedVec<float>& zeros = Scratch<float, 40>();  // the channels past C
  if (4 * c4 + 3 >= g.C) zeros.assign(size_t(g.H * g.W), 0.f);  // a whole plane (words)
  int32_t* msb = reinterpret_cast<int32_t*>(act1) + c4 * L.plane_len;
  int32_t* lsb = reinterpret_cast<int32_t*>(act2) + c4 * L.plane_len;
  auto zero = [&](int64_t from, int64_t to) {  // positions [from, to) of both planes
    std::memset(msb + from, 0, size_t(to - from) * sizeof(int32_t));
    std::memset(lsb + from, 0, size_t(to - from) * sizeof(int32_t));
  };
  auto rows_of = [&](int64_t h, const float* rows[4]) {
    for (int i = 0; i < 4; ++i)
      rows[i] = 4 * c4 + i < g.C ? x + ((4 * c4 + i) * g.H + h) * g.W : zeros.data();
  };
  // The words go straight into their rows where those are stride-1 rows of whole vectors.
  // Otherwise the channels' contiguous planes are split all at once into `words`, then dealt
  // to the layout's rows: strided layers' phase rows, and stride-1 rows that end in a partial
  // vector (8x8, 28x28 maps), where pg_split_words' tail (a zero-padded copy in and out) cost
  // more than the row itself at 8x8 (the "pad" stage of ResNet-20's 64-channel 8x8 PG layers,
  // Zen 4).
  const int64_t HW = g.H * g.W;
  const bool direct = L.phases == 1 && g.W % isa.vw == 0;
  int32_t* words = nullptr;  // [msb words of the plane | lsb words]
  if (!direct) {
    AlignedVec<int32_t>& buf = Scratch<int32_t, 53>();
    buf.resize(size_t(2 * HW));
    words = buf.data();
    const float* planes[4];
    rows_of(0, planes);
    isa.pg_split_words(planes, HW, split.s, split.levels, split.shift, words, words + HW);
  }
  if (L.phases > 1) {
    // Strided: the layout's phase planes (PGActLayout::WordOf); the group's plane of phase f,
    // at (f * groups + c4) * plane_len, cleared first (the padding, the round-up).
    int32_t* const msb0 = reinterpret_cast<int32_t*>(act1);
    int32_t* const lsb0 = reinterpret_cast<int32_t*>(act2);
    for (int64_t f = 0; f < L.phases; ++f) {
      const int64_t at = (f * L.groups + c4) * L.plane_len;
      std::memset(msb0 + at, 0, size_t(L.plane_len) * sizeof(int32_t));
      std::memset(lsb0 + at, 0, size_t(L.plane_len) * sizeof(int32_t));
    }
    // Input columns w with (w + pl) % sw == b: consecutive words of a phase (., b) row; input
    // rows h0, h0 + sh, ...: consecutive rows (Ws words apart) of one phase plane. So each
    // (h0, b) is one isa.deal_words call (word by word, with WordOf's divisions per row, this
    // took half the "pad" stage of ResNet-20's stride-2 PG layers, perf on AMD EPYC Zen 4).
    for (int64_t b = 0; b < g.sw; ++b) {
      const int64_t w0 = ((b - g.pl) % g.sw + g.sw) % g.sw;
      if (w0 >= g.W) continue;
      const int64_t n = (g.W - w0 + g.sw - 1) / g.sw;
      for (int64_t h0 = 0; h0 < std::min(g.sh, g.H); ++h0) {
        const int64_t rows = (g.H - h0 + g.sh - 1) / g.sh;
        const int64_t at = L.WordOf(g, h0 + g.pt, w0 + g.pl, c4);
        isa.deal_words(words + h0 * g.W + w0, g.sh * g.W, rows, n, g.sw, msb0 + at, L.Ws);
        isa.deal_words(words + HW + h0 * g.W + w0, g.sh * g.W, rows, n, g.sw, lsb0 + at, L.Ws);
      }
    }
    return;
  }
  if (!direct) {
    // Rows ending in a partial vector: the plane cleared, then the split rows copied to their
    // places (Ws words apart) by one isa.deal_words per plane (row by row, a memcpy and the
    // padding's two memsets per row were most of the "pad" stage of ResNet-20's 8x8 PG layers,
    // perf on AMD EPYC Zen 4).
    const int64_t row0 = L.WordOf(g, g.pt, g.pl, c4) - c4 * L.plane_len;  // in msb / lsb
    zero(0, L.plane_len);
    isa.deal_words(words, g.W, g.H, g.W, 1, msb + row0, L.Ws);
    isa.deal_words(words + HW, g.W, g.H, g.W, 1, lsb + row0, L.Ws);
    return;
  }
  int64_t done = 0;  // positions before it are written
  for (int64_t h = 0; h < g.H; ++h) {
    const int64_t row_pos = L.WordOf(g, h + g.pt, g.pl, c4) - c4 * L.plane_len;  // in msb / lsb
    zero(done, row_pos);
    const float* rows[4];
    rows_of(h, rows);
    isa.pg_split_words(rows, g.W, split.s, split.levels, split.shift, msb + row_pos,
                       lsb + row_pos);
    done = row_pos + g.W;
  }
  zero(done, L.plane_len);
}

// act2_rows [position][Cp bytes] from act2 [group][position][4 bytes], one phase (the caller
// runs it per phase):
// every word written, the channels past C as zeros, so the buffer needs no clearing. 8 x 8
// words at a time (one load per group, one store per position; word by word, its reads
// strided by a plane, it took 3% of a 128 ch 28x28 layer at 0% on: perf, G2D_AMX=0). Cp is a
// multiple of 32 channels, so a position's row is whole blocks of 8 words: the groups past the
// layer's (the zero channels) go through the same transpose as zero registers. Before, they
// were zeroed position by position (a memset call per position: the transpose took as long as
// the input split at 16 channels, 32x32, perf on AMD EPYC Zen 4).
G2D_INT8_AVX2 void TransposeLsbCounts(const PGActLayout& L, int64_t Cp, const int8_t* act2,
                                      int8_t* act2_rows) {
  const int32_t* src = reinterpret_cast<const int32_t*>(act2);
  int32_t* dst = reinterpret_cast<int32_t*>(act2_rows);
  const int64_t words = Cp / 4, P = L.plane_len;
  auto scalar = [&](int64_t q, int64_t c4_from) {  // position q, words c4_from .. words - 1
    int32_t* row = dst + q * words;
    for (int64_t c4 = c4_from; c4 < words; ++c4) row[c4] = c4 < L.groups ? src[c4 * P + q] : 0;
  };
  int64_t q = 0;
  for (; q + 8 <= P; q += 8) {
    int64_t c4 = 0;
    for (; c4 + 8 <= words; c4 += 8) {
      __m256i r[8], t[8], u[8];
      for (int i = 0; i < 8; ++i)
        r[i] = c4 + i < L.groups
                   ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + (c4 + i) * P + q))
                   : _mm256_setzero_si256();
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {  // u[i + k]: groups i .. i + 3 of positions k, k + 4
        u[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
      }
      for (int k = 0; k < 4; ++k) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (q + k) * words + c4),
                            _mm256_permute2x128_si256(u[k], u[k + 4], 0x20));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + (q + k + 4) * words + c4),
                            _mm256_permute2x128_si256(u[k], u[k + 4], 0x31));
      }
    }
    if (c4 < words)  // not reached while Cp is a multiple of 32
      for (int i = 0; i < 8; ++i) scalar(q + i, c4);
  }
  for (; q < P; ++q) scalar(q, 0);
}

#endif  // G2D_HAVE_INT8

}  // namespace

PGInt8Isa PGInt8For(const IsaKernels& isa) {
#if G2D_HAVE_INT8
  static const int setting = [] {  // 0 off, 1 AVX2 even where VNNI, 2 auto
    const char* env = std::getenv("G2D_PG_INT8");
    if (env && std::string(env) == "0") return 0;
    if (env && std::string(env) == "avx2") return 1;
    return 2;
  }();
  const std::string name = isa.name;
  if (setting == 0 || name == "generic") return PGInt8Isa::kNone;
  if (name == "avx512" && setting == 2) return PGInt8Isa::kVnni;  // the table implies VNNI
  return PGInt8Isa::kAvx2;
#else
  return PGInt8Isa::kNone;
#endif
}

const char* PGInt8Name(PGInt8Isa k) {
  return k == PGInt8Isa::kVnni ? "vnni" : k == PGInt8Isa::kAvx2 ? "avx2" : "off";
}

std::shared_ptr<const PGInt8Weights> PackPGInt8Weights(const int16_t* w_q, const ConvGeom& g) {
  if (g.group != 1 || g.Cw != g.C) return nullptr;
  auto w = std::make_shared<PGInt8Weights>();
  w->O = g.O;
  w->C = g.C;
  w->kk = g.kk();
  w->groups = (g.C + 3) / 4;
  w->K = w->groups * w->kk;
  w->oblocks = (g.O + kR - 1) / kR;
  const int64_t n = g.O * g.C * w->kk;
  for (int64_t i = 0; i < n; ++i) w->wmax = std::max<int32_t>(w->wmax, std::abs(int32_t(w_q[i])));
  if (w->wmax > 255) return nullptr;
  w->mag.assign(size_t(w->oblocks * w->K * kR), 0);
  w->sgn.assign(size_t(w->oblocks * w->K * kR), 0);
  w->lo.assign(size_t(w->oblocks * w->K * kR), 0);
  std::vector<int64_t> offset(size_t(w->oblocks * kR), 0);
  // per output row o = ob * kR + r (StageVnni runs one chain per row)
  std::vector<std::vector<PGInt8Weights::HiWord>> hi_words(size_t(w->oblocks * kR));
  for (int64_t ob = 0; ob < w->oblocks; ++ob)
    for (int64_t c4 = 0; c4 < w->groups; ++c4)
      for (int64_t t = 0; t < w->kk; ++t)
        for (int64_t r = 0; r < kR; ++r) {
          const int64_t o = ob * kR + r, at = (ob * w->K + c4 * w->kk + t) * kR + r;
          uint32_t mag = 0, sgn = 0;
          for (int64_t i = 0; i < 4; ++i) {
            const int64_t c = 4 * c4 + i;
            if (o >= g.O || c >= g.C) continue;
            const int q = w_q[(o * g.C + c) * w->kk + t];
            mag |= uint32_t(std::abs(q)) << (8 * i);
            sgn |= uint32_t(uint8_t(q > 0 ? 1 : q < 0 ? -1 : 0)) << (8 * i);
          }
          w->mag[size_t(at)] = int32_t(mag);
          w->sgn[size_t(at)] = int32_t(sgn);
          // VNNI: q = c + 2 * e, c in [-128, 127] with q's parity (|q| <= 127: c = q, e = 0).
          uint32_t lo = 0, hi = 0;
          for (int64_t i = 0; i < 4; ++i) {
            const int64_t c = 4 * c4 + i;
            const int q = o < g.O && c < g.C ? w_q[(o * g.C + c) * w->kk + t] : 0;
            const int lo_q = q > 127 ? 127 - (q & 1 ? 0 : 1) : q < -128 ? -128 + (q & 1 ? 1 : 0) : q;
            lo |= uint32_t(uint8_t(int8_t(lo_q))) << (8 * i);
            hi |= uint32_t(uint8_t(int8_t((q - lo_q) / 2))) << (8 * i);
            if (o < g.O) offset[size_t(o)] += 128 * int64_t(q);
          }
          w->lo[size_t(at)] = int32_t(lo);
          if (hi != 0) hi_words[size_t(o)].push_back({int32_t(c4 * w->kk + t), int32_t(hi)});
        }
  // Kept modulo 2^32, as the stage's int32 sums wrap (the true totals fit: PGInt8Fits).
  for (int64_t v : offset) w->offset.push_back(int32_t(uint32_t(uint64_t(v))));
  w->hi_start.assign(1, 0);
  for (const auto& words : hi_words) {
    w->hi.insert(w->hi.end(), words.begin(), words.end());
    w->hi_start.push_back(uint32_t(w->hi.size()));
  }
  w->Cp = RoundUp(g.C, 32);
  w->row_mag.assign(size_t(g.O * w->kk * w->Cp), 0);
  w->row_sgn.assign(size_t(g.O * w->kk * w->Cp), 0);
  for (int64_t o = 0; o < g.O; ++o)
    for (int64_t c = 0; c < g.C; ++c)
      for (int64_t t = 0; t < w->kk; ++t) {
        const int q = w_q[(o * g.C + c) * w->kk + t];
        const size_t at = size_t((o * w->kk + t) * w->Cp + c);
        w->row_mag[at] = uint8_t(std::abs(q));
        w->row_sgn[at] = int8_t(q > 0 ? 1 : q < 0 ? -1 : 0);
      }
  return w;
}

bool PGInt8Fits(const PGInt8Weights& w, PGInt8Isa k, int64_t max_count) {
  if (k == PGInt8Isa::kNone || max_count > 127) return false;  // counts as int8
  if (double(w.K) * 4.0 * w.wmax * double(max_count) >= 2147483647.0) return false;
  // vpmaddubsw's saturating int16 pair sum (VNNI has none).
  return k == PGInt8Isa::kVnni || 2 * int64_t(w.wmax) * max_count <= 32767;
}

// RunPGInt8's tables for one geometry: the int8 layout, each k step's and tap's offsets, and
// where each position's output goes. They depend on the geometry only, so they are built once
// per weights and geometry (w.tables) instead of on every call.
struct PGInt8Tables {
  ConvGeom g;  // the geometry they were built for (N ignored)
  PGActLayout L;
  std::vector<int64_t> koff, row_off;
  std::vector<ChunkOff> chunks, tails;  // Job::chunks, Job::tails
  AlignedVec<int32_t> out_index, valid;
  std::vector<VecStore> stores;
};

namespace {
std::shared_ptr<const PGInt8Tables> BuildTables(const PGInt8Weights& w, const ConvGeom& g) {
  auto t = std::make_shared<PGInt8Tables>();
  t->g = g;
  std::vector<int64_t> tap_off;
  t->L = MakePGActLayout(g, 4 * w.groups, kBlock, &tap_off);
  const PGActLayout& L = t->L;
  std::vector<int64_t>& koff = t->koff;
  koff.resize(size_t(w.K));
  for (int64_t c4 = 0; c4 < w.groups; ++c4)
    for (int64_t t = 0; t < w.kk; ++t)
      koff[size_t(c4 * w.kk + t)] = c4 * L.PlaneBytes() + tap_off[size_t(t)];
  // Position-major offsets: the same layout with one channel group (plane_len does not depend
  // on the channel count), in positions, times Cp bytes.
  std::vector<int64_t>& row_off = t->row_off;
  MakePGActLayout(g, 4, kBlock, &row_off);
  for (int64_t& off : row_off) off = off / 4 * w.Cp;
  for (int64_t tap = 0; tap < w.kk; ++tap) {
    int64_t c = 0;
    for (; c + 64 <= w.Cp; c += 64) t->chunks.push_back({row_off[size_t(tap)] + c, tap * w.Cp + c});
    if (c < w.Cp) t->tails.push_back({row_off[size_t(tap)] + c, tap * w.Cp + c});
  }

  // Output pixel of each position (padding columns and the tail are none), and how each
  // vector is stored (VecStore).
  const int64_t npos = L.blocks * kBlock, nvec = npos / kVec;
  AlignedVec<int32_t>& out_index = t->out_index;
  AlignedVec<int32_t>& valid = t->valid;
  out_index.assign(size_t(npos), -1);
  valid.assign(size_t(npos), 0);
  for (int64_t oh = 0; oh < g.OH; ++oh)
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      out_index[size_t(oh * L.Ws + ow)] = int32_t(oh * g.OW + ow);
      valid[size_t(oh * L.Ws + ow)] = -1;
    }
  std::vector<VecStore>& stores = t->stores;
  stores.resize(static_cast<size_t>(nvec));
  for (int64_t v = 0; v < nvec; ++v) {
    const int32_t* index = out_index.data() + v * kVec;
    int valid_lanes = 0;
    bool consecutive = index[0] >= 0;
    for (int i = 0; i < kVec; ++i) {
      valid_lanes += index[i] >= 0;
      consecutive = consecutive && index[i] == index[0] + i;
    }
    stores[size_t(v)] = VecStore{valid_lanes == 0 ? VecStore::kNone
                       : consecutive    ? VecStore::kFull
                                        : VecStore::kLanes,
                       index[0]};
  }

  return t;
}

std::shared_ptr<const PGInt8Tables> TablesFor(const PGInt8Weights& w, const ConvGeom& g) {
  std::lock_guard<std::mutex> lock(w.tables_mutex);
  if (!w.tables || !w.tables->g.SameLayer(g)) w.tables = BuildTables(w, g);
  return w.tables;
}
}  // namespace

void RunPGInt8(OrtKernelContext* ctx, PGInt8Isa k, const PGInt8Weights& w, const ConvGeom& g,
               const float* x, const PGSplit& split, int64_t msb_max, int64_t lsb_max,
               float scale1, float scale2, const float* threshold, float* y) {
#if G2D_HAVE_INT8
  const uint64_t call_clock = StageClockNow();
  const std::shared_ptr<const PGInt8Tables> tables = TablesFor(w, g);
  const PGActLayout& L = tables->L;
  const std::vector<int64_t>& koff = tables->koff;
  const std::vector<int64_t>& row_off = tables->row_off;
  const AlignedVec<int32_t>& out_index = tables->out_index;
  const AlignedVec<int32_t>& valid = tables->valid;
  const std::vector<VecStore>& stores = tables->stores;

  auto steps = [&](int64_t max_count) {  // AVX2: k steps whose int16 sums cannot saturate
    const int64_t pair = std::max<int64_t>(1, 2 * int64_t(w.wmax) * max_count);
    return int(std::max<int64_t>(1, std::min<int64_t>(w.K, 32767 / pair)));
  };
  const StageFn stage = k == PGInt8Isa::kVnni ? StageVnni : StageAvx2;
  const DotFn dot = k == PGInt8Isa::kVnni ? DotVnni : DotAvx2;
  const bool tiles = k == PGInt8Isa::kVnni;  // VNNI: stage 1 (and runs of whole blocks) on tiles
  const double forced = DenseSecondStageAbove(false);  // forced (G2D_SECOND_STAGE) or auto
  auto sparse_max_for = [&](double block_step) {
    double dense_above = forced;
    if (forced >= 0.0 && forced <= 1.0)
      dense_above = double(w.K) * block_step / (double(w.Cp / 32 * w.kk) * kDotStep + kDotFixed) /
                    double(kR * kBlock);
    return int(std::min(double(kR * kBlock), dense_above * double(kR * kBlock)));
  };
  const int sparse_max = sparse_max_for(tiles ? kBlockStepVnni : kBlockStep);
  const int sparse_max_alone = sparse_max_for(tiles ? kBlockStepVnniAlone : kBlockStep);
  const IsaKernels& isa = BestKernels();
  const int64_t chunks = (L.blocks + kBlocksPerTask - 1) / kBlocksPerTask;
  const bool parallel = double(g.O) * double(g.C) * double(g.kk()) * double(L.nq) >= kParallelMacs;
  // Small layers in a batch: one task per sample, each on its own thread's buffers
  // (ParallelOverSamples); else each sample's blocks in parallel.
  const bool by_sample = ParallelOverSamples(g);
  OrtKernelContext* const inner = by_sample ? nullptr : ctx;
  ParallelFor(by_sample ? ctx : nullptr, size_t(g.N), [&](size_t sample) {
    const int64_t n = int64_t(sample);
    uint64_t pad_clock = n == 0 ? call_clock : StageClockNow();  // sample 0's includes the tables
    AlignedVec<int8_t>& act1 = Scratch<int8_t, 41>();
    AlignedVec<int8_t>& act2 = Scratch<int8_t, 42>();
    AlignedVec<int8_t>& act2_rows = Scratch<int8_t, 45>();
    act1.resize(size_t(L.Bytes()));
    act2.resize(size_t(L.Bytes()));
    act2_rows.resize(size_t(L.phases * L.plane_len * w.Cp));
    const float* xn = x + n * g.C * g.H * g.W;
    ParallelFor(ParallelIfLarge(inner, 4 * g.C * g.H * g.W), size_t(w.groups), [&](size_t c4) {
      FillGroup(isa, xn, split, g, L, int64_t(c4), act1.data(), act2.data());
    });
    for (int64_t f = 0; f < L.phases; ++f)  // phase by phase (strided layers have several)
      TransposeLsbCounts(L, w.Cp, act2.data() + f * L.groups * L.PlaneBytes(),
                         act2_rows.data() + f * L.plane_len * w.Cp);
    AddStageTime(kTimePad, pad_clock);
    const Job job{&w,
                  act1.data(),
                  act2.data(),
                  act2_rows.data(),
                  row_off.data(),
                  tables->chunks.data(),
                  int64_t(tables->chunks.size()),
                  tables->tails.data(),
                  int64_t(tables->tails.size()),
                  dot,
                  sparse_max,
                  sparse_max_alone,
                  koff.data(),
                  out_index.data(),
                  valid.data(),
                  stores.data(),
                  g.P(),
                  steps(msb_max),
                  steps(lsb_max),
                  scale1,
                  scale2,
                  threshold,
                  y + n * g.O * g.P()};
    // A task: a chunk of position blocks of `group` output blocks. VNNI computes their stage 1
    // first, kTileOBlocks output blocks per tile (StageVnniTile), then RunBlocks does the rest;
    // AVX2 runs stage 1 block by block inside RunBlocks.
    const int64_t group = tiles ? kTileOBlocks : 1;
    const int64_t groups = (w.oblocks + group - 1) / group;
    ParallelFor(parallel ? inner : nullptr, size_t(groups * chunks), [&](size_t i) {
      const int64_t ob = int64_t(i) / chunks * group;
      const int64_t b0 = (int64_t(i) % chunks) * kBlocksPerTask;
      const int64_t b1 = std::min(L.blocks, b0 + kBlocksPerTask);
      const int nob = int(std::min<int64_t>(group, w.oblocks - ob));
      if (!tiles) {
        RunBlocks(job, stage, ob, nob, b0, b1, nullptr);
        return;
      }
      alignas(64) int32_t s1[kTileOBlocks * kTileStride * kR * kBlock];
      const uint64_t clock = StageClockNow();
      StageVnniChunk(job, ob, nob, b0, b1, s1);
      AddStageTime(kTimeStage1, clock);
      RunBlocks(job, stage, ob, nob, b0, b1, s1);
    });
    int8_runs.fetch_add(1, std::memory_order_relaxed);
  });
  AddStageTime(kTimeCall, call_clock);
#else
  throw OpError("PGConv: int8 path called on a build without x86 SIMD support");
#endif
}

}  // namespace g2d

// How many samples PGConv has run on the int8 kernels in this process (tests check the path).
extern "C" __attribute__((visibility("default"))) int64_t G2DPGInt8Runs() {
  return g2d::int8_runs.load(std::memory_order_relaxed);
}
