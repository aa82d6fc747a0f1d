// See pg_amx.h.
//
// Only the functions marked G2D_AMX_TARGET use AMX / AVX-512 instructions, through GCC/Clang
// target attributes rather than file-wide -m flags: the library's inline and template code
// compiled in this file (std::vector, std::function) must stay baseline x86-64, because the
// linker may keep this file's copy of it for the whole library.
#include "pg_amx.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define G2D_HAVE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define G2D_AMX_TARGET \
  __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512dq")))
#else
#define G2D_HAVE_AMX 0
#endif

namespace g2d {

namespace {

constexpr int64_t kBlockPositions = 32;  // two tiles of 16 output positions
using ActLayout = PGActLayout;
constexpr int64_t kBlocksPerTask = 4;
// Below this many tile products per stage the blocks run on the calling thread: waking a pool
// thread cost more than the work it would take over (measured on 64 ch 8x8 layers of the
// ResNet-20: the block loop took 1.5x as long in parallel as serially).
constexpr int64_t kParallelTileProducts = 2048;
// Batches up to this size run such small layers sample by sample in parallel (one buffer pair
// per sample); larger ones one sample after another.
constexpr int64_t kMaxParallelSamples = 64;
std::atomic<int64_t> amx_runs{0};

#if G2D_HAVE_AMX
bool DetectAmx() {
  const char* env = std::getenv("G2D_AMX");
  if (env && std::string(env) == "0") return false;
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  const bool avx512bw = (b >> 30) & 1, amx_tile = (d >> 24) & 1, amx_int8 = (d >> 25) & 1;
  if (!(avx512bw && amx_tile && amx_int8)) return false;
  // The OS must save the tile state (XCR0 bits 17, 18) ...
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if (((lo >> 17) & 3) != 3) return false;
  // ... and, on Linux, grant it to this process (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}
#endif

#if G2D_HAVE_AMX

// One run of 16 pixels of 4 channel rows (rows[i] + at, n valid; integer-valued floats) as
// 16 positions x 4 int8 channels: one int32 lane per position.
G2D_AMX_TARGET inline __m512i InterleaveRun(const float* const rows[4], int64_t at, int n) {
  const __mmask16 lanes = __mmask16((1u << n) - 1);
  __m128i b[4];
  for (int i = 0; i < 4; ++i)
    b[i] = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_maskz_loadu_ps(lanes, rows[i] + at)));
  const __m128i t0 = _mm_unpacklo_epi8(b[0], b[1]), t1 = _mm_unpackhi_epi8(b[0], b[1]);
  const __m128i t2 = _mm_unpacklo_epi8(b[2], b[3]), t3 = _mm_unpackhi_epi8(b[2], b[3]);
  __m512i z = _mm512_castsi128_si512(_mm_unpacklo_epi16(t0, t2));
  z = _mm512_inserti32x4(z, _mm_unpackhi_epi16(t0, t2), 1);
  z = _mm512_inserti32x4(z, _mm_unpacklo_epi16(t1, t3), 2);
  return _mm512_inserti32x4(z, _mm_unpackhi_epi16(t1, t3), 3);
}

// Stores the lanes of one input row run (pixels w0 .. w0 + n - 1 of padded row hp) at their
// positions of group `group` of buf. With a column stride the lanes of each stride phase are
// compressed into that phase's row.
G2D_AMX_TARGET inline void StoreRun(__m512i z, const ConvGeom& g, const ActLayout& L,
                                    int64_t hp, int64_t w0, int n, int64_t group, int8_t* buf) {
  if (g.sw == 1) {
    int8_t* dst = buf + L.WordOf(g, hp, w0 + g.pl, group) * 4;
    _mm512_mask_storeu_epi32(dst, __mmask16((1u << n) - 1), z);
    return;
  }
  for (int64_t r = 0; r < g.sw; ++r) {
    // Lanes i with (w0 + i + pl) % sw == r, the first of them at lane `first`: consecutive
    // words of that column phase's row.
    const int64_t first = ((r - (w0 + g.pl)) % g.sw + g.sw) % g.sw;
    if (first >= n) continue;
    __mmask16 phase_lanes = 0;
    for (int64_t i = first; i < n; i += g.sw) phase_lanes |= __mmask16(1u << i);
    int8_t* dst = buf + L.WordOf(g, hp, w0 + first + g.pl, group) * 4;
    _mm512_mask_compressstoreu_epi32(dst, phase_lanes, z);
  }
}

// Stride 1: zeroes the positions of one group's plane that no input pixel is written to
// (the padding rows and columns and the tail).
void ZeroPadding(const ConvGeom& g, const ActLayout& L, int64_t group, int8_t* buf) {
  int8_t* plane = buf + group * L.PlaneBytes();
  int64_t pos = 0;  // positions before `pos` are written or zeroed
  for (int64_t h = 0; h < g.H; ++h) {
    const int64_t start = L.WordOf(g, h + g.pt, g.pl, group) - group * L.plane_len;
    std::memset(plane + pos * 4, 0, size_t(start - pos) * 4);
    pos = start + g.W;
  }
  std::memset(plane + pos * 4, 0, size_t(L.plane_len - pos) * 4);
}

// Quantizes channels 4 * c4 .. 4 * c4 + 3 of the sample x [C, H, W] with isa.pg_split (the
// one implementation of PG's activation split; a few rows at a time, so the counts stay in
// L1) and writes both stages' int8 activations: the MSB counts to act1, the LSB counts to
// act2; when the weights are split, as the 2x copy (group c4) and the 1x copy.
G2D_AMX_TARGET void FillGroup(const IsaKernels& isa, const float* x, const PGSplit& split,
                              const PGAmxWeights& w, const ConvGeom& g, const ActLayout& L,
                              int64_t c4, int8_t* act1, int8_t* act2) {
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(g.H, 2048 / g.W));
  const int64_t chunk = rows * g.W;
  AlignedVec<float>& counts = Scratch<float, 28>();  // [channel i][MSB, LSB][chunk]
  counts.resize(size_t(8 * chunk));
  for (int i = 0; i < 4; ++i)  // channels past C read as zeros
    if (4 * c4 + i >= g.C)
      std::fill(counts.begin() + 2 * i * chunk, counts.begin() + (2 * i + 2) * chunk, 0.f);
  const float* hb[4];
  const float* lb[4];
  for (int i = 0; i < 4; ++i) {
    hb[i] = counts.data() + (2 * i) * chunk;
    lb[i] = counts.data() + (2 * i + 1) * chunk;
  }
  const int64_t lo_group = w.lo_offset / 4 + c4;
  if (L.phases == 1)
    for (int8_t* buf : {act1, act2}) {
      ZeroPadding(g, L, c4, buf);
      if (w.split) ZeroPadding(g, L, lo_group, buf);
    }
  for (int64_t h0 = 0; h0 < g.H; h0 += rows) {
    const int64_t nrows = std::min(rows, g.H - h0);
    for (int i = 0; i < 4; ++i) {  // channels past C keep their zeros
      const int64_t c = 4 * c4 + i;
      if (c < g.C)
        isa.pg_split(x + (c * g.H + h0) * g.W, nrows * g.W, split.s, split.levels, split.shift,
                     counts.data() + (2 * i) * chunk, counts.data() + (2 * i + 1) * chunk);
    }
    for (int64_t h = h0; h < h0 + nrows; ++h)
      for (int64_t w0 = 0; w0 < g.W; w0 += 16) {
        const int n = int(std::min<int64_t>(16, g.W - w0));
        const int64_t at = (h - h0) * g.W + w0;
        const __m512i zh = InterleaveRun(hb, at, n), zl = InterleaveRun(lb, at, n);
        if (w.split) {  // |2 x count| <= 126: no int8 overflow
          StoreRun(_mm512_add_epi8(zh, zh), g, L, h + g.pt, w0, n, c4, act1);
          StoreRun(_mm512_add_epi8(zl, zl), g, L, h + g.pt, w0, n, c4, act2);
          StoreRun(zh, g, L, h + g.pt, w0, n, lo_group, act1);
          StoreRun(zl, g, L, h + g.pt, w0, n, lo_group, act2);
        } else {
          StoreRun(zh, g, L, h + g.pt, w0, n, c4, act1);
          StoreRun(zl, g, L, h + g.pt, w0, n, c4, act2);
        }
      }
  }
}

#endif  // G2D_HAVE_AMX

// Where the 16 positions of a position tile go in the output plane: up to kMaxRuns runs of
// consecutive output pixels (lane mask, and the output index of lane 0 of the run), written
// with masked vector stores. Tiles with more runs (outputs narrower than a few pixels) use
// a scatter through `index`.
constexpr int kMaxRuns = 4;
struct TileRuns {
  int32_t count;  // -1: more than kMaxRuns runs
  uint16_t mask[kMaxRuns];
  int32_t base[kMaxRuns];  // output index of lane 0 (lanes before the run are masked off)
};

// Everything the block loop needs, computed once per sample.
struct BlockJob {
  const PGAmxWeights* w;
  const int8_t *act1, *act2;
  const int64_t* tap_off;
  const int32_t* out_index;   // per position tile: 16 output pixel indices
  const uint16_t* out_valid;  // per position tile: lanes that are real output pixels
  const TileRuns* out_runs;   // per position tile
  int64_t kk, chunk_bytes, plane_bytes, P;
  float scale1, scale2;
  const float* thr;
  float* y;
};

#if G2D_HAVE_AMX

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles: 0-3 int32 sums (output tile n, position tile p at 2n + p), 4-5 weights (output
// tiles), 6-7 activations (position tiles).
G2D_AMX_TARGET void LoadTileConfig(int64_t Kc) {
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) cfg.colsb[t] = 64, cfg.rows[t] = 16;
  for (int t = 4; t < 6; ++t) cfg.colsb[t] = uint16_t(Kc), cfg.rows[t] = 16;
  for (int t = 6; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = uint8_t(Kc / 4);
  _tile_loadconfig(&cfg);
}

// One stage over a block: sums[(2n + p) * 256 + r * 16 + i] = the int32 sum of output
// channel (ot0 + n) * 16 + r at position q0 + 16 p + i.
template <int NB>
G2D_AMX_TARGET void StageTiles(const BlockJob& j, const int8_t* act, int64_t ot0, int64_t q0,
                               int32_t* sums) {
  const PGAmxWeights& w = *j.w;
  const int64_t tile_bytes = 16 * w.Kc, next_otile = j.kk * w.nk * tile_bytes;
  _tile_zero(0);
  _tile_zero(1);
  if constexpr (NB == 2) {
    _tile_zero(2);
    _tile_zero(3);
  }
  const int8_t* wa = w.data.data() + ot0 * next_otile;
  for (int64_t t = 0; t < j.kk; ++t) {
    const int8_t* xa = act + j.tap_off[t] + q0 * 4;
    for (int64_t c = 0; c < w.nk; ++c) {
      _tile_loadd(4, wa, w.Kc);
      if constexpr (NB == 2) _tile_loadd(5, wa + next_otile, w.Kc);
      _tile_loadd(6, xa, j.plane_bytes);
      _tile_loadd(7, xa + 64, j.plane_bytes);
      _tile_dpbssd(0, 4, 6);
      _tile_dpbssd(1, 4, 7);
      if constexpr (NB == 2) {
        _tile_dpbssd(2, 5, 6);
        _tile_dpbssd(3, 5, 7);
      }
      wa += tile_bytes;
      xa += j.chunk_bytes;
    }
  }
  _tile_stored(0, sums, 64);
  _tile_stored(1, sums + 256, 64);
  if constexpr (NB == 2) {
    _tile_stored(2, sums + 512, 64);
    _tile_stored(3, sums + 768, 64);
  }
}

// Blocks [b0, b1) of output tiles ot0 .. ot0 + NB - 1.
template <int NB>
G2D_AMX_TARGET void RunBlocks(const BlockJob& j, int64_t ot0, int64_t b0, int64_t b1) {
  alignas(64) int32_t sums1[1024], sums2[1024];
  __mmask16 gates[2 * NB * 16];
  const int64_t O = j.w->O;
  const __m512 s1 = _mm512_set1_ps(j.scale1), s2 = _mm512_set1_ps(j.scale2);
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t q0 = b * kBlockPositions;
    StageTiles<NB>(j, j.act1, ot0, q0, sums1);
    // Gates of stage 1 (real output pixels and channels only).
    bool any_on = false;
    for (int p = 0; p < 2; ++p) {
      const int64_t tile = q0 / 16 + p;
      const __mmask16 valid = j.out_valid[tile];
      for (int n = 0; n < NB; ++n)
        for (int r = 0; r < 16; ++r) {
          const int64_t o = (ot0 + n) * 16 + r;
          __mmask16& gate = gates[(2 * n + p) * 16 + r];
          gate = 0;
          if (o >= O || !valid) continue;
          const __m512 v = _mm512_mul_ps(
              s1, _mm512_cvtepi32_ps(_mm512_load_si512(sums1 + (2 * n + p) * 256 + r * 16)));
          gate = _mm512_mask_cmp_ps_mask(valid, v, _mm512_set1_ps(j.thr[o]), _CMP_GT_OQ);
          any_on |= gate != 0;
        }
    }
    if (any_on) StageTiles<NB>(j, j.act2, ot0, q0, sums2);
    // y = v + [gate] * (scale2 * acc2), written to the real output pixels.
    for (int p = 0; p < 2; ++p) {
      const int64_t tile = q0 / 16 + p;
      const __mmask16 valid = j.out_valid[tile];
      if (!valid) continue;
      const __m512i index = _mm512_loadu_si512(j.out_index + tile * 16);
      const TileRuns& runs = j.out_runs[tile];
      for (int n = 0; n < NB; ++n)
        for (int r = 0; r < 16; ++r) {
          const int64_t o = (ot0 + n) * 16 + r;
          if (o >= O) break;
          const int at = (2 * n + p) * 256 + r * 16;
          __m512 v = _mm512_mul_ps(s1, _mm512_cvtepi32_ps(_mm512_load_si512(sums1 + at)));
          const __mmask16 gate = gates[(2 * n + p) * 16 + r];
          if (gate)
            v = _mm512_add_ps(v, _mm512_maskz_mul_ps(
                                     gate, s2, _mm512_cvtepi32_ps(_mm512_load_si512(sums2 + at))));
          float* yo = j.y + o * j.P;
          if (runs.count < 0)
            _mm512_mask_i32scatter_ps(yo, valid, index, v, 4);
          else
            for (int k = 0; k < runs.count; ++k)
              _mm512_mask_storeu_ps(yo + runs.base[k], runs.mask[k], v);
        }
    }
  }
}

G2D_AMX_TARGET void RunTask(const BlockJob& j, int64_t ot0, int nb_tiles, int64_t b0, int64_t b1) {
  LoadTileConfig(j.w->Kc);
  if (nb_tiles == 2)
    RunBlocks<2>(j, ot0, b0, b1);
  else
    RunBlocks<1>(j, ot0, b0, b1);
  _tile_release();
}

#endif  // G2D_HAVE_AMX

}  // namespace

PGActLayout MakePGActLayout(const ConvGeom& g, int64_t stored_channels, int64_t block_positions,
                            std::vector<int64_t>* tap_off) {
  PGActLayout L;
  const int64_t Hp = g.H + g.pt + g.pb, Wp = g.W + g.pl + g.pr;
  const int64_t Hs = (Hp + g.sh - 1) / g.sh;
  L.Ws = (Wp + g.sw - 1) / g.sw;
  L.phases = g.sh * g.sw;
  L.groups = stored_channels / 4;
  L.nq = g.OH * L.Ws;
  L.blocks = (L.nq + block_positions - 1) / block_positions;
  // A tap (dy, dx) reads padded pixel (oh * sh + dy * dh, ow * sw + dx * dw): phase
  // (dy * dh % sh, dx * dw % sw), (dy * dh / sh) rows and (dx * dw / sw) columns on from the
  // output position's own word (WordOf).
  int64_t max_shift = 0;
  for (int64_t dy = 0; dy < g.kh; ++dy)
    for (int64_t dx = 0; dx < g.kw; ++dx)
      max_shift = std::max(max_shift, (dy * g.dh / g.sh) * L.Ws + dx * g.dw / g.sw);
  // Every block's loads stay inside the plane: the last block's last position plus any shift.
  L.plane_len = RoundUp(std::max(Hs * L.Ws, L.blocks * block_positions + max_shift), 16);
  tap_off->resize(size_t(g.kk()));
  for (int64_t dy = 0; dy < g.kh; ++dy)
    for (int64_t dx = 0; dx < g.kw; ++dx)
      (*tap_off)[size_t(dy * g.kw + dx)] = L.WordOf(g, dy * g.dh, dx * g.dw, 0) * 4;
  return L;
}

bool AmxAvailable() {
#if G2D_HAVE_AMX
  static const bool available = DetectAmx();
  return available;
#else
  return false;
#endif
}

std::shared_ptr<const PGAmxWeights> PackPGAmxWeights(const int16_t* w_q, const ConvGeom& g) {
  if (g.group != 1 || g.Cw != g.C) return nullptr;
  const int64_t kk = g.kk(), n = g.O * g.C * kk;
  int max_abs = 0;
  for (int64_t i = 0; i < n; ++i) max_abs = std::max(max_abs, std::abs(int(w_q[i])));
  if (max_abs > 255) return nullptr;
  auto w = std::make_shared<PGAmxWeights>();
  w->O = g.O;
  w->C = g.C;
  w->kk = kk;
  w->split = max_abs > 127;
  const int64_t C4 = RoundUp(g.C, 4);
  w->lo_offset = w->split ? C4 : 0;
  const int64_t Cx = w->split ? 2 * C4 : C4;
  w->Kc = std::min<int64_t>(Cx, 64);
  w->Cxp = RoundUp(Cx, w->Kc);
  w->nk = w->Cxp / w->Kc;
  w->otiles = (g.O + 15) / 16;
  // int32 sums stay exact: |sum| <= K * 127 * 127.
  if (double(w->Cxp) * double(kk) * 127.0 * 127.0 >= 2147483647.0) return nullptr;
  w->data.assign(size_t(w->otiles * kk * w->nk * 16 * w->Kc), 0);
  int8_t* out = w->data.data();
  for (int64_t ot = 0; ot < w->otiles; ++ot)
    for (int64_t t = 0; t < kk; ++t)
      for (int64_t c = 0; c < w->nk; ++c)
        for (int64_t r = 0; r < 16; ++r)
          for (int64_t col = 0; col < w->Kc; ++col, ++out) {
            const int64_t o = ot * 16 + r, k = c * w->Kc + col;
            if (o >= g.O) continue;
            if (k < g.C) {
              const int q = w_q[(o * g.C + k) * kk + t];
              *out = int8_t(w->split ? (q >> 1) : q);  // floor(q / 2): arithmetic shift
            } else if (w->split && k >= w->lo_offset && k < w->lo_offset + g.C) {
              const int q = w_q[(o * g.C + k - w->lo_offset) * kk + t];
              *out = int8_t(q - 2 * (q >> 1));
            }
          }
  return w;
}

void RunPGAmx(OrtKernelContext* ctx, const PGAmxWeights& w, const ConvGeom& g, const float* x,
              const PGSplit& split, float scale1, float scale2, const float* threshold,
              float* y) {
#if G2D_HAVE_AMX
  std::vector<int64_t> tap_off;
  const ActLayout L = MakePGActLayout(g, w.Cxp, kBlockPositions, &tap_off);

  // Both stages' activations, zero-padded. The scratch buffers are shared with layers of
  // other shapes, so the zeros are written on every call (once for all samples): with stride 1, FillGroup zeroes
  // the padding positions of the groups it writes, and only the unused groups are cleared
  // here; strided layouts are cleared whole.
  AlignedVec<int8_t>& act1 = Scratch<int8_t, 23>();
  AlignedVec<int8_t>& act2 = Scratch<int8_t, 24>();
  const int64_t c4s = (g.C + 3) / 4, used_groups = w.split ? 2 * c4s : c4s;
  const bool stride1 = L.phases == 1;
  for (AlignedVec<int8_t>* a : {&act1, &act2}) {
    a->resize(size_t(L.Bytes()));
    const int64_t from = stride1 ? used_groups * L.PlaneBytes() : 0;
    std::memset(a->data() + from, 0, size_t(L.Bytes() - from));
  }
  // Output pixel of each position (padding columns and the tail are not output pixels).
  const int64_t ntiles = L.blocks * kBlockPositions / 16;
  AlignedVec<int32_t>& out_index = Scratch<int32_t, 25>();
  AlignedVec<uint16_t>& out_valid = Scratch<uint16_t, 26>();
  out_index.assign(size_t(ntiles * 16), 0);
  out_valid.assign(size_t(ntiles), 0);
  for (int64_t oh = 0; oh < g.OH; ++oh)
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      const int64_t q = oh * L.Ws + ow;
      out_index[size_t(q)] = int32_t(oh * g.OW + ow);
      out_valid[size_t(q / 16)] |= uint16_t(1u << (q % 16));
    }
  AlignedVec<TileRuns>& out_runs = Scratch<TileRuns, 27>();
  out_runs.resize(size_t(ntiles));
  for (int64_t tile = 0; tile < ntiles; ++tile) {
    TileRuns& r = out_runs[size_t(tile)];
    r.count = 0;
    const int32_t* index = out_index.data() + tile * 16;
    for (int i = 0; i < 16 && r.count >= 0; ++i) {
      if (!((out_valid[size_t(tile)] >> i) & 1)) continue;
      const bool extends = r.count > 0 && ((r.mask[r.count - 1] >> (i - 1)) & 1) &&
                           index[i] == index[i - 1] + 1;
      if (!extends) {
        if (r.count == kMaxRuns) {
          r.count = -1;
          break;
        }
        r.mask[r.count] = 0;
        r.base[r.count] = index[i] - i;
        ++r.count;
      }
      r.mask[r.count - 1] |= uint16_t(1u << i);
    }
  }

  const IsaKernels& isa = BestKernels();
  const int64_t pairs = (w.otiles + 1) / 2;
  const int64_t chunks = (L.blocks + kBlocksPerTask - 1) / kBlocksPerTask;
  const int64_t tile_products = pairs * L.blocks * g.kk() * w.nk * 4;
  // One sample: its activations into (act1, act2) (FillGroup, over `fill_ctx`'s pool), then
  // its blocks (over `block_ctx`'s); the tables above are read-only and shared.
  auto run_sample = [&](int64_t n, int8_t* a1, int8_t* a2, OrtKernelContext* fill_ctx,
                        OrtKernelContext* block_ctx) {
    const float* xn = x + n * g.C * g.H * g.W;
    ParallelFor(fill_ctx, size_t(c4s), [&](size_t c4) {
      FillGroup(isa, xn, split, w, g, L, int64_t(c4), a1, a2);
    });
    const BlockJob job{&w,
                       a1,
                       a2,
                       tap_off.data(),
                       out_index.data(),
                       out_valid.data(),
                       out_runs.data(),
                       g.kk(),
                       (w.Kc / 4) * L.PlaneBytes(),
                       L.PlaneBytes(),
                       g.P(),
                       scale1,
                       scale2,
                       threshold,
                       y + n * g.O * g.P()};
    ParallelFor(block_ctx, size_t(pairs * chunks), [&](size_t i) {
      const int64_t pair = int64_t(i) / chunks, chunk = int64_t(i) % chunks;
      const int64_t ot0 = 2 * pair, b0 = chunk * kBlocksPerTask;
      RunTask(job, ot0, ot0 + 1 < w.otiles ? 2 : 1, b0, std::min(L.blocks, b0 + kBlocksPerTask));
    });
    amx_runs.fetch_add(1, std::memory_order_relaxed);
  };
  const bool split_blocks = tile_products >= kParallelTileProducts;
  if (!split_blocks && g.N > 1 && g.N <= kMaxParallelSamples) {
    // A batch of small layers (each sample's blocks too few to split over threads, see
    // kParallelTileProducts): the samples run in parallel instead, each on its own pair of
    // activation buffers (allocated here, on the calling thread: a pool thread must not
    // throw), zeroed by its task where FillGroup does not write (measured: the PG ResNet-20 at
    // batch 8 and 2 threads ran at 0.81-0.87x its dense twin with the samples one after
    // another, the second thread idle in its 8x8 and 16x16 layers).
    AlignedVec<int8_t>& per_sample = Scratch<int8_t, 29>();
    const int64_t bytes = L.Bytes(), from = stride1 ? used_groups * L.PlaneBytes() : 0;
    per_sample.resize(size_t(2 * g.N * bytes));
    ParallelFor(ctx, size_t(g.N), [&](size_t n) {
      int8_t* a1 = per_sample.data() + 2 * int64_t(n) * bytes;
      int8_t* a2 = a1 + bytes;
      std::memset(a1 + from, 0, size_t(bytes - from));
      std::memset(a2 + from, 0, size_t(bytes - from));
      run_sample(int64_t(n), a1, a2, nullptr, nullptr);
    });
    return;
  }
  for (int64_t n = 0; n < g.N; ++n)  // every sample writes the same positions: the zeros stay
    run_sample(n, act1.data(), act2.data(), ParallelIfLarge(ctx, 4 * g.C * g.H * g.W),
               split_blocks ? ctx : nullptr);
#else
  throw OpError("PGConv: AMX path called on a build without AMX support");
#endif
}

}  // namespace g2d

// How many samples PGConv has run on AMX in this process (tests check the path was taken).
extern "C" __attribute__((visibility("default"))) int64_t G2DAmxConvRuns() {
  return g2d::amx_runs.load(std::memory_order_relaxed);
}
