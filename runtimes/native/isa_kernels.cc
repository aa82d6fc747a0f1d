// Vector inner loops, compiled once per instruction set (see isa_kernels.h). The build passes
// -DG2D_ISA_NS=<namespace> and the matching -m flags; nothing here may be called unless the
// CPU supports those flags (BestKernels() in conv_common.cc checks cpuid).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "isa_kernels.h"

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#else
#include <emmintrin.h>  // SSE2, part of every x86-64 CPU
#endif

#ifndef G2D_ISA_NS
#error "compile with -DG2D_ISA_NS=isa_generic|isa_avx2|isa_avx512"
#endif

namespace g2d {
namespace G2D_ISA_NS {
namespace {

#if defined(__AVX512F__)
constexpr int kVW = 16;  // floats per vector register
constexpr int kMR = 8, kIMR = 8;
constexpr const char* kName = "avx512";
#elif defined(__AVX2__)
constexpr int kVW = 8;
constexpr int kMR = 6, kIMR = 6;
constexpr const char* kName = "avx2";
#else
constexpr int kVW = 4;
constexpr int kMR = 4, kIMR = 4;
constexpr const char* kName = "generic";
#endif
constexpr int kNR = 2 * kVW;   // two vectors of columns per micro-tile row
constexpr int kINR = 2 * kVW;  // int32 lanes: one lane per column, each lane a pair of int16

// GCC vector extension: one source for every width; may_alias + aligned(4) so any float*
// can be loaded without alignment requirements.
typedef float vf __attribute__((vector_size(kVW * 4), aligned(4), may_alias));
typedef int32_t vi32 __attribute__((vector_size(kVW * 4)));  // int32 lanes, as vf

inline vf load(const float* p) { return *reinterpret_cast<const vf*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf*>(p) = v; }

// C tile (+)= A panel * B panel; row k of B comes from b_row(k) (two vectors of columns).
// R <= kMR: the rows computed (the A panel keeps its kMR-row layout; rows R.. are skipped).
template <int R, class BRow>
inline void sgemm_tile_rows(int64_t K, const float* a, BRow b_row, float* c, int64_t ldc,
                            int m_valid, int n_valid, bool accumulate) {
  m_valid = std::min(m_valid, R);
  vf acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    const float* bk = b_row(k);
    const vf b0 = load(bk), b1 = load(bk + kVW);
    const float* ak = a + k * kMR;
    for (int r = 0; r < R; ++r) {
      acc[r][0] += b0 * ak[r];
      acc[r][1] += b1 * ak[r];
    }
  }
  if (n_valid == kNR) {
    for (int r = 0; r < m_valid; ++r) {
      float* cr = c + r * ldc;
      if (accumulate) {
        store(cr, load(cr) + acc[r][0]);
        store(cr + kVW, load(cr + kVW) + acc[r][1]);
      } else {
        store(cr, acc[r][0]);
        store(cr + kVW, acc[r][1]);
      }
    }
    return;
  }
  float tile[kNR];
  for (int r = 0; r < m_valid; ++r) {
    store(tile, acc[r][0]);
    store(tile + kVW, acc[r][1]);
    float* cr = c + r * ldc;
    for (int j = 0; j < n_valid; ++j) cr[j] = accumulate ? cr[j] + tile[j] : tile[j];
  }
}

// A tile with fewer valid rows than kMR (a row panel's last tile: a CG group of 4 or 8 outputs
// on AVX2's 6-row tile) computes only as many rows as it needs, in steps of 2: at 4 valid rows
// of 6 the full tile spent a third of its multiply-adds on the zero padding.
template <class BRow>
inline void sgemm_tile(int64_t K, const float* a, BRow b_row, float* c, int64_t ldc, int m_valid,
                       int n_valid, bool accumulate) {
  if (kMR > 2 && m_valid <= 2)
    sgemm_tile_rows<2>(K, a, b_row, c, ldc, m_valid, n_valid, accumulate);
  else if (kMR > 4 && m_valid <= 4)
    sgemm_tile_rows<4>(K, a, b_row, c, ldc, m_valid, n_valid, accumulate);
  else if (kMR > 6 && m_valid <= 6)
    sgemm_tile_rows<(kMR > 6 ? 6 : kMR)>(K, a, b_row, c, ldc, m_valid, n_valid, accumulate);
  else
    sgemm_tile_rows<kMR>(K, a, b_row, c, ldc, m_valid, n_valid, accumulate);
}

void sgemm_micro(int64_t K, const float* a, const float* b, float* c, int64_t ldc, int m_valid,
                 int n_valid, bool accumulate) {
  sgemm_tile(K, a, [b](int64_t k) { return b + k * kNR; }, c, ldc, m_valid, n_valid, accumulate);
}

void sgemm_indirect_micro(int64_t K, const float* a, const float* base, const int64_t* off,
                          float* c, int64_t ldc, int m_valid, int n_valid, bool accumulate) {
  sgemm_tile(K, a, [base, off](int64_t k) { return base + off[k]; }, c, ldc, m_valid, n_valid,
             accumulate);
}

int64_t gate_panel(const float* acc, int64_t M, float scale, const float* thr,
                   const uint8_t* valid, float* out, uint8_t* gate, int64_t ld) {
  typedef uint8_t vu8 __attribute__((vector_size(kVW)));
  vi32 valid_mask[2];
  // valid's 0 / 1 bytes widened and negated to 0 / -1 lanes: per lane, this set-up was most of
  // a call's cost for the 4-row panels of block-diagonal CG (perf, 16-channel 32x32 layer).
  for (int h = 0; h < 2; ++h) {
#if defined(__AVX512F__)
    valid_mask[h] = vi32(_mm512_sub_epi32(_mm512_setzero_si512(), _mm512_cvtepu8_epi32(_mm_loadu_si128(
                                              reinterpret_cast<const __m128i*>(valid + h * kVW)))));
#elif defined(__AVX2__)
    valid_mask[h] = vi32(_mm256_sub_epi32(_mm256_setzero_si256(), _mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                              reinterpret_cast<const __m128i*>(valid + h * kVW)))));
#else
    for (int l = 0; l < kVW; ++l) valid_mask[h][l] = valid[h * kVW + l] ? -1 : 0;
#endif
  }
  vi32 count = vi32{};
  for (int64_t m = 0; m < M; ++m) {
    const vf tv = vf{} + thr[m];
    vi32 on[2];
    for (int h = 0; h < 2; ++h) {
      const vf v = load(acc + m * kNR + h * kVW) * scale;
      store(out + m * ld + h * kVW, v);
      on[h] = (v > tv) & valid_mask[h];  // -1 where gated on
      count -= on[h];
    }
#if defined(__AVX2__) && !defined(__AVX512F__)
    // The 16 masks to 16 bytes with saturating packs (the generic conversion below compiles
    // to one lane extract and shift per byte with AVX2: it was most of the gate's time).
    const __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(__m256i(on[0]), __m256i(on[1])), 0xD8);
    const __m128i bytes = _mm_packs_epi16(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(gate + m * ld), _mm_and_si128(bytes, _mm_set1_epi8(1)));
#else
    for (int h = 0; h < 2; ++h) {
      const vu8 bytes = __builtin_convertvector(-on[h], vu8);
      std::memcpy(gate + m * ld + h * kVW, &bytes, kVW);
    }
#endif
  }
  int64_t total = 0;
  for (int l = 0; l < kVW; ++l) total += count[l];
  return total;
}

void select_add(const float* acc, int64_t M, float scale, const uint8_t* gate, float* out,
                int64_t ld) {
  for (int64_t m = 0; m < M; ++m) {
    const float* am = acc + m * kNR;
    const uint8_t* gm = gate + m * ld;
    float* om = out + m * ld;
#if defined(__AVX512F__)
    // A masked add (a builtin, never contracted with the product into an FMA).
    const __m128i ones = _mm_set1_epi8(1);
    const __m512 s = _mm512_set1_ps(scale);
    for (int h = 0; h < kNR; h += 16) {
      const __mmask16 on = _mm_test_epi8_mask(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(gm + h)), ones);
      const __m512 o = _mm512_loadu_ps(om + h);
      _mm512_storeu_ps(om + h, _mm512_mask_add_ps(o, on, o, _mm512_mul_ps(s, _mm512_loadu_ps(am + h))));
    }
#else
    // The product masked to +0 where the gate is off (bit operations: no contraction), added,
    // and the sum kept only where the gate is on (out + 0 would turn -0.0 into +0.0).
    for (int64_t t = 0; t < kNR; ++t) {
      const float v = scale * am[t];
      uint32_t vb, ob;
      std::memcpy(&vb, &v, 4);
      const uint32_t on = 0u - uint32_t(gm[t]);
      vb &= on;
      float masked, sum;
      std::memcpy(&masked, &vb, 4);
      sum = om[t] + masked;
      uint32_t sb;
      std::memcpy(&sb, &sum, 4);
      std::memcpy(&ob, om + t, 4);
      ob = (sb & on) | (ob & ~on);
      std::memcpy(om + t, &ob, 4);
    }
#endif
  }
}

// Horizontal sum of one vector.
inline float hsum(vf v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(__m512(v));
#else
  float lanes[kVW];
  store(lanes, v);
  float s = 0.f;
  for (int l = 0; l < kVW; ++l) s += lanes[l];
  return s;
#endif
}

// Registers: NV weight vectors + 8 accumulators: 8 independent FMA chains (the FMA latency x
// ports) whether 4, 2 or 1 pixels are in flight (CH = 8 / NP chains per pixel, each over
// every CH-th weight vector).
#if defined(__AVX512F__)
constexpr int kSddmmMaxVecs = 16;  // 16 weights + 8 accumulators + temporaries <= 32 zmm
#else
constexpr int kSddmmMaxVecs = 6;   // 16 ymm/xmm registers
#endif

// NP pixels (fields rows f[0..NP-1]) against the NV weight vectors wv.
template <int NV, int NP>
inline void sddmm_group(const vf* wv, const float* const* f, float* partial, bool accumulate,
                        float* out) {
  constexpr int CH = 8 / NP;
  vf acc[NP][CH];
  for (int p = 0; p < NP; ++p)
    for (int c = 0; c < CH; ++c) acc[p][c] = vf{};
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v)
    for (int p = 0; p < NP; ++p) acc[p][v % CH] += wv[v] * load(f[p] + v * kVW);
  for (int p = 0; p < NP; ++p) {
    vf sum = acc[p][0];
    for (int c = 1; c < CH; ++c) sum += acc[p][c];
    if (accumulate) sum += load(partial + p * kVW);
    if (out)
      out[p] = hsum(sum);
    else
      store(partial + p * kVW, sum);
  }
}

template <int NV>
void sddmm_chunk_n(const float* w, const float* fields, int64_t ld, const int32_t* cols, int n,
                   float* partial, bool accumulate, float* out) {
  vf wv[NV];
  for (int v = 0; v < NV; ++v) wv[v] = load(w + v * kVW);  // stays in registers for the row
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    const float* f[4] = {fields + cols[i] * ld, fields + cols[i + 1] * ld,
                         fields + cols[i + 2] * ld, fields + cols[i + 3] * ld};
    sddmm_group<NV, 4>(wv, f, partial + i * kVW, accumulate, out ? out + i : nullptr);
  }
  if (i + 2 <= n) {
    const float* f[2] = {fields + cols[i] * ld, fields + cols[i + 1] * ld};
    sddmm_group<NV, 2>(wv, f, partial + i * kVW, accumulate, out ? out + i : nullptr);
    i += 2;
  }
  if (i < n) {
    const float* f[1] = {fields + cols[i] * ld};
    sddmm_group<NV, 1>(wv, f, partial + i * kVW, accumulate, out ? out + i : nullptr);
  }
}

template <int... V>
void sddmm_dispatch(std::integer_sequence<int, V...>, int nvec, const float* w,
                    const float* fields, int64_t ld, const int32_t* cols, int n, float* partial,
                    bool accumulate, float* out) {
  using Fn = void (*)(const float*, const float*, int64_t, const int32_t*, int, float*, bool,
                      float*);
  static constexpr Fn table[] = {sddmm_chunk_n<V + 1>...};
  table[nvec - 1](w, fields, ld, cols, n, partial, accumulate, out);
}

void sddmm_chunk(int nvec, const float* w, const float* fields, int64_t ld, const int32_t* cols,
                 int n, float* partial, bool accumulate, float* out) {
  sddmm_dispatch(std::make_integer_sequence<int, kSddmmMaxVecs>{}, nvec, w, fields, ld, cols, n,
                 partial, accumulate, out);
}

#if defined(__AVX512F__)
// In-register transpose of 16 rows of 16 floats (rows r[0..15] -> columns).
inline void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int q = 0; q < 4; ++q) {  // rows 4q .. 4q+3
    u[4 * q + 0] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], 0x44);
    u[4 * q + 1] = _mm512_shuffle_ps(t[4 * q], t[4 * q + 2], 0xEE);
    u[4 * q + 2] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0x44);
    u[4 * q + 3] = _mm512_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0xEE);
  }
  // u[4q + e] holds, in 128-bit lane L, rows 4q..4q+3 at column 4L + e.
  for (int e = 0; e < 4; ++e) {
    const __m512 v0 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0x88);
    const __m512 v1 = _mm512_shuffle_f32x4(u[e], u[4 + e], 0xDD);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0x88);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + e], u[12 + e], 0xDD);
    r[e] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[8 + e] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    r[4 + e] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[12 + e] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}

void gather_fields(const float* base, const int64_t* off, int64_t K, int64_t Lpad, float* fields,
                   int n) {
  int64_t k0 = 0;
  for (; k0 + 16 <= K; k0 += 16) {
    for (int tb = 0; tb < n; tb += 16) {
      // A partial block (n not a multiple of 16: a 16- or 8-pixel row of a CIFAR layer's
      // channel-last copy) by masked loads, not column by column.
      const int cols = std::min(16, n - tb);
      const __mmask16 m = __mmask16((1u << cols) - 1);
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_ps(m, base + off[k0 + i] + tb);
      transpose16(r);
      for (int j = 0; j < cols; ++j) _mm512_storeu_ps(fields + (tb + j) * Lpad + k0, r[j]);
    }
  }
  for (int t = 0; t < n; ++t) {
    for (int64_t k = k0; k < K; ++k) fields[t * Lpad + k] = base[off[k] + t];
    for (int64_t k = K; k < Lpad; ++k) fields[t * Lpad + k] = 0.f;
  }
}

void scatter_lanes(const float* src, int64_t ld, int64_t n, float* const* dst, int lanes) {
  int64_t t0 = 0;
  if (ld == 16 && lanes == 16) {
    for (; t0 + 16 <= n; t0 += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + (t0 + i) * 16);
      transpose16(r);
      for (int l = 0; l < 16; ++l) _mm512_storeu_ps(dst[l] + t0, r[l]);
    }
  }
  for (int l = 0; l < lanes; ++l)
    for (int64_t t = t0; t < n; ++t) dst[l][t] = src[t * ld + l];
}
#else
void scatter_lanes(const float* src, int64_t ld, int64_t n, float* const* dst, int lanes) {
  constexpr int64_t kTile = 64;  // the tile's source rows stay in L1 while each lane is written
  for (int64_t t0 = 0; t0 < n; t0 += kTile)
    for (int l = 0; l < lanes; ++l)
      for (int64_t t = t0; t < std::min(n, t0 + kTile); ++t) dst[l][t] = src[t * ld + l];
}

void gather_fields(const float* base, const int64_t* off, int64_t K, int64_t Lpad, float* fields,
                   int n) {
  int64_t k0 = 0;
#if defined(__AVX2__)
  // 8 x 8 register transposes (unpack, shuffle, 128-bit permute); the scalar loop below did
  // one strided store per value (CGConv's channel-last copy, FBS's NCHWc gather).
  const int n8 = n / 8 * 8;
  for (; k0 + 8 <= K; k0 += 8) {
    for (int t = n8; t < n; ++t)  // columns past the last whole block of 8
      for (int i = 0; i < 8; ++i) fields[t * Lpad + k0 + i] = base[off[k0 + i] + t];
    for (int tb = 0; tb < n8; tb += 8) {
      __m256 r[8], t[8], u[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(base + off[k0 + i] + tb);
      for (int i = 0; i < 4; ++i) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
      }
      for (int q = 0; q < 2; ++q) {  // rows 4q .. 4q+3
        u[4 * q + 0] = _mm256_shuffle_ps(t[4 * q], t[4 * q + 2], 0x44);
        u[4 * q + 1] = _mm256_shuffle_ps(t[4 * q], t[4 * q + 2], 0xEE);
        u[4 * q + 2] = _mm256_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0x44);
        u[4 * q + 3] = _mm256_shuffle_ps(t[4 * q + 1], t[4 * q + 3], 0xEE);
      }
      // u[4q + e] holds rows 4q..4q+3 at columns e (low 128 bits) and 4 + e (high).
      for (int e = 0; e < 4; ++e) {
        _mm256_storeu_ps(fields + (tb + e) * Lpad + k0, _mm256_permute2f128_ps(u[e], u[4 + e], 0x20));
        _mm256_storeu_ps(fields + (tb + 4 + e) * Lpad + k0,
                         _mm256_permute2f128_ps(u[e], u[4 + e], 0x31));
      }
    }
  }
#endif
  for (int64_t k = k0; k < K; ++k) {
    const float* s = base + off[k];
    for (int t = 0; t < n; ++t) fields[t * Lpad + k] = s[t];
  }
  for (int t = 0; t < n; ++t)
    for (int64_t k = K; k < Lpad; ++k) fields[t * Lpad + k] = 0.f;
}
#endif

#if defined(__AVX512F__)
typedef __m512i vi;
inline vi iload(const void* p) { return _mm512_loadu_si512(p); }
// vpdpwssd through inline assembly: GCC 12's intrinsic moved each accumulator to another
// register and back around every product (objdump of the int16 GEMM), as in pg_int8.cc.
inline vi madd_acc(vi acc, vi a, vi b) {
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
  return acc;
}
inline vi ibroadcast(const int16_t* pair) {
  int32_t v;
  std::memcpy(&v, pair, 4);
  return _mm512_set1_epi32(v);
}
inline void istore(int32_t* p, vi v) { _mm512_storeu_si512(p, v); }
inline vi izero() { return _mm512_setzero_si512(); }
#elif defined(__AVX2__)
typedef __m256i vi;
inline vi iload(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline vi madd_acc(vi acc, vi a, vi b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
inline vi ibroadcast(const int16_t* pair) {
  int32_t v;
  std::memcpy(&v, pair, 4);
  return _mm256_set1_epi32(v);
}
inline void istore(int32_t* p, vi v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
inline vi izero() { return _mm256_setzero_si256(); }
#endif

#if defined(__AVX2__) || defined(__AVX512F__)
void igemm_micro(int64_t Kp, const int16_t* a, const int16_t* b, int32_t* c, int64_t ldc,
                 int m_valid, int n_valid, bool accumulate) {
  vi acc[kIMR][2];
  for (int r = 0; r < kIMR; ++r) acc[r][0] = acc[r][1] = izero();
  for (int64_t kp = 0; kp < Kp / 2; ++kp) {
    const int16_t* bk = b + kp * kINR * 2;
    const vi b0 = iload(bk), b1 = iload(bk + kVW * 2);
    const int16_t* ak = a + kp * kIMR * 2;
    for (int r = 0; r < kIMR; ++r) {
      const vi ar = ibroadcast(ak + 2 * r);
      acc[r][0] = madd_acc(acc[r][0], ar, b0);
      acc[r][1] = madd_acc(acc[r][1], ar, b1);
    }
  }
  int32_t tile[kINR];
  for (int r = 0; r < m_valid; ++r) {
    istore(tile, acc[r][0]);
    istore(tile + kVW, acc[r][1]);
    int32_t* cr = c + r * ldc;
    for (int j = 0; j < n_valid; ++j) cr[j] = accumulate ? cr[j] + tile[j] : tile[j];
  }
}

void idot_rows(const int16_t* x, const int16_t* const* rows, int nrows, int64_t len,
               int32_t* out) {
  constexpr int kStep = kVW * 2;  // int16 per vector
  const int16_t* r0 = rows[0];
  const int16_t* r1 = nrows > 1 ? rows[1] : r0;
  const int16_t* r2 = nrows > 2 ? rows[2] : r0;
  const int16_t* r3 = nrows > 3 ? rows[3] : r0;
  vi a0 = izero(), a1 = izero(), a2 = izero(), a3 = izero();
  for (int64_t k = 0; k < len; k += kStep) {
    const vi xv = iload(x + k);
    a0 = madd_acc(a0, xv, iload(r0 + k));
    a1 = madd_acc(a1, xv, iload(r1 + k));
    a2 = madd_acc(a2, xv, iload(r2 + k));
    a3 = madd_acc(a3, xv, iload(r3 + k));
  }
  const vi acc[4] = {a0, a1, a2, a3};
  for (int i = 0; i < nrows; ++i) {
    int32_t lanes[kVW];
    istore(lanes, acc[i]);
    int32_t s = 0;
    for (int l = 0; l < kVW; ++l) s += lanes[l];
    out[i] = s;
  }
}
#else
void igemm_micro(int64_t Kp, const int16_t* a, const int16_t* b, int32_t* c, int64_t ldc,
                 int m_valid, int n_valid, bool accumulate) {
  int32_t acc[kIMR][kINR] = {};
  for (int64_t kp = 0; kp < Kp / 2; ++kp) {
    const int16_t* bk = b + kp * kINR * 2;
    const int16_t* ak = a + kp * kIMR * 2;
    for (int r = 0; r < kIMR; ++r)
      for (int j = 0; j < kINR; ++j)
        acc[r][j] += int32_t(ak[2 * r]) * bk[2 * j] + int32_t(ak[2 * r + 1]) * bk[2 * j + 1];
  }
  for (int r = 0; r < m_valid; ++r)
    for (int j = 0; j < n_valid; ++j) c[r * ldc + j] = accumulate ? c[r * ldc + j] + acc[r][j] : acc[r][j];
}

void idot_rows(const int16_t* x, const int16_t* const* rows, int nrows, int64_t len,
               int32_t* out) {
  for (int i = 0; i < nrows; ++i) {
    int32_t s = 0;
    for (int64_t k = 0; k < len; ++k) s += int32_t(x[k]) * rows[i][k];
    out[i] = s;
  }
}
#endif

}  // namespace

namespace {
// The epilogue's affine part on a float or a vector: one definition for epilogue_row and
// store_runs, so a fused store rounds as the separate pass does.
template <class V>
inline V Affine(V v, float g, float s, float sh, float b) {
  return g * (s * v + sh) + b;
}
// std::max(v, 0.f), on a float or lane by lane (NaN stays NaN, -0.0 stays -0.0).
inline float Relu(float v) { return std::max(v, 0.f); }
inline vf Relu(vf v) { return v < vf{} ? vf{} : v; }
}  // namespace

void epilogue_row(float* v, int64_t n, float g, float s, float sh, float b, const float* r,
                  bool relu) {
  // Four loops without branches inside, so each vectorizes.
  if (r && relu)
    for (int64_t i = 0; i < n; ++i) v[i] = std::max(Affine(v[i], g, s, sh, b) + r[i], 0.f);
  else if (r)
    for (int64_t i = 0; i < n; ++i) v[i] = Affine(v[i], g, s, sh, b) + r[i];
  else if (relu)
    for (int64_t i = 0; i < n; ++i) v[i] = std::max(Affine(v[i], g, s, sh, b), 0.f);
  else
    for (int64_t i = 0; i < n; ++i) v[i] = Affine(v[i], g, s, sh, b);
}

namespace {
template <bool kAffine, bool kRelu>
void StoreRuns(const float* src, int64_t ld, int64_t M, const int* rows, const int32_t* at,
               const int32_t* len, const int64_t* dst, int nruns, const float* scale,
               const float* shift, float* y, int64_t ld_y) {
  for (int64_t m = 0; m < M; ++m) {
    const float* sm = src + m * ld;
    float* ym = y + int64_t(rows[m]) * ld_y;
    const float s = kAffine ? scale[rows[m]] : 1.f, b = kAffine ? shift[rows[m]] : 0.f;
    auto value = [s, b](auto v) {  // a float or a vector
      if (kAffine) v = Affine(v, 1.f, s, 0.f, b);
      return kRelu ? Relu(v) : v;
    };
    for (int r = 0; r < nruns; ++r) {
      const float* in = sm + at[r];
      float* out = ym + dst[r];
      const int64_t n = len[r];
      int64_t i = 0;
      for (; i + kVW <= n; i += kVW) store(out + i, value(load(in + i)));
      if (i == n) continue;
#if defined(__AVX512F__)
      const __mmask16 tail = __mmask16((1u << (n - i)) - 1);
      _mm512_mask_storeu_ps(out + i, tail, __m512(value(vf(_mm512_maskz_loadu_ps(tail, in + i)))));
#else
      for (; i < n; ++i) out[i] = value(in[i]);
#endif
    }
  }
}
}  // namespace

void store_runs(const float* src, int64_t ld, int64_t M, const int* rows, const int32_t* at,
                const int32_t* len, const int64_t* dst, int nruns, const float* scale,
                const float* shift, bool relu, float* y, int64_t ld_y) {
  const bool affine = scale != nullptr;
  auto run = affine ? (relu ? StoreRuns<true, true> : StoreRuns<true, false>)
                    : (relu ? StoreRuns<false, true> : StoreRuns<false, false>);
  run(src, ld, M, rows, at, len, dst, nruns, scale, shift, y, ld_y);
}

bool has_nonzero(const float* x, int64_t n) {
  // Blocks of 64 values OR their bit patterns without the sign bit (a loop the compiler
  // vectorizes; a per-element early exit does not, and zero channels are scanned to the end).
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    uint32_t any = 0;
    for (int j = 0; j < 64; ++j) {
      uint32_t bits;
      std::memcpy(&bits, x + i + j, 4);
      any |= bits & 0x7fffffffu;
    }
    if (any) return true;
  }
  for (; i < n; ++i)
    if (x[i] != 0.f) return true;
  return false;
}

// pool_channel (isa_kernels.h): 16 independent partials (a loop the compiler vectorizes),
// combined at the end (the sum in double).
// The term a sum pool adds per value (pool_channel's and block_channel_stats': one definition,
// so both layouts round alike).
template <int kKind>
inline float PoolTerm(float v) {
  if constexpr (kKind == kPoolAbsSum) return std::fabs(v);
  else if constexpr (kKind == kPoolSquareSum) return v * v;
  else return v;
}

template <int kKind>
double SumChannel(const float* x, int64_t n) {
  constexpr int kLanes = 16;
  auto term = PoolTerm<kKind>;
  int64_t i = 0;
  float part[kLanes] = {};
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) part[l] += term(x[i + l]);
  double sum = 0.0;
  for (; i < n; ++i) sum += term(x[i]);
  for (int l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

double pool_channel(const float* x, int64_t n, int kind) {
  if (kind == kPoolAbsSum) return SumChannel<kPoolAbsSum>(x, n);
  if (kind == kPoolSquareSum) return SumChannel<kPoolSquareSum>(x, n);
  if (kind != kPoolMax) return SumChannel<kPoolSum>(x, n);
  constexpr int kLanes = 16;
  int64_t i = 0;
  float mxp[kLanes];
  for (int l = 0; l < kLanes; ++l) mxp[l] = x[0];
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) mxp[l] = mxp[l] < x[i + l] ? x[i + l] : mxp[l];
  float mx = x[0];
  for (; i < n; ++i) mx = std::max(mx, x[i]);
  for (int l = 0; l < kLanes; ++l) mx = std::max(mx, mxp[l]);
  return mx;
}
// abs_max: NaN-sticky as the reference's (and PyTorch's) max: a NaN anywhere gives NaN
// (std::max would skip it). Explicit vectors, four running maxima (one is a chain of
// dependent operations), the NaN test a separate flag, not part of the comparison (`m < a ||
// a != a` compiled to scalar branches). A loop over a lane array, left to the compiler,
// came out scalar (vmaxss per element; perf: 3% of a 16-channel 32x32 PG layer).
float abs_max(const float* x, int64_t n) {
  constexpr int kAcc = 4;
  vf m[kAcc] = {};
  vi32 nan = {};
  int64_t i = 0;
  for (; i + kAcc * kVW <= n; i += kAcc * kVW)
    for (int k = 0; k < kAcc; ++k) {
      const vf a = vf(vi32(load(x + i + k * kVW)) & 0x7fffffff);  // |x|
      m[k] = m[k] < a ? a : m[k];
      nan |= vi32(a != a);
    }
  for (; i + kVW <= n; i += kVW) {
    const vf a = vf(vi32(load(x + i)) & 0x7fffffff);
    m[0] = m[0] < a ? a : m[0];
    nan |= vi32(a != a);
  }
  float mx = 0.f;
  int32_t any_nan = 0;
  for (; i < n; ++i) {
    const float a = std::fabs(x[i]);
    mx = mx < a ? a : mx;
    any_nan |= int32_t(a != a);
  }
  for (int k = 1; k < kAcc; ++k) m[0] = m[0] < m[k] ? m[k] : m[0];
  for (int l = 0; l < kVW; ++l) {
    mx = mx < m[0][l] ? m[0][l] : mx;
    any_nan |= nan[l];
  }
  return any_nan ? std::numeric_limits<float>::quiet_NaN() : mx;
}
void pack_filter_tile(const float* w, const int64_t* out_off, int n_out, const int32_t* in_off,
                      int n_in, int64_t kk, int B, float* dst) {
#if defined(__AVX512F__)
  if (B == 16) {
    const __mmask16 in_mask = __mmask16((1u << n_in) - 1u);
    const __m512i idx = _mm512_maskz_loadu_epi32(in_mask, in_off);
    for (int64_t t = 0; t < kk; ++t) {
      __m512 r[16];  // r[lo][li] = w[out_off[lo] + in_off[li] + t]
      for (int lo = 0; lo < 16; ++lo)
        r[lo] = lo < n_out ? _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in_mask, idx,
                                                      w + out_off[lo] + t, 4)
                           : _mm512_setzero_ps();
      transpose16(r);  // r[li][lo]
      for (int li = 0; li < 16; ++li) _mm512_storeu_ps(dst + (t * 16 + li) * 16, r[li]);
    }
    return;
  }
#endif
  for (int64_t t = 0; t < kk; ++t)
    for (int li = 0; li < B; ++li)
      for (int lo = 0; lo < B; ++lo)
        dst[(t * B + li) * B + lo] =
            li < n_in && lo < n_out ? w[out_off[lo] + in_off[li] + t] : 0.f;
}

// PG's split of kVW activations (pg_split): q = round_half_even(min(|x| / s, 1) * levels), 0
// for NaN; negative: lanes where x < 0 (all ones). The scalar tail of pg_split in vector
// extensions: GCC does not vectorize the scalar form itself (its comparisons may trap under the
// default -ftrapping-math); the same operations in the same order, so the same values.
inline vi32 pg_split_q(vf v, vf vs, vf vlevels, vi32* negative) {
  const vf one = vf{} + 1.f, zero = vf{}, magic = vf{} + 8388608.0f;
  const vf a = vf(vi32(v) & 0x7fffffff) / vs;  // |x| / s
  const vf r0 = (one < a ? one : a) * vlevels;  // std::min(a, 1): NaN stays NaN
  const vf r = r0 == r0 ? r0 : zero;
  *negative = v < zero;
  return __builtin_convertvector((r + magic) - magic, vi32);
}

void pg_split(const float* x, int64_t n, float s, float levels, int shift, float* hb,
              float* lb) {
  const int32_t low_mask = (int32_t(1) << shift) - 1;
  const vf zero = vf{}, vs = vf{} + s, vlevels = vf{} + levels;
  int64_t i = 0;
  for (; i + kVW <= n; i += kVW) {
    const vf v = load(x + i);
    vi32 negative;
    const vi32 q = pg_split_q(v, vs, vlevels, &negative);
    const vf sign = __builtin_convertvector(v < zero, vf) - __builtin_convertvector(v > zero, vf);
    store(hb + i, sign * __builtin_convertvector(q >> shift, vf));
    store(lb + i, sign * __builtin_convertvector(q & low_mask, vf));
  }
  for (; i < n; ++i) {
    const float r0 = std::min(std::fabs(x[i]) / s, 1.0f) * levels;
    // NaN (a NaN x, or s NaN or inf) would make the int conversion below undefined: 0 instead,
    // and the caller (PGConv's fp32 path) writes the reference's NaN planes itself.
    const float r = r0 == r0 ? r0 : 0.f;
    // (r + 2^23) - 2^23 rounds 0 <= r < 2^23 half to even in the default rounding mode.
    const int32_t q = int32_t((r + 8388608.0f) - 8388608.0f);
    // sign(x) as the reference's: 0 for 0 (and for NaN, see above).
    const float sign = x[i] > 0.f ? 1.f : (x[i] < 0.f ? -1.f : 0.f);
    hb[i] = sign * float(q >> shift);
    lb[i] = sign * float(q & low_mask);
  }
}

// pg_split_words' vectors with intrinsics (AVX-512BW: 16 words, AVX2: 8): the same values as
// pg_split_q and the sign rule above, in about half the instructions (perf, PG ResNet-20 on AMD
// EPYC Zen 4: the split was the largest part of the PG layers' "pad" stage, and most of its
// instructions the per-channel shifts and ors that placed each count in its byte). The counts
// are rounded half to even by the conversion's own rounding mode (stated, not MXCSR's), zeroed
// where |x| / s is NaN or 0, signed by x's sign bit (counts of +-0 and NaN are 0 anyway), and
// packed four channels to a word by two saturating packs (the counts fit in int8: exact) and
// one in-lane byte shuffle: per 128-bit lane the packs leave [ch0 p0..p3 | ch1 p0..p3 | ch2 ..
// | ch3 ..], the shuffle makes it [p0 ch0..ch3 | p1 ..]. SplitWordsIsa: the tier's vector types
// and the operations that differ between the tiers; SplitWordsVec: the split, once.
#if defined(__AVX512BW__)
struct SplitWordsIsa {
  static constexpr int kN = 16;
  using VF = __m512;
  using VI = __m512i;
  // Channel values x at 16 positions: their signed MSB and LSB counts.
  static void Counts(const float* x, VF vs, VF vlevels, __m128i shift, VI low_mask, VI* hi, VI* lo) {
    const __m512 v = _mm512_loadu_ps(x), zero = _mm512_setzero_ps();
    const __m512 a = _mm512_div_ps(_mm512_abs_ps(v), vs);
    const __mmask16 counted = _mm512_cmp_ps_mask(a, zero, _CMP_GT_OQ);  // not NaN, not 0
    const __m512 r = _mm512_mul_ps(_mm512_min_ps(a, _mm512_set1_ps(1.f)), vlevels);  // NaN: masked off
    const __m512i q =
        _mm512_maskz_cvt_roundps_epi32(counted, r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __mmask16 negative = _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ);
    const __m512i h = _mm512_srl_epi32(q, shift), l = _mm512_and_si512(q, low_mask);
    *hi = _mm512_mask_sub_epi32(h, negative, _mm512_setzero_si512(), h);
    *lo = _mm512_mask_sub_epi32(l, negative, _mm512_setzero_si512(), l);
  }
  static VI PackBytes(VI c0, VI c1, VI c2, VI c3) {
    return _mm512_packs_epi16(_mm512_packs_epi32(c0, c1), _mm512_packs_epi32(c2, c3));
  }
  static VI ShuffleBytes(VI v, VI index) { return _mm512_shuffle_epi8(v, index); }
  static void Store(int32_t* p, VI v) { _mm512_storeu_si512(p, v); }
};
#elif defined(__AVX2__)
struct SplitWordsIsa {
  static constexpr int kN = 8;
  using VF = __m256;
  using VI = __m256i;
  static void Counts(const float* x, VF vs, VF vlevels, __m128i shift, VI low_mask, VI* hi, VI* lo) {
    const __m256 v = _mm256_loadu_ps(x);
    const __m256 a = _mm256_div_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.f), v), vs);
    const __m256i counted = _mm256_castps_si256(_mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_GT_OQ));
    const __m256 r = _mm256_mul_ps(_mm256_min_ps(a, _mm256_set1_ps(1.f)), vlevels);
    // integral after the rounding, so the conversion is exact
    const __m256i q = _mm256_and_si256(
        counted, _mm256_cvttps_epi32(_mm256_round_ps(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)));
    // vpsignd by x's bits: negated where the sign bit is set, zeroed where x is +0 (q is 0 there)
    const __m256i bits = _mm256_castps_si256(v);
    *hi = _mm256_sign_epi32(_mm256_srl_epi32(q, shift), bits);
    *lo = _mm256_sign_epi32(_mm256_and_si256(q, low_mask), bits);
  }
  static VI PackBytes(VI c0, VI c1, VI c2, VI c3) {
    return _mm256_packs_epi16(_mm256_packs_epi32(c0, c1), _mm256_packs_epi32(c2, c3));
  }
  static VI ShuffleBytes(VI v, VI index) { return _mm256_shuffle_epi8(v, index); }
  static void Store(int32_t* p, VI v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), v); }
};
#endif

#if defined(__AVX512BW__) || defined(__AVX2__)
// One split of four channels into their MSB and LSB words, the tier's SplitWordsIsa.
struct SplitWordsVec {
  using I = SplitWordsIsa;
  static constexpr int kN = I::kN;
  I::VF vs, vlevels;
  I::VI low_mask, by_position;
  __m128i shift;
  SplitWordsVec(float s, float levels, int sh)
      : vs(vf{} + s), vlevels(vf{} + levels), low_mask(I::VI(vi32{} + ((int32_t(1) << sh) - 1))),
        shift(_mm_cvtsi32_si128(sh)) {
    // within each 128-bit lane, output byte 4 * k + c (position k, channel c) from input byte
    // 4 * c + k (pshufb reads an index's low four bits: its own lane)
    alignas(64) int8_t index[4 * kVW];
    for (int i = 0; i < 4 * kVW; ++i) index[i] = int8_t(4 * (i & 3) + ((i >> 2) & 3));
    std::memcpy(&by_position, index, sizeof index);
  }
  void Words(const float* const* xc, int64_t at, int32_t* hb, int32_t* lb) const {
    I::VI hi[4], lo[4];
    for (int c = 0; c < 4; ++c) I::Counts(xc[c] + at, vs, vlevels, shift, low_mask, &hi[c], &lo[c]);
    I::Store(hb, I::ShuffleBytes(I::PackBytes(hi[0], hi[1], hi[2], hi[3]), by_position));
    I::Store(lb, I::ShuffleBytes(I::PackBytes(lo[0], lo[1], lo[2], lo[3]), by_position));
  }
};
#endif

void pg_split_words(const float* const* x, int64_t n, float s, float levels, int shift,
                    int32_t* msb, int32_t* lsb) {
#if defined(__AVX512BW__) || defined(__AVX2__)
  const SplitWordsVec k(s, levels, shift);
  auto words = [&](const float* const* xc, int64_t at, int32_t* hb, int32_t* lb) {
    k.Words(xc, at, hb, lb);
  };
  constexpr int kN = SplitWordsVec::kN;
#else
  typedef int32_t vw __attribute__((vector_size(kVW * 4), aligned(4), may_alias));
  const int32_t low_mask = (int32_t(1) << shift) - 1;
  const vf vs = vf{} + s, vlevels = vf{} + levels;
  auto words = [&](const float* const* xc, int64_t at, int32_t* hb, int32_t* lb) {
    vi32 hi = vi32{}, lo = vi32{};
    for (int c = 0; c < 4; ++c) {
      vi32 negative;
      const vi32 q = pg_split_q(load(xc[c] + at), vs, vlevels, &negative);
      // sign(x) * count in two's complement ((v ^ m) - m, m all ones where x < 0; q is 0 where
      // x is 0), its low byte into byte c of the word
      hi |= ((((q >> shift) ^ negative) - negative) & 0xff) << (8 * c);
      lo |= ((((q & low_mask) ^ negative) - negative) & 0xff) << (8 * c);
    }
    *reinterpret_cast<vw*>(hb) = hi;
    *reinterpret_cast<vw*>(lb) = lo;
  };
  constexpr int kN = kVW;
#endif
  int64_t i = 0;
  for (; i + kN <= n; i += kN) words(x, i, msb + i, lsb + i);
  if (i < n) {  // the last n - i activations through one zero-padded vector
    float tail[4][kN] = {};
    const float* xt[4] = {tail[0], tail[1], tail[2], tail[3]};
    for (int c = 0; c < 4; ++c) std::memcpy(tail[c], x[c] + i, size_t(n - i) * sizeof(float));
    int32_t hb[kN], lb[kN];
    words(xt, 0, hb, lb);
    std::memcpy(msb + i, hb, size_t(n - i) * sizeof(int32_t));
    std::memcpy(lsb + i, lb, size_t(n - i) * sizeof(int32_t));
  }
}

void deal_words(const int32_t* src, int64_t src_ld, int64_t rows, int64_t n, int64_t step,
                int32_t* dst, int64_t dst_ld) {
  for (int64_t r = 0; r < rows; ++r, src += src_ld, dst += dst_ld) {
    int64_t i = 0;
#if defined(__AVX512F__)
    if (step == 2) {  // 16 words from 31: the even lanes of a and b (b's last lane never read)
      const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
      for (; i < n; i += 16) {
        const int64_t left = std::min<int64_t>(n - i, 16), need = 2 * left - 1;  // words read
        const __mmask16 ma = __mmask16((1u << std::min<int64_t>(need, 16)) - 1u);
        const __mmask16 mb = __mmask16((1u << std::max<int64_t>(need - 16, 0)) - 1u);
        const __m512i a = _mm512_maskz_loadu_epi32(ma, src + 2 * i);
        const __m512i b = _mm512_maskz_loadu_epi32(mb, src + 2 * i + 16);
        _mm512_mask_storeu_epi32(dst + i, __mmask16((1u << left) - 1u),
                                 _mm512_permutex2var_epi32(a, even, b));
      }
    }
    if (step == 1)  // a copy, 16 words at a time
      for (; i < n; i += 16) {
        const __mmask16 m = __mmask16((1u << std::min<int64_t>(n - i, 16)) - 1u);
        _mm512_mask_storeu_epi32(dst + i, m, _mm512_maskz_loadu_epi32(m, src + i));
      }
#endif
    if (step == 1) {
      if (i < n) std::memcpy(dst + i, src + i, size_t(n - i) * sizeof(int32_t));
      continue;
    }
    for (; i < n; ++i) dst[i] = src[i * step];
  }
}

namespace {
#if defined(__AVX512F__)
// A vector's two 256-bit halves added: the first step of the transposing sums below.
inline __m256 AddHalves(vf v) {
  const __m512 z = __m512(v);
  return _mm256_add_ps(_mm512_castps512_ps256(z),
                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(z), 1)));
}
#endif

// Four horizontal sums: out[p] = sum of the lanes of s[p]. AVX-512 halves each vector first,
// then both tiers share the transposing hadd reduction (per 128-bit lane, hadd(a, b) = [a0+a1,
// a2+a3, b0+b1, b2+b3]; two rounds leave one partial sum of each vector per 128-bit lane).
inline void hsum4(const vf s[4], float* out) {
#if defined(__AVX2__) || defined(__AVX512F__)
#if defined(__AVX512F__)
  const __m256 h0 = AddHalves(s[0]), h1 = AddHalves(s[1]), h2 = AddHalves(s[2]), h3 = AddHalves(s[3]);
#else
  const __m256 h0 = __m256(s[0]), h1 = __m256(s[1]), h2 = __m256(s[2]), h3 = __m256(s[3]);
#endif
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(h0, h1), _mm256_hadd_ps(h2, h3));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
#else
  for (int p = 0; p < 4; ++p) out[p] = hsum(s[p]);
#endif
}

#if defined(__AVX512F__)
// Eight horizontal sums at once: out[p] = sum of the lanes of s[p], as hsum4 for two sets of
// four, the final halves combined across the sets: ~20 instructions for the eight, where
// eight _mm512_reduce_add_ps take ~50 (perf, sparse_dots on a 16-channel CG layer: the
// reductions were a sixth of the function).
inline void hsum8(const vf s[8], float* out) {
  __m256 h[8];
  for (int p = 0; p < 8; ++p) h[p] = AddHalves(s[p]);
  const __m256 q0 = _mm256_hadd_ps(_mm256_hadd_ps(h[0], h[1]), _mm256_hadd_ps(h[2], h[3]));
  const __m256 q1 = _mm256_hadd_ps(_mm256_hadd_ps(h[4], h[5]), _mm256_hadd_ps(h[6], h[7]));
  _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20),
                                      _mm256_permute2f128_ps(q0, q1, 0x31)));
}
#endif

// NP pixels (channel-last bases pix[0..NP-1]) of sparse_dots: 8 FMA chains for NP = 8 and 4
// (one and two per pixel), at least 4 for the tails. The pixels' base pointers are computed
// once, not per tap (with them per tap, the address arithmetic was as many instructions as a
// 16-channel tap's FMAs).
// NV > 0: len is NV vectors, known at compile time (sparse_dots' common run lengths): the loads
// then address xb[p] + tap offset + a constant. With a run-time count the compiler kept a
// pointer per pixel stepping through the vectors, rebuilt from spilled registers at every tap
// (~45 instructions around a 16-channel tap's 8 FMAs). Same operations in the same order
// either way (bit for bit). Measured on AMD EPYC Zen 4, 1 thread, a row of a 3x3 layer's
// gated-on pixels at 20% on: 16 / 32 / 64 channels 6.93 -> 6.25, 12.9 -> 11.2, 23.3 -> 22.9 ns
// per dot product; ResNet-20's CG layers 1.02-1.05x (tools/bench_network_layers.py).
template <int NP, int NV = 0>
inline void sparse_dots_group(const float* w, int64_t ld, int64_t len, int ntaps,
                              const int64_t* toff, const float* x, const int32_t* pix,
                              float* out) {
  constexpr int CH = NP >= 8 ? 1 : NP == 4 ? 2 : 4 / NP;
  const float* xb[NP];
  for (int p = 0; p < NP; ++p) xb[p] = x + int64_t(pix[p]) * ld;
  vf acc[NP][CH];
#pragma GCC unroll 8
  for (int p = 0; p < NP; ++p)
#pragma GCC unroll 4
    for (int c = 0; c < CH; ++c) acc[p][c] = vf{};
  const int64_t nv = NV > 0 ? NV : len / kVW;
#pragma GCC unroll 1
  for (int t = 0; t < ntaps; ++t) {
    const float* wt = w + t * len;
    const int64_t to = toff[t] * ld;
    int64_t v = 0;
    for (; v + CH <= nv; v += CH)
#pragma GCC unroll 4
      for (int c = 0; c < CH; ++c) {
        const vf wv = load(wt + (v + c) * kVW);
        for (int p = 0; p < NP; ++p) acc[p][c] += wv * load(xb[p] + to + (v + c) * kVW);
      }
    for (; v < nv; ++v) {
      const vf wv = load(wt + v * kVW);
      for (int p = 0; p < NP; ++p) acc[p][0] += wv * load(xb[p] + to + v * kVW);
    }
  }
  vf sum[NP];
#pragma GCC unroll 8
  for (int p = 0; p < NP; ++p) {
    sum[p] = acc[p][0];
#pragma GCC unroll 4
    for (int c = 1; c < CH; ++c) sum[p] += acc[p][c];
  }
#if defined(__AVX512F__)
  if constexpr (NP == 8) {
    hsum8(sum, out);
    return;
  }
#endif
  if constexpr (NP % 4 == 0) {
    for (int p = 0; p < NP; p += 4) hsum4(sum + p, out + p);
  } else {
    for (int p = 0; p < NP; ++p) out[p] = hsum(sum[p]);
  }
}

template <int NV>
void sparse_dots_n(const float* w, int64_t ld, int64_t len, int ntaps, const int64_t* toff,
                   const float* x, const int32_t* pix, int n, float* out) {
  // Eight pixels per weight load where the row has them (measured 5% faster than four: 9
  // loads per 8 FMAs instead of 10), then four, two, one.
  int i = 0;
  for (; i + 8 <= n; i += 8) sparse_dots_group<8, NV>(w, ld, len, ntaps, toff, x, pix + i, out + i);
  for (; i + 4 <= n; i += 4)
    sparse_dots_group<4, NV>(w, ld, len, ntaps, toff, x, pix + i, out + i);
  if (i + 2 <= n) {
    sparse_dots_group<2, NV>(w, ld, len, ntaps, toff, x, pix + i, out + i);
    i += 2;
  }
  if (i < n) sparse_dots_group<1, NV>(w, ld, len, ntaps, toff, x, pix + i, out + i);
}
}  // namespace

void sparse_dots(const float* w, int64_t ld, int64_t len, int ntaps, const int64_t* toff,
                 const float* x, const int32_t* pix, int n, float* out) {
  // A run is a tap row (kw pixels) of the channel-last copy: 3 x 16, 32 or 64 channels are 3,
  // 6, 12 vectors (AVX-512; AVX2: 6, 12), a 1x1 conv's 16-64 channels 1, 2, 4; the second
  // stage of a p = 4 CG layer of 64, 128, 256, 512 channels (3 x 48 ... 3 x 384) 9, 18, 36, 72
  // (AVX2: 18, 36, 72). Measured (Intel Xeon with AMX, 1 thread, 128 ch 28x28 at 20% on, the
  // sparse stage's G2D_STAGE_TIMES, one-off): 18 vectors as a constant 426 -> 409 us per call
  // (the run-time count keeps a pointer per pixel, 9 increments per 8 FMAs).
  switch (len / kVW) {
    case 1: return sparse_dots_n<1>(w, ld, len, ntaps, toff, x, pix, n, out);
    case 2: return sparse_dots_n<2>(w, ld, len, ntaps, toff, x, pix, n, out);
    case 3: return sparse_dots_n<3>(w, ld, len, ntaps, toff, x, pix, n, out);
    case 4: return sparse_dots_n<4>(w, ld, len, ntaps, toff, x, pix, n, out);
    case 6: return sparse_dots_n<6>(w, ld, len, ntaps, toff, x, pix, n, out);
    case 12: return sparse_dots_n<12>(w, ld, len, ntaps, toff, x, pix, n, out);
    case 9: return sparse_dots_n<9>(w, ld, len, ntaps, toff, x, pix, n, out);
    case 18: return sparse_dots_n<18>(w, ld, len, ntaps, toff, x, pix, n, out);
    case 36: return sparse_dots_n<36>(w, ld, len, ntaps, toff, x, pix, n, out);
    case 72: return sparse_dots_n<72>(w, ld, len, ntaps, toff, x, pix, n, out);
    default: return sparse_dots_n<0>(w, ld, len, ntaps, toff, x, pix, n, out);
  }
}

void gated_columns(const uint8_t* gate, int64_t ld, int64_t M, int64_t n, int32_t* cols,
                   int32_t* start) {
  int32_t pos = 0;
#if defined(__AVX512F__)
  // 16 gates to a mask (vptestmb), the columns compressed by it (vpcompressd into a register,
  // then a whole-vector store: the memory form is microcoded, and slow, on AMD Zen 4). The
  // only dependency from one step to the next is pos's add.
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m128i ones = _mm_set1_epi8(1);
  for (int64_t m = 0; m < M; ++m) {
    start[m] = pos;
    const uint8_t* gm = gate + m * ld;
    for (int64_t t0 = 0; t0 < n; t0 += 16) {
      const __mmask16 valid = n - t0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - t0)) - 1);
      const __mmask16 on = _mm_test_epi8_mask(_mm_maskz_loadu_epi8(valid, gm + t0), ones);
      const __m512i t = _mm512_add_epi32(iota, _mm512_set1_epi32(int32_t(t0)));
      _mm512_storeu_si512(cols + pos, _mm512_maskz_compress_epi32(on, t));
      pos += __builtin_popcount(unsigned(on));
    }
  }
#else
  // 16 gates to a bit mask (SSE2), each byte of it appending its set columns with two 16-byte
  // stores from the table of positions (a loop over the set bits mispredicted its exit once per
  // 16 columns, and a loop over every column cost 15% of the sparse product itself).
  for (int64_t m = 0; m < M; ++m) {
    start[m] = pos;
    const uint8_t* gm = gate + m * ld;
    int64_t t0 = 0;
    for (; t0 + 16 <= n; t0 += 16) {
      const __m128i g16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(gm + t0));
      const uint32_t bits = uint32_t(_mm_movemask_epi8(_mm_slli_epi16(g16, 7)));
      for (int half = 0; half < 2; ++half) {
        const uint32_t byte = (bits >> (8 * half)) & 0xffu;
        const __m128i at = _mm_set1_epi32(int32_t(t0 + 8 * half));
        const __m128i* entry = reinterpret_cast<const __m128i*>(kSetBitPositions.at[byte]);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(cols + pos), _mm_add_epi32(entry[0], at));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(cols + pos + 4), _mm_add_epi32(entry[1], at));
        pos += kSetBitPositions.count[byte];
      }
    }
    for (int64_t t = t0; t < n; ++t) {
      cols[pos] = int32_t(t);
      pos += gm[t];
    }
  }
#endif
  start[M] = pos;
}

void pad_rows(const float* x, int64_t H, int64_t W, float* dst, int64_t Wp, int64_t gap,
              int64_t last_gap) {
  for (int64_t r = 0; r < H; ++r) {
    const float* in = x + r * W;
    float* out = dst + r * Wp;
    const int64_t zeros = r + 1 < H ? gap : last_gap;
    int64_t j = 0;
#if defined(__AVX512F__)
    for (; j + 16 <= W; j += 16) _mm512_storeu_ps(out + j, _mm512_loadu_ps(in + j));
    if (j < W) {
      const __mmask16 tail = __mmask16((1u << (W - j)) - 1);
      _mm512_mask_storeu_ps(out + j, tail, _mm512_maskz_loadu_ps(tail, in + j));
    }
    for (int64_t z = 0; z < zeros; z += 16) {
      const __mmask16 n = __mmask16((1u << std::min<int64_t>(16, zeros - z)) - 1);
      _mm512_mask_storeu_ps(out + W + z, n, _mm512_setzero_ps());
    }
#else
    for (; j + kVW <= W; j += kVW) store(out + j, load(in + j));
    for (; j < W; ++j) out[j] = in[j];
    for (int64_t z = 0; z < zeros; ++z) out[W + z] = 0.f;
#endif
  }
}

void split_pairs(const float* x, int64_t n, float* even, float* odd, int64_t at_even,
                 int64_t at_odd, int64_t Wp) {
#if defined(__AVX512F__)
  for (int64_t j = 0; j < Wp; j += 16) {  // the rows zeroed, then the values stored over them
    const __mmask16 m = __mmask16(Wp - j >= 16 ? 0xFFFFu : (1u << (Wp - j)) - 1);
    _mm512_mask_storeu_ps(even + j, m, _mm512_setzero_ps());
    _mm512_mask_storeu_ps(odd + j, m, _mm512_setzero_ps());
  }
  even += at_even;
  odd += at_odd;
  const __m512i take_even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i take_odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  int64_t k = 0;  // values of each phase done
  for (; 2 * k + 32 <= n; k += 16) {
    const __m512 lo = _mm512_loadu_ps(x + 2 * k), hi = _mm512_loadu_ps(x + 2 * k + 16);
    _mm512_storeu_ps(even + k, _mm512_permutex2var_ps(lo, take_even, hi));
    _mm512_storeu_ps(odd + k, _mm512_permutex2var_ps(lo, take_odd, hi));
  }
  const int64_t rest = n - 2 * k;  // 0 .. 31 floats: masked loads and stores
  if (rest > 0) {
    const __mmask16 lo_mask = __mmask16(rest >= 16 ? 0xFFFFu : (1u << rest) - 1);
    const __mmask16 hi_mask = __mmask16(rest > 16 ? (1u << (rest - 16)) - 1 : 0u);
    const __m512 lo = _mm512_maskz_loadu_ps(lo_mask, x + 2 * k);
    const __m512 hi = _mm512_maskz_loadu_ps(hi_mask, x + 2 * k + 16);
    const unsigned n_even = unsigned(rest + 1) / 2, n_odd = unsigned(rest) / 2;  // <= 16, <= 15
    _mm512_mask_storeu_ps(even + k, __mmask16((1u << n_even) - 1), _mm512_permutex2var_ps(lo, take_even, hi));
    _mm512_mask_storeu_ps(odd + k, __mmask16((1u << n_odd) - 1), _mm512_permutex2var_ps(lo, take_odd, hi));
  }
#else
  const int64_t n_even = (n + 1) / 2, n_odd = n / 2;
  for (int64_t j = 0; j < at_even; ++j) even[j] = 0.f;
  for (int64_t j = at_even + n_even; j < Wp; ++j) even[j] = 0.f;
  for (int64_t j = 0; j < at_odd; ++j) odd[j] = 0.f;
  for (int64_t j = at_odd + n_odd; j < Wp; ++j) odd[j] = 0.f;
  even += at_even;
  odd += at_odd;
  int64_t k = 0;
  // SSE2 (every x86-64 CPU): the even and odd pixels of eight floats from one pair of loads.
  for (; 2 * k + 8 <= n; k += 4) {
    const __m128 lo = _mm_loadu_ps(x + 2 * k), hi = _mm_loadu_ps(x + 2 * k + 4);
    _mm_storeu_ps(even + k, _mm_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm_storeu_ps(odd + k, _mm_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  for (; 2 * k < n; ++k) {
    even[k] = x[2 * k];
    if (2 * k + 1 < n) odd[k] = x[2 * k + 1];
  }
#endif
}

// ---------------------------------------------------------------- ONNX Runtime's NCHWc layout
// A block of channels as MLAS's NCHWc kernels store it: pixel p, lane l at p * B + l.

namespace {
constexpr int kMaxBlock = 64;

// One pass over a block's n pixels: which lanes hold a non-zero value (`any`), a non-finite
// one (`bad`), and the pool: pool_channel's order for each lane's channel, i.e. 16 float
// partials by pixel index mod 16 over the whole 16-pixel steps, the tail summed in double
// first, then the partials in order (SumChannel; max: pool_channel's running maxima), so a
// saliency is the same bit for bit whichever layout a layer reads.
// One pixel's B lanes into the per-lane flags: any non-zero value (-0.0 counts as zero, NaN
// as non-zero, as has_nonzero), any non-finite one.
inline void ScanLanes(const float* v, int B, uint32_t* any, uint32_t* bad) {
  for (int l = 0; l < B; ++l) {
    uint32_t bits;
    std::memcpy(&bits, v + l, 4);
    any[l] |= bits & 0x7fffffffu;
    bad[l] |= uint32_t((bits & 0x7f800000u) == 0x7f800000u);
  }
}

template <int kKind>
void BlockPass(const float* x, int64_t n, int B, int valid, uint32_t* any, uint32_t* bad,
               double* pooled) {
  auto term = PoolTerm<kKind>;
  constexpr int kLanes = 16;
  float part[kLanes][kMaxBlock];
  for (int m = 0; m < kLanes; ++m)
    for (int l = 0; l < B; ++l) part[m][l] = kKind == kPoolMax ? x[l] : 0.f;
  const int64_t n16 = n / kLanes * kLanes;
  auto scan = [&](const float* v) { ScanLanes(v, B, any, bad); };
  for (int64_t i = 0; i < n16; i += kLanes)
    for (int m = 0; m < kLanes; ++m) {
      const float* v = x + (i + m) * B;
      scan(v);
      if constexpr (kKind == kPoolMax)
        for (int l = 0; l < B; ++l) part[m][l] = part[m][l] < v[l] ? v[l] : part[m][l];
      else
        for (int l = 0; l < B; ++l) part[m][l] += term(v[l]);
    }
  for (int64_t i = n16; i < n; ++i) scan(x + i * B);
  for (int l = 0; l < valid; ++l) {
    if constexpr (kKind == kPoolMax) {
      float mx = x[l];
      for (int64_t i = n16; i < n; ++i) mx = std::max(mx, x[i * B + l]);
      for (int m = 0; m < kLanes; ++m) mx = std::max(mx, part[m][l]);
      pooled[l] = mx;
    } else {
      double sum = 0.0;
      for (int64_t i = n16; i < n; ++i) sum += term(x[i * B + l]);
      for (int m = 0; m < kLanes; ++m) sum += part[m][l];
      pooled[l] = sum;
    }
  }
}
}  // namespace

void block_channel_stats(const float* x, int64_t n, int B, int valid, int kind, uint8_t* live,
                         double* pooled, uint8_t* finite) {
  uint32_t any[kMaxBlock] = {}, bad[kMaxBlock] = {};
  if (pooled && n > 0) {
    if (kind == kPoolAbsSum) BlockPass<kPoolAbsSum>(x, n, B, valid, any, bad, pooled);
    else if (kind == kPoolSquareSum) BlockPass<kPoolSquareSum>(x, n, B, valid, any, bad, pooled);
    else if (kind == kPoolMax) BlockPass<kPoolMax>(x, n, B, valid, any, bad, pooled);
    else BlockPass<kPoolSum>(x, n, B, valid, any, bad, pooled);
  } else {
    // Liveness (and finiteness) alone: without finiteness, stop once every channel has shown
    // a non-zero value, checked every 64 pixels (has_nonzero stops likewise per channel).
    for (int64_t i0 = 0; i0 < n; i0 += 64) {
      const int64_t i1 = std::min(n, i0 + 64);
      for (int64_t i = i0; i < i1; ++i) ScanLanes(x + i * B, B, any, bad);
      if (!finite) {
        bool all = true;
        for (int l = 0; l < valid; ++l) all = all && any[l] != 0;
        if (all) break;
      }
    }
  }
  for (int l = 0; l < valid; ++l) {
    live[l] = any[l] != 0;
    if (finite) finite[l] = bad[l] == 0;
  }
}

void epilogue_block(float* v, int64_t n, int B, int valid, const float* g, const float* s,
                    const float* sh, const float* b, const float* r, bool relu) {
  // epilogue_row's operations lane by lane (the same expression: the same rounding and
  // contraction), the padding lanes set to exact zeros.
  float gl[kMaxBlock] = {}, sl[kMaxBlock] = {}, shl[kMaxBlock] = {}, bl[kMaxBlock] = {};
  for (int l = 0; l < valid; ++l) gl[l] = g[l], sl[l] = s[l], shl[l] = sh[l], bl[l] = b[l];
  for (int64_t i = 0; i < n; ++i) {
    float* vp = v + i * B;
    const float* rp = r ? r + i * B : nullptr;
    if (rp && relu)
      for (int l = 0; l < B; ++l) vp[l] = std::max(gl[l] * (sl[l] * vp[l] + shl[l]) + bl[l] + rp[l], 0.f);
    else if (rp)
      for (int l = 0; l < B; ++l) vp[l] = gl[l] * (sl[l] * vp[l] + shl[l]) + bl[l] + rp[l];
    else if (relu)
      for (int l = 0; l < B; ++l) vp[l] = std::max(gl[l] * (sl[l] * vp[l] + shl[l]) + bl[l], 0.f);
    else
      for (int l = 0; l < B; ++l) vp[l] = gl[l] * (sl[l] * vp[l] + shl[l]) + bl[l];
    for (int l = valid; l < B; ++l) vp[l] = 0.f;
  }
}

void permute_lanes(const float* const* src, int nsrc, const int32_t* idx, int64_t n, int B,
                   float* dst) {
#if defined(__AVX512F__)
  if (B == 16) {
    __m512i iv[64];
    __mmask16 mk[64];
    for (int s = 0; s < nsrc; ++s) {
      alignas(64) int32_t lanes[16];
      uint32_t m = 0;
      for (int l = 0; l < 16; ++l) {
        lanes[l] = idx[s * 16 + l] < 0 ? 0 : idx[s * 16 + l];
        if (idx[s * 16 + l] >= 0) m |= 1u << l;
      }
      iv[s] = _mm512_load_si512(lanes);
      mk[s] = __mmask16(m);
    }
    for (int64_t i = 0; i < n; ++i) {
      __m512 acc = _mm512_setzero_ps();
      for (int s = 0; s < nsrc; ++s)
        acc = _mm512_mask_permutexvar_ps(acc, mk[s], iv[s], _mm512_loadu_ps(src[s] + i * 16));
      _mm512_storeu_ps(dst + i * 16, acc);
    }
    return;
  }
#elif defined(__AVX2__)
  if (B == 8) {
    __m256i iv[64], mk[64];
    for (int s = 0; s < nsrc; ++s) {
      alignas(32) int32_t lanes[8], mask[8];
      for (int l = 0; l < 8; ++l) {
        lanes[l] = idx[s * 8 + l] < 0 ? 0 : idx[s * 8 + l];
        mask[l] = idx[s * 8 + l] >= 0 ? -1 : 0;
      }
      iv[s] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lanes));
      mk[s] = _mm256_load_si256(reinterpret_cast<const __m256i*>(mask));
    }
    for (int64_t i = 0; i < n; ++i) {
      __m256 acc = _mm256_setzero_ps();
      for (int s = 0; s < nsrc; ++s)
        acc = _mm256_blendv_ps(acc, _mm256_permutevar8x32_ps(_mm256_loadu_ps(src[s] + i * 8), iv[s]),
                               _mm256_castsi256_ps(mk[s]));
      _mm256_storeu_ps(dst + i * 8, acc);
    }
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    float v[64];  // the pixel's lanes read before any is written: dst may be a source
    for (int l = 0; l < B; ++l) {
      v[l] = 0.f;
      for (int s = 0; s < nsrc; ++s)
        if (idx[s * B + l] >= 0) v[l] = src[s][i * B + idx[s * B + l]];
    }
    for (int l = 0; l < B; ++l) dst[i * B + l] = v[l];
  }
}

// QuantLevels' table in vectors, loaded once per call.
struct LevelVectors {
  vf inv, top, lo, hi, value;
  explicit LevelVectors(const QuantLevels& q)
      : inv(vf{} + q.inv), top(vf{} + float(q.R)), lo(load(q.lo)), hi(load(q.hi)),
        value(load(q.value)) {}
};

// The level of a >= 0 (or NaN: 0) by the table: r0 = round(min(a * inv, R)), within one level
// of r (QuantLevels), corrected by the thresholds t_r0 and t_(r0 + 1) (hi NaN: never above R).
inline vi32 level_by_table(vf a, const LevelVectors& t) {
  const vf magic = vf{} + 8388608.0f;
  vf f = a * t.inv;
  f = t.top < f ? t.top : f;  // inf -> R
  f = f == f ? f : vf{};      // NaN -> 0
  const vi32 r0 = __builtin_convertvector((f + magic) - magic, vi32);
  const vi32 above = a >= __builtin_shuffle(t.hi, r0);  // all ones where a reaches t_(r0 + 1)
  const vi32 below = a < __builtin_shuffle(t.lo, r0);   // all ones where a is under t_r0
  return r0 - above + below;
}

void quantize_sign_magnitude(const float* x, int64_t n, const QuantLevels& q, float* y) {
  int64_t i = 0;
  if (q.R >= 0) {  // the levels by the table, their magnitudes (j / levels) * s by lookup
    const LevelVectors t(q);
    const vf zero = vf{}, one = vf{} + 1.f;
    for (; i + kVW <= n; i += kVW) {
      const vf v = load(x + i);
      const vf magnitude = __builtin_shuffle(t.value, level_by_table(vf(vi32(v) & 0x7fffffff), t));
      const vf sign = v > zero ? one : v < zero ? -one : v == zero ? zero : v;  // NaN stays NaN
      store(y + i, magnitude * sign);
    }
  }
  // Plain C++ the compiler vectorizes (vroundps / vrndscaleps for nearbyint, which rounds half
  // to even in the default rounding mode, as ONNX Round); no add follows a product, so FMA
  // contraction cannot change a result.
  const float s = q.s, levels = q.levels;
  for (; i < n; ++i) {
    const float v = x[i];
    const float sign = v > 0.f ? 1.f : v < 0.f ? -1.f : v == 0.f ? 0.f : v;  // NaN stays NaN
    float c = std::fabs(v) / s;
    c = c < 0.f ? 0.f : c;  // Clip(d, 0, 1) as ONNX Runtime's min(max(d, 0), 1): NaN passes
    c = 1.f < c ? 1.f : c;
    y[i] = ((std::nearbyint(c * levels) / levels) * s) * sign;
  }
}

void clip_max_row(float* v, int64_t n, float c) {
  // c < v ? c : v: v where v is NaN (the comparison is false), as x86's minps(c, v). Vector
  // extensions: GCC does not vectorize the scalar form (the comparison may trap).
  const vf vc = vf{} + c;
  int64_t i = 0;
  for (; i + kVW <= n; i += kVW) {
    const vf x = load(v + i);
    store(v + i, vc < x ? vc : x);
  }
  for (; i < n; ++i) v[i] = c < v[i] ? c : v[i];
}

// acc + w * x, fused where the tier has FMA (the build's -std=c++17 turns contraction off).
inline vf multiply_add(vf w, float x, vf acc) {
#if defined(__AVX512F__)
  return _mm512_fmadd_ps(w, _mm512_set1_ps(x), acc);
#elif defined(__FMA__)
  return _mm256_fmadd_ps(w, _mm256_set1_ps(x), acc);
#else
  return acc + w * x;
#endif
}

#if defined(__AVX512F__)
constexpr int kStreamPixels = 16;  // 16 accumulators + a weight vector of 32 registers
#else
constexpr int kStreamPixels = 8;   // of 16
#endif

// Weights are prefetched 4 KiB ahead: the hardware prefetchers stop at every 4 KiB page
// boundary of the stream. Measured (tools/bench_stream_conv.py's chain, Intel Xeon, 2
// threads): the kernel without it 0.87x ONNX Runtime's conv, with it 1.11x; 2 or 8 KiB ahead
// within 3% of 4. Into L2 (prefetcht1) rather than L1: where the weights come from DRAM it
// did a little better (the fused sensAI VGG at batch 1, whose late layers stream ~210 MB:
// 1.02-1.06x in three of four in-process A/Bs of the two builds, 0.98x in the fourth; its 4x4
// layers read 18-20 GB/s with prefetcht0 and 22-25 with prefetcht1 in one per-node profile),
// where they stay in the last-level cache a little worse (VGG-19 at half width, 20 MB: 0.95-
// 0.99x); StreamConv is for the former (2026-12-07, thirtieth session; docs/performance.md).
constexpr int64_t kStreamAhead = 4096 / (kVW * 4);

template <int NP>
void stream_block_n(int64_t K, const float* w, const float* cols, float* out) {
  vf acc[NP];
  for (int p = 0; p < NP; ++p) acc[p] = vf{};
  for (int64_t k = 0; k < K; ++k) {
    __builtin_prefetch(w + (k + kStreamAhead) * kVW, 0, 2);
    const vf wk = load(w + k * kVW);
    const float* ck = cols + k * NP;
#pragma GCC unroll 16
    for (int p = 0; p < NP; ++p) acc[p] = multiply_add(wk, ck[p], acc[p]);
  }
  for (int p = 0; p < NP; ++p) store(out + p * kVW, acc[p]);
}

void stream_block(int64_t K, const float* w, const float* cols, int np, float* out) {
  switch (np) {
    case 16: if constexpr (kStreamPixels >= 16) { stream_block_n<16>(K, w, cols, out); return; } break;
    case 8: stream_block_n<8>(K, w, cols, out); return;
    case 4: stream_block_n<4>(K, w, cols, out); return;
    case 2: stream_block_n<2>(K, w, cols, out); return;
    case 1: stream_block_n<1>(K, w, cols, out); return;
    default: break;
  }
  // stream_conv.cc passes a power of two <= kStreamPixels; any other count, pixel by pixel
  for (int p = 0; p < np; ++p) {
    vf acc = vf{};
    for (int64_t k = 0; k < K; ++k) acc = multiply_add(load(w + k * kVW), cols[k * np + p], acc);
    store(out + p * kVW, acc);
  }
}

// A band of R rows x BW columns of a 3x3, stride-1, pad-1 conv on a map MW wide, in each of
// M samples (sample m's band at x + m * stride; channel c at + c * plane), the register tile
// R * BW * M (isa_kernels.h: stream_block_3x3 and stream_block_rows). Every (pixel, tap) pair
// whose input lies inside the map, unrolled at compile time, so the accumulators stay in
// registers and no product of the padding is computed (TOP: the band holds the map's first
// row, so the row above is padding; BOTTOM: its last; LEFT / RIGHT: its first / last column;
// the rows and columns around the band are read where they exist). Each weight vector serves
// all M samples (a 2x2 map alone gives it 4 products).
template <int MW, int BW, int R, int M, bool TOP, bool BOTTOM, bool LEFT, bool RIGHT>
void stream_block_band(int64_t C, const float* w, const float* x, int64_t plane, int64_t stride, float* out) {
  constexpr int P = R * BW;
  vf acc[M * P];
  for (int i = 0; i < M * P; ++i) acc[i] = vf{};
  for (int64_t c = 0; c < C; ++c) {
    const float* wc = w + c * 9 * kVW;
#pragma GCC unroll 9
    for (int t = 0; t < 9; ++t) {
      __builtin_prefetch(wc + (t + kStreamAhead) * kVW, 0, 2);
      const vf wt = load(wc + t * kVW);
      const int kh = t / 3, kw = t % 3;
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) {
        const float* xc = x + m * stride + c * plane;
#pragma GCC unroll 16
        for (int p = 0; p < P; ++p) {
          const int r = p / BW + kh - 1, col = p % BW + kw - 1;  // from the band's first pixel
          if ((!TOP || r >= 0) && (!BOTTOM || r < R) && (!LEFT || col >= 0) && (!RIGHT || col < BW))
            acc[m * P + p] = multiply_add(wt, xc[r * MW + col], acc[m * P + p]);
        }
      }
    }
  }
  for (int i = 0; i < M * P; ++i) store(out + i * kVW, acc[i]);
}

// M samples' whole side x side maps.
template <int S, int M>
void stream_block_3x3_n(int64_t C, const float* w, const float* x, int64_t stride, float* out) {
  stream_block_band<S, S, S, M, true, true, true, true>(C, w, x, S * S, stride, out);
}

template <int MW, int BW, int R, bool LEFT, bool RIGHT>
void stream_block_rows_at(int64_t C, const float* w, const float* x, int64_t plane, bool top, bool bottom,
                          float* out) {
  if (top && bottom) return stream_block_band<MW, BW, R, 1, true, true, LEFT, RIGHT>(C, w, x, plane, 0, out);
  if (top) return stream_block_band<MW, BW, R, 1, true, false, LEFT, RIGHT>(C, w, x, plane, 0, out);
  if (bottom) return stream_block_band<MW, BW, R, 1, false, true, LEFT, RIGHT>(C, w, x, plane, 0, out);
  stream_block_band<MW, BW, R, 1, false, false, LEFT, RIGHT>(C, w, x, plane, 0, out);
}

// The map MW wide in bands of the register tile: whole rows (R of them) where a row fits,
// else one row's first, inner and last BW columns.
template <int MW>
void stream_block_rows_of(int64_t C, const float* w, const float* x, int64_t plane, int edges, float* out) {
  constexpr int BW = MW < kStreamPixels ? MW : kStreamPixels, R = kStreamPixels / BW;
  const bool top = edges & kBandTop, bottom = edges & kBandBottom;
  if constexpr (BW == MW) {
    stream_block_rows_at<MW, BW, R, true, true>(C, w, x, plane, top, bottom, out);
  } else if (edges & kBandLeft) {
    stream_block_rows_at<MW, BW, R, true, false>(C, w, x, plane, top, bottom, out);
  } else if (edges & kBandRight) {
    stream_block_rows_at<MW, BW, R, false, true>(C, w, x, plane, top, bottom, out);
  } else {
    stream_block_rows_at<MW, BW, R, false, false>(C, w, x, plane, top, bottom, out);
  }
}

// stream_block_band with its shape and edges at run time, pixel by pixel: the two kernels'
// answer for shapes stream_conv.cc does not pass (never more than the band's pixels, all four
// edges honoured).
void stream_band_by_pixels(int64_t C, const float* w, const float* x, int64_t plane, int map_width, int rows,
                           int bw, int edges, float* out) {
  for (int p = 0; p < rows * bw; ++p) {
    vf acc = vf{};
    for (int64_t c = 0; c < C; ++c)
      for (int t = 0; t < 9; ++t) {
        const int r = p / bw + t / 3 - 1, col = p % bw + t % 3 - 1;
        if ((!(edges & kBandTop) || r >= 0) && (!(edges & kBandBottom) || r < rows) &&
            (!(edges & kBandLeft) || col >= 0) && (!(edges & kBandRight) || col < bw))
          acc = multiply_add(load(w + (c * 9 + t) * kVW), x[c * plane + r * map_width + col], acc);
      }
    store(out + p * kVW, acc);
  }
}

void stream_block_rows(int64_t C, const float* w, const float* x, int64_t plane, int width, int edges,
                       float* out) {
  if (width == 8) return stream_block_rows_of<8>(C, w, x, plane, edges, out);
  if (width == 16) return stream_block_rows_of<16>(C, w, x, plane, edges, out);
  if (width == 32) return stream_block_rows_of<32>(C, w, x, plane, edges, out);
  const int bw = width < kStreamPixels ? width : kStreamPixels;  // other widths
  stream_band_by_pixels(C, w, x, plane, width, kStreamPixels / bw, bw, edges, out);
}

void stream_block_3x3(int64_t C, const float* w, const float* x, int64_t stride, int side, int samples,
                      float* out) {
  if (side == 2 && samples == 1) return stream_block_3x3_n<2, 1>(C, w, x, stride, out);
  if (side == 2 && samples == 2) return stream_block_3x3_n<2, 2>(C, w, x, stride, out);
  if constexpr (kStreamPixels >= 16) {
    if (side == 2 && samples == 4) return stream_block_3x3_n<2, 4>(C, w, x, stride, out);
    if (side == 4 && samples == 1) return stream_block_3x3_n<4, 1>(C, w, x, stride, out);
  }
  for (int m = 0; m < samples; ++m)  // other shapes: each sample's map a band of all four edges
    stream_band_by_pixels(C, w, x + m * stride, side * side, side, side, side,
                          kBandTop | kBandBottom | kBandLeft | kBandRight, out + m * side * side * kVW);
}

extern const IsaKernels kKernels = {kName,         kMR,         kNR,
                                    kIMR,          kINR,        kVW,
                                    kSddmmMaxVecs, sgemm_micro, sgemm_indirect_micro,
                                    igemm_micro,   gather_fields, gate_panel,    select_add,
                                    sddmm_chunk,   idot_rows,   scatter_lanes,
                                    pack_filter_tile, epilogue_row, has_nonzero, pool_channel,
                                    pg_split,      pg_split_words, deal_words, sparse_dots, gated_columns, pad_rows, split_pairs,
                                    store_runs,    abs_max, block_channel_stats,
                                    epilogue_block, permute_lanes, quantize_sign_magnitude,
                                    clip_max_row,  kStreamPixels, stream_block, stream_block_3x3,
                                    stream_block_rows};

}  // namespace G2D_ISA_NS
}  // namespace g2d
