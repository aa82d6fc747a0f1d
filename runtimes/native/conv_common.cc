// See conv_common.h.
#include "conv_common.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

namespace g2d {

const IsaKernels& BestKernels() {
  static const IsaKernels* chosen = [] {
    const char* forced = std::getenv("G2D_ISA");
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512vnni");
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (forced && std::strcmp(forced, "generic") == 0) return &isa_generic::kKernels;
    if (forced && std::strcmp(forced, "avx2") == 0 && avx2) return &isa_avx2::kKernels;
    if (avx512 && !(forced && std::strcmp(forced, "avx2") == 0)) return &isa_avx512::kKernels;
    if (avx2) return &isa_avx2::kKernels;
    return &isa_generic::kKernels;
  }();
  return *chosen;
}

// ---------------------------------------------------------------- attributes and geometry

namespace {
template <class R>
bool TryAttr(const OrtKernelInfo* info, const char* name, R* out) {
  size_t size = 0;
  // Probe first: a missing attribute is not an error (ONNX defaults apply).
  OrtStatus* st = nullptr;
  if constexpr (std::is_same<R, int64_t>::value) {
    st = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, out);
  } else if constexpr (std::is_same<R, float>::value) {
    st = Ort::GetApi().KernelInfoGetAttribute_float(info, name, out);
  } else {
    st = Ort::GetApi().KernelInfoGetAttribute_string(info, name, nullptr, &size);
    if (!st) {
      std::string s(size, '\0');
      st = Ort::GetApi().KernelInfoGetAttribute_string(info, name, s.data(), &size);
      if (!st) *out = s.c_str();
    }
  }
  if (st) {
    Ort::GetApi().ReleaseStatus(st);
    return false;
  }
  return true;
}

bool TryInts(const OrtKernelInfo* info, const char* name, std::vector<int64_t>* out) {
  size_t size = 0;
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttributeArray_int64(info, name, nullptr, &size);
  if (st) {
    Ort::GetApi().ReleaseStatus(st);
    return false;
  }
  out->assign(size, 0);
  st = Ort::GetApi().KernelInfoGetAttributeArray_int64(info, name, out->data(), &size);
  if (st) {
    Ort::GetApi().ReleaseStatus(st);
    return false;
  }
  return true;
}
}  // namespace

int64_t ReadIntAttr(const OrtKernelInfo* info, const char* name, int64_t dflt) {
  int64_t v = dflt;
  return TryAttr(info, name, &v) ? v : dflt;
}
float ReadFloatAttr(const OrtKernelInfo* info, const char* name, float dflt) {
  float v = dflt;
  return TryAttr(info, name, &v) ? v : dflt;
}
std::string ReadStringAttr(const OrtKernelInfo* info, const char* name, const std::string& dflt) {
  std::string v = dflt;
  return TryAttr(info, name, &v) ? v : dflt;
}

ConvAttrs ReadConvAttrs(const OrtKernelInfo* info, std::string* error) {
  ConvAttrs a;
  TryInts(info, "strides", &a.strides);
  TryInts(info, "pads", &a.pads);
  TryInts(info, "dilations", &a.dilations);
  a.group = ReadIntAttr(info, "group", 1);
  if (a.strides.size() != 2 || a.strides[0] < 1 || a.strides[1] < 1)
    *error = "attribute strides must be 2 positive ints";
  else if (a.dilations.size() != 2 || a.dilations[0] < 1 || a.dilations[1] < 1)
    *error = "attribute dilations must be 2 positive ints";
  else if (a.pads.size() != 4 || *std::min_element(a.pads.begin(), a.pads.end()) < 0)
    *error = "attribute pads must be 4 non-negative ints (top, left, bottom, right)";
  else if (a.group < 1)
    *error = "attribute group must be >= 1";
  return a;
}

static std::string ShapeStr(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

void ExpectShape(const char* op, const char* what, const std::vector<int64_t>& shape,
                 const std::vector<int64_t>& expected) {
  if (shape != expected)
    throw OpError(std::string(op) + ": " + what + " has shape " + ShapeStr(shape) +
                  ", expected " + ShapeStr(expected));
}

ConvGeom MakeGeom(const char* op, const std::vector<int64_t>& xs, const std::vector<int64_t>& ws,
                  const ConvAttrs& a) {
  const std::string o = op;
  if (xs.size() != 4) throw OpError(o + ": X must be 4-D NCHW, got shape " + ShapeStr(xs));
  if (ws.size() != 4) throw OpError(o + ": W must be 4-D [O, C/group, kh, kw], got " + ShapeStr(ws));
  for (int64_t d : xs)
    if (d < 0) throw OpError(o + ": X has a negative dimension");
  for (int64_t d : ws)
    if (d < 1) throw OpError(o + ": W dimensions must be positive, got " + ShapeStr(ws));
  ConvGeom g{};
  g.N = xs[0], g.C = xs[1], g.H = xs[2], g.W = xs[3];
  g.O = ws[0], g.Cw = ws[1], g.kh = ws[2], g.kw = ws[3];
  g.sh = a.strides[0], g.sw = a.strides[1];
  g.pt = a.pads[0], g.pl = a.pads[1], g.pb = a.pads[2], g.pr = a.pads[3];
  g.dh = a.dilations[0], g.dw = a.dilations[1], g.group = a.group;
  if (g.C != g.Cw * g.group)
    throw OpError(o + ": X has " + std::to_string(g.C) + " channels but W expects " +
                  std::to_string(g.Cw) + " x group " + std::to_string(g.group));
  if (g.O % g.group != 0)
    throw OpError(o + ": output channels " + std::to_string(g.O) + " not divisible by group");
  const int64_t eff_h = (g.kh - 1) * g.dh + 1, eff_w = (g.kw - 1) * g.dw + 1;
  const int64_t ph = g.H + g.pt + g.pb, pw = g.W + g.pl + g.pr;
  if (ph < eff_h || pw < eff_w)
    throw OpError(o + ": kernel (with dilation) is larger than the padded input");
  g.OH = (ph - eff_h) / g.sh + 1;
  g.OW = (pw - eff_w) / g.sw + 1;
  // Scratch buffers hold K x P elements; refuse sizes whose products could overflow.
  const double work = double(g.Cw) * g.kk() * g.OH * g.OW;
  if (work > double(1LL << 34)) throw OpError(o + ": layer too large for the im2col buffer");
  return g;
}

// ---------------------------------------------------------------- threads and errors

void ParallelFor(OrtKernelContext* ctx, size_t total, const std::function<void(size_t)>& fn) {
  if (total == 0) return;
  if (total == 1 || ctx == nullptr) {
    for (size_t i = 0; i < total; ++i) fn(i);
    return;
  }
  auto trampoline = [](void* data, size_t i) {
    (*static_cast<const std::function<void(size_t)>*>(data))(i);
  };
  Ort::ThrowOnError(Ort::GetApi().KernelContext_ParallelFor(
      ctx, trampoline, total, 0, const_cast<std::function<void(size_t)>*>(&fn)));
}

Ort::Status Guarded(const char* op, const std::function<void()>& body) {
  try {
    body();
    return Ort::Status{nullptr};
  } catch (const OpError& e) {
    return Ort::Status(e.what(), ORT_INVALID_ARGUMENT);
  } catch (const std::bad_alloc&) {
    return Ort::Status((std::string(op) + ": out of memory").c_str(), ORT_RUNTIME_EXCEPTION);
  } catch (const std::exception& e) {
    return Ort::Status((std::string(op) + ": " + e.what()).c_str(), ORT_RUNTIME_EXCEPTION);
  }
}

// ---------------------------------------------------------------- packing

template <> int TileRows<float>(const IsaKernels& k) { return k.mr; }
template <> int TileCols<float>(const IsaKernels& k) { return k.nr; }
template <> int TileRows<int16_t>(const IsaKernels& k) { return k.imr; }
template <> int TileCols<int16_t>(const IsaKernels& k) { return k.inr; }

template <class T>
PackedWeights<T> PackWeights(const IsaKernels& isa, const T* w, const ConvGeom& g,
                             const std::vector<int>& outputs, const std::vector<int>& chans) {
  constexpr int P = PairOf<T>();
  const int mr = TileRows<T>(isa);
  PackedWeights<T> pw;
  pw.M = int64_t(outputs.size());
  pw.K = int64_t(chans.size()) * g.kk();
  pw.Kp = RoundUp(pw.K, P);
  pw.data.assign(RoundUp(pw.M, mr) * pw.Kp, T(0));
  for (int64_t m = 0; m < pw.M; ++m) {
    const T* wo = w + int64_t(outputs[m]) * g.Cw * g.kk();
    T* panel = pw.data.data() + (m / mr) * pw.Kp * mr;
    for (int64_t ci = 0; ci < int64_t(chans.size()); ++ci)
      for (int64_t t = 0; t < g.kk(); ++t) {
        const int64_t k = ci * g.kk() + t;
        panel[(k / P) * mr * P + (m % mr) * P + k % P] = wo[chans[ci] * g.kk() + t];
      }
  }
  return pw;
}

template <class T>
WeightRows<T> MakeWeightRows(const T* w, const ConvGeom& g, const std::vector<int>& outputs,
                             const std::vector<int>& chans) {
  WeightRows<T> r;
  r.M = int64_t(outputs.size());
  r.K = int64_t(chans.size()) * g.kk();
  r.Lpad = RoundUp(std::max<int64_t>(r.K, 1), 32);
  r.data.assign(r.M * r.Lpad, T(0));
  for (int64_t m = 0; m < r.M; ++m) {
    const T* wo = w + int64_t(outputs[m]) * g.Cw * g.kk();
    for (int64_t ci = 0; ci < int64_t(chans.size()); ++ci)
      std::memcpy(&r.data[m * r.Lpad + ci * g.kk()], wo + chans[ci] * g.kk(), sizeof(T) * g.kk());
  }
  return r;
}

template <class T>
void Im2colPacked(OrtKernelContext* ctx, const IsaKernels& isa, const T* x, const ConvGeom& g,
                  const std::vector<int>& chans, std::vector<T>& out) {
  constexpr int P = PairOf<T>();
  const int64_t nr = TileCols<T>(isa);
  const int64_t K = int64_t(chans.size()) * g.kk(), Kp = RoundUp(K, P);
  const int64_t Np = g.P(), panels = (Np + nr - 1) / nr;
  out.resize(size_t(panels * Kp * nr));
  // One task per packed k step: writes rows k..k+P-1 of every panel.
  ParallelFor(ctx, size_t(Kp / P), [&](size_t kstep) {
    for (int64_t k = int64_t(kstep) * P; k < int64_t(kstep) * P + P; ++k) {
      T* dst = out.data() + (k / P) * nr * P + k % P;
      if (k >= K) {
        for (int64_t col = 0; col < panels * nr; ++col)
          dst[(col / nr) * Kp * nr + (col % nr) * P] = T(0);
        continue;
      }
      const int64_t c = chans[k / g.kk()], i = (k % g.kk()) / g.kw, j = k % g.kw;
      const T* xc = x + c * g.H * g.W;
      int64_t col = 0;
      for (int64_t oh = 0; oh < g.OH; ++oh) {
        const int64_t ih = oh * g.sh - g.pt + i * g.dh;
        const bool row_in = ih >= 0 && ih < g.H;
        for (int64_t ow = 0; ow < g.OW; ++ow, ++col) {
          const int64_t iw = ow * g.sw - g.pl + j * g.dw;
          dst[(col / nr) * Kp * nr + (col % nr) * P] =
              (row_in && iw >= 0 && iw < g.W) ? xc[ih * g.W + iw] : T(0);
        }
      }
      for (; col < panels * nr; ++col) dst[(col / nr) * Kp * nr + (col % nr) * P] = T(0);
    }
  });
}

template <class T>
void Im2colRows(OrtKernelContext* ctx, const T* x, const ConvGeom& g,
                const std::vector<int>& chans, int64_t Lpad, std::vector<T>& out) {
  const int64_t K = int64_t(chans.size()) * g.kk();
  out.resize(size_t(g.P() * Lpad));
  ParallelFor(ctx, size_t(g.OH), [&](size_t oh_) {
    const int64_t oh = int64_t(oh_);
    for (int64_t ow = 0; ow < g.OW; ++ow) {
      T* dst = out.data() + (oh * g.OW + ow) * Lpad;
      int64_t k = 0;
      for (int c : chans) {
        const T* xc = x + int64_t(c) * g.H * g.W;
        for (int64_t i = 0; i < g.kh; ++i) {
          const int64_t ih = oh * g.sh - g.pt + i * g.dh;
          for (int64_t j = 0; j < g.kw; ++j, ++k) {
            const int64_t iw = ow * g.sw - g.pl + j * g.dw;
            dst[k] = (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) ? xc[ih * g.W + iw] : T(0);
          }
        }
      }
      for (; k < Lpad; ++k) dst[k] = T(0);
    }
  });
}

// ---------------------------------------------------------------- GEMM driver

namespace {
// Tasks are (column panel, run of row panels): the B panel stays in cache across the row
// panels, and there are enough tasks for the thread pool even when N is small.
template <class T, class Acc, class Micro>
void GemmTasks(OrtKernelContext* ctx, int mr, int nr, const PackedWeights<T>& a, const T* b,
               int64_t N, Acc* c, int64_t ldc, Micro micro) {
  const int64_t m_panels = (a.M + mr - 1) / mr, n_panels = (N + nr - 1) / nr;
  if (m_panels == 0 || n_panels == 0) return;
  const int64_t want_tasks = 16;
  int64_t m_chunks = std::min<int64_t>(m_panels, std::max<int64_t>(1, want_tasks / n_panels));
  const int64_t per_chunk = (m_panels + m_chunks - 1) / m_chunks;
  m_chunks = (m_panels + per_chunk - 1) / per_chunk;
  ParallelFor(ctx, size_t(n_panels * m_chunks), [&](size_t task) {
    const int64_t jp = int64_t(task) / m_chunks, chunk = int64_t(task) % m_chunks;
    const T* bp = b + jp * a.Kp * nr;
    const int n_valid = int(std::min<int64_t>(nr, N - jp * nr));
    const int64_t ip_end = std::min(m_panels, (chunk + 1) * per_chunk);
    for (int64_t ip = chunk * per_chunk; ip < ip_end; ++ip) {
      const int m_valid = int(std::min<int64_t>(mr, a.M - ip * mr));
      micro(a.data.data() + ip * a.Kp * mr, bp, c + ip * mr * ldc + jp * nr, m_valid, n_valid);
    }
  });
}
}  // namespace

void GemmPacked(OrtKernelContext* ctx, const IsaKernels& isa, const PackedWeights<float>& a,
                const float* b, int64_t N, float* c, int64_t ldc) {
  GemmTasks(ctx, isa.mr, isa.nr, a, b, N, c, ldc,
            [&](const float* ap, const float* bp, float* cp, int mv, int nv) {
              isa.sgemm_micro(a.Kp, ap, bp, cp, ldc, mv, nv, false);
            });
}

void GemmPacked(OrtKernelContext* ctx, const IsaKernels& isa, const PackedWeights<int16_t>& a,
                const int16_t* b, int64_t N, int32_t* c, int64_t ldc) {
  GemmTasks(ctx, isa.imr, isa.inr, a, b, N, c, ldc,
            [&](const int16_t* ap, const int16_t* bp, int32_t* cp, int mv, int nv) {
              isa.igemm_micro(a.Kp, ap, bp, cp, ldc, mv, nv);
            });
}

// ---------------------------------------------------------------- gated two-stage conv

namespace {
template <class T> struct AccOf { using type = float; };
template <> struct AccOf<int16_t> { using type = int32_t; };

inline void DotRows(const IsaKernels& isa, const float* x, const float* const* rows, int n,
                    int64_t len, float* out) {
  isa.sdot_rows(x, rows, n, len, out);
}
inline void DotRows(const IsaKernels& isa, const int16_t* x, const int16_t* const* rows, int n,
                    int64_t len, int32_t* out) {
  isa.idot_rows(x, rows, n, len, out);
}
}  // namespace

template <class T>
void RunGatedConv(OrtKernelContext* ctx, const IsaKernels& isa, const ConvGeom& g,
                  const GatedStagePlan<T>& plan, const T* x1, const T* x2, const float* threshold,
                  float* y, GateCounts* counts) {
  using Acc = typename AccOf<T>::type;
  const int64_t M = int64_t(plan.outputs.size()), Np = g.P();
  if (M == 0 || Np == 0) return;
  std::vector<T> cols;
  std::vector<Acc> acc(static_cast<size_t>(M * Np));

  // Stage 1 for every output element.
  Im2colPacked(ctx, isa, x1, g, plan.chans1, cols);
  GemmPacked(ctx, isa, plan.w1, cols.data(), Np, acc.data(), Np);

  // Gate per element; remember which outputs are on at each pixel (CSR by pixel).
  std::vector<int32_t> on_count(size_t(Np), 0);
  int64_t on_total = 0;
  for (int64_t m = 0; m < M; ++m) {
    float* yo = y + int64_t(plan.outputs[m]) * Np;
    const Acc* ao = acc.data() + m * Np;
    const float thr = threshold[plan.outputs[m]];
    for (int64_t p = 0; p < Np; ++p) {
      const float v = plan.scale1 * float(ao[p]);
      yo[p] = v;
      if (v > thr) ++on_count[p];
    }
  }
  for (int64_t p = 0; p < Np; ++p) on_total += on_count[p];
  counts->on += on_total;
  counts->total += M * Np;
  if (on_total == 0 || plan.chans2.empty()) return;

  const double frac = double(on_total) / double(M * Np);
  if (frac > kDenseSecondStageFraction) {
    // Dense second stage, then select: cheaper than dot products when most gates are on.
    Im2colPacked(ctx, isa, x2, g, plan.chans2, cols);
    std::vector<Acc> acc2(static_cast<size_t>(M * Np));
    GemmPacked(ctx, isa, plan.w2, cols.data(), Np, acc2.data(), Np);
    for (int64_t m = 0; m < M; ++m) {
      float* yo = y + int64_t(plan.outputs[m]) * Np;
      const Acc* a2 = acc2.data() + m * Np;
      const float thr = threshold[plan.outputs[m]];
      for (int64_t p = 0; p < Np; ++p)
        if (yo[p] > thr) yo[p] += plan.scale2 * float(a2[p]);
    }
    return;
  }

  // Sparse second stage: one dot product per gated-on element, four outputs per pass so one
  // load of the receptive field feeds four weight rows.
  std::vector<int64_t> start(size_t(Np + 1), 0);
  for (int64_t p = 0; p < Np; ++p) start[p + 1] = start[p] + on_count[p];
  std::vector<int32_t> on_rows(static_cast<size_t>(on_total));
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t m = 0; m < M; ++m) {
      const float* yo = y + int64_t(plan.outputs[m]) * Np;
      const float thr = threshold[plan.outputs[m]];
      for (int64_t p = 0; p < Np; ++p)
        if (yo[p] > thr) on_rows[fill[p]++] = int32_t(m);
    }
  }
  const WeightRows<T>& rows = plan.w2_rows;
  std::vector<T> fields;
  Im2colRows(ctx, x2, g, plan.chans2, rows.Lpad, fields);
  const int64_t pix_per_task = 16;
  ParallelFor(ctx, size_t((Np + pix_per_task - 1) / pix_per_task), [&](size_t task) {
    const int64_t p_end = std::min(Np, int64_t(task + 1) * pix_per_task);
    for (int64_t p = int64_t(task) * pix_per_task; p < p_end; ++p) {
      const T* field = fields.data() + p * rows.Lpad;
      for (int64_t e = start[p]; e < start[p + 1]; e += 4) {
        const int n = int(std::min<int64_t>(4, start[p + 1] - e));
        const T* wrows[4];
        Acc dots[4];
        for (int i = 0; i < n; ++i) wrows[i] = rows.data.data() + on_rows[e + i] * rows.Lpad;
        DotRows(isa, field, wrows, n, rows.Lpad, dots);
        for (int i = 0; i < n; ++i)
          y[int64_t(plan.outputs[on_rows[e + i]]) * Np + p] += plan.scale2 * float(dots[i]);
      }
    }
  });
}

// Explicit instantiations for the two element types the kernels use.
#define G2D_INSTANTIATE(T)                                                                      \
  template PackedWeights<T> PackWeights<T>(const IsaKernels&, const T*, const ConvGeom&,         \
                                           const std::vector<int>&, const std::vector<int>&);    \
  template WeightRows<T> MakeWeightRows<T>(const T*, const ConvGeom&, const std::vector<int>&,   \
                                           const std::vector<int>&);                             \
  template void Im2colPacked<T>(OrtKernelContext*, const IsaKernels&, const T*, const ConvGeom&, \
                                const std::vector<int>&, std::vector<T>&);                       \
  template void Im2colRows<T>(OrtKernelContext*, const T*, const ConvGeom&,                      \
                              const std::vector<int>&, int64_t, std::vector<T>&);                \
  template void RunGatedConv<T>(OrtKernelContext*, const IsaKernels&, const ConvGeom&,           \
                                const GatedStagePlan<T>&, const T*, const T*, const float*,      \
                                float*, GateCounts*);
G2D_INSTANTIATE(float)
G2D_INSTANTIATE(int16_t)
#undef G2D_INSTANTIATE

}  // namespace g2d
