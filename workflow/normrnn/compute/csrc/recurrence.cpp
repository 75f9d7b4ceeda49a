// The LSTM and GRU recurrences of the sequence path (normrnn/compute/sequence/) as one compiled
// loop each way: at the sequential-MNIST size (B=64, H=100) a step in torch's ops is two dozen
// calls of 5-15 µs each, several times the arithmetic. Here a step is one matrix product
// through the BLAS that torch links (its gemm's address comes from Python) and a few passes
// over the step's gates. The math is that of _lstm_forward/_lstm_backward and
// _gru_forward/_gru_backward in sequence/lstm.py and sequence/gru.py;
// tests/unit/test_recurrence.py holds this loop to them, to float64 and to finite differences.
//
// Terms (the norms of W_h h_{t-1} and, in the LSTM, of c_t), by kind:
//   -1 none;  0, 1, 2 batch norm with per-step statistics over the batch, estimator as in
//   batchnorm.h (L2, L1, Linf with k = 1), constant c;  3 layer norm and 4 (partial) RMSNorm
//   of each of `groups` blocks of a row, the RMS from the first k units of the block;
//   5 a batch norm's population statistics: x̂ = (a - mean_t) / den_t, both given.
// A term's output is weight * x̂ + bias (bias may be absent).
#include <cstring>

#include "batchnorm.h"

namespace {

enum TermKind { kNone = -1, kLayer = 3, kRms = 4, kPopulation = 5 };

template <typename T>
using Gemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*,
                      const T*, const int*, const T*, const int*, const T*, T*, const int*);

// The layouts of both structures are mirrored by ctypes in normrnn/compute/native.py.
struct Term {
  int32_t kind, groups;
  int64_t k;
  double eps, c;
  const void* weight;  // (F)
  const void* bias;    // (F), or null
  void* xhat;          // (T, B, F)
  void* mean;          // batch norms: (T, F), given for kPopulation; layer norm: (T, B, groups)
  void* stat;          // batch norms: (T, F)
  void* den;           // batch norms: (T, F), given for kPopulation; row norms: 1 / rms or
                       // 1 / std, (T, B, groups)
};

struct Loop {
  int64_t steps, batch, size;  // size: H
  void* gemm;
  const void* x;     // (T, B, 4H): the input term, biases included
  const void* w;     // (4H, H): W_hh
  void* hs;          // (T + 1, B, H), hs[0] = h0
  void* cs;          // (T + 1, B, H), cs[0] = c0
  void* act;         // (T, B, 4H): σ(i), σ(f), tanh(g) (unscaled), σ(o)
  void* tcs;         // (T, B, H): tanh of the (scaled or normalized) cell
  void* work;        // 3 · B · 4H + 3 · B · H + 5 · 4H values
  double candidate_scale, cell_scale, output_scale;
  Term hidden, cell;
  const void* d_y;   // (T, B, H)
  const void* d_hT;  // (B, H)
  const void* d_cT;  // (B, H)
  void* d_pre;       // (T, B, 4H): the gates' pre-activations' gradient
  void* d_a;         // (T, B, 4H): the hidden term's input gradient (with a hidden term)
  void* d_cn;        // (T, B, H): the cell term's output gradient (with a cell term)
  void* d_h0;        // (B, H)
  void* d_c0;        // (B, H)
  // the GRU (gates r, z, n; act holds σ(r), σ(z), tanh(u) unscaled, tcs the recurrent n
  // term with its bias, W_hn h + b_hn; x, w, d_pre, d_a and the term of 3H gates)
  const void* b_hn;  // (H)
  void* d_hid;       // (T, B, 3H): the gradient of the (normalized) W_h h
};

// exp in a form the compiler vectorizes (Cephes' expf: 2^n e^r, |r| <= ln2 / 2, a degree-6
// polynomial; within 2 ulp of expf), for float; double takes std::exp. NaN passes through.
NORMRNN_INLINE float exp_of(float x) {
  x = x > 88.0f ? 88.0f : x;
  x = x < -87.0f ? -87.0f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
NORMRNN_INLINE double exp_of(double x) { return std::exp(x); }

template <typename T>
NORMRNN_INLINE T sigmoid(T x) {
  return T(1) / (T(1) + exp_of(-x));
}
template <typename T>
NORMRNN_INLINE T tanh_of(T x) {
  return T(1) - T(2) / (T(1) + exp_of(T(2) * x));
}

template <typename T>
struct Step {  // one term's arrays at one step
  T* xhat;
  T* mean;
  T* stat;
  T* den;
};

template <typename T>
NORMRNN_INLINE Step<T> at(const Term& term, int64_t t, int64_t batch, int64_t features) {
  const bool by_row = term.kind == kLayer || term.kind == kRms;
  const int64_t rows = by_row ? batch * term.groups : features;
  return {static_cast<T*>(term.xhat) + t * batch * features,
          term.mean ? static_cast<T*>(term.mean) + t * rows : nullptr,
          term.stat ? static_cast<T*>(term.stat) + t * rows : nullptr,
          static_cast<T*>(term.den) + t * rows};
}

// x̂ of a row norm: each block of n = features / groups units of a row, centered (layer norm,
// 1 / std in den, the mean in mean) or not (RMSNorm, 1 / rms over the block's first k).
template <typename T>
NORMRNN_INLINE void row_forward(const T* __restrict__ a, const Term& term, Step<T> s,
                                int64_t batch, int64_t features) {
  const int64_t groups = term.groups, n = features / groups;
  const T eps = static_cast<T>(term.eps);
  for (int64_t r = 0; r < batch * groups; ++r) {
    const T* __restrict__ v = a + r * n;
    T* __restrict__ y = s.xhat + r * n;
    if (term.kind == kLayer) {
      T sum = 0;
      for (int64_t j = 0; j < n; ++j) sum += v[j];
      const T mean = sum / static_cast<T>(n);
      T sq = 0;
      for (int64_t j = 0; j < n; ++j) sq += (v[j] - mean) * (v[j] - mean);
      const T rstd = T(1) / std::sqrt(sq / static_cast<T>(n) + eps);
      for (int64_t j = 0; j < n; ++j) y[j] = (v[j] - mean) * rstd;
      s.mean[r] = mean;
      s.den[r] = rstd;
    } else {
      T sq = 0;
      for (int64_t j = 0; j < term.k; ++j) sq += v[j] * v[j];
      const T rstd = T(1) / std::sqrt(sq / static_cast<T>(term.k) + eps);
      for (int64_t j = 0; j < n; ++j) y[j] = v[j] * rstd;
      s.den[r] = rstd;
    }
  }
}

// dL/da of row_forward from g = dL/dx̂: layer norm rstd (g - mean g - x̂ mean(g x̂)),
// RMSNorm rstd (g - 1[j<k] x̂ Σ(g x̂) / k), the sum over the whole block.
template <typename T>
NORMRNN_INLINE void row_backward(const T* __restrict__ g, const Term& term, Step<T> s,
                                 T* __restrict__ out, int64_t batch, int64_t features) {
  const int64_t groups = term.groups, n = features / groups;
  for (int64_t r = 0; r < batch * groups; ++r) {
    const T* __restrict__ gv = g + r * n;
    const T* __restrict__ x = s.xhat + r * n;
    T* __restrict__ o = out + r * n;
    const T rstd = s.den[r];
    T dot = 0;
    if (term.kind == kLayer) {
      T sum = 0;
      for (int64_t j = 0; j < n; ++j) {
        sum += gv[j];
        dot += gv[j] * x[j];
      }
      const T mg = sum / static_cast<T>(n), mgx = dot / static_cast<T>(n);
      for (int64_t j = 0; j < n; ++j) o[j] = (gv[j] - mg - x[j] * mgx) * rstd;
    } else {
      const int64_t k = term.k;
      for (int64_t j = 0; j < n; ++j) dot += gv[j] * x[j];  // every x̂_j holds 1 / rms
      dot /= static_cast<T>(k);
      for (int64_t j = 0; j < k; ++j) o[j] = (gv[j] - x[j] * dot) * rstd;
      for (int64_t j = k; j < n; ++j) o[j] = gv[j] * rstd;
    }
  }
}

// The term's x̂ of a (batch, features) step into s.xhat, with its statistics.
template <typename T>
NORMRNN_INLINE void term_forward(const T* a, const Term& term, Step<T> s, int64_t batch,
                                 int64_t features) {
  const T eps = static_cast<T>(term.eps), c = static_cast<T>(term.c);
  switch (term.kind) {
    case kL2: forward<T, kL2>(a, s.xhat, s.mean, s.stat, s.den, 1, batch, features, eps, c); break;
    case kL1: forward<T, kL1>(a, s.xhat, s.mean, s.stat, s.den, 1, batch, features, eps, c); break;
    case kLinf:
      forward<T, kLinf>(a, s.xhat, s.mean, s.stat, s.den, 1, batch, features, eps, c);
      break;
    case kPopulation:
      for (int64_t r = 0; r < batch; ++r) {
        const T* __restrict__ v = a + r * features;
        T* __restrict__ y = s.xhat + r * features;
        for (int64_t j = 0; j < features; ++j) y[j] = (v[j] - s.mean[j]) / s.den[j];
      }
      break;
    default: row_forward(a, term, s, batch, features);
  }
}

template <typename T>
NORMRNN_INLINE void term_backward(const T* g, const Term& term, Step<T> s, T* out, int64_t batch,
                                  int64_t features, T* work) {
  const T c = static_cast<T>(term.c);
  switch (term.kind) {
    case kL2: backward<T, kL2>(g, s.xhat, s.den, out, 1, batch, features, c, work); break;
    case kL1: backward<T, kL1>(g, s.xhat, s.den, out, 1, batch, features, c, work); break;
    case kLinf: backward<T, kLinf>(g, s.xhat, s.den, out, 1, batch, features, c, work); break;
    case kPopulation:
      for (int64_t r = 0; r < batch; ++r) {
        for (int64_t j = 0; j < features; ++j) out[r * features + j] = g[r * features + j] / s.den[j];
      }
      break;
    default: row_backward(g, term, s, out, batch, features);
  }
}

// out = x + w ⊙ x̂ + b, w and b per feature, over (batch, features); x and b may be absent.
template <typename T>
NORMRNN_INLINE void affine(const T* __restrict__ x, const T* __restrict__ xhat,
                           const T* __restrict__ w, const T* __restrict__ b, T* __restrict__ out,
                           int64_t batch, int64_t features) {
  for (int64_t r = 0; r < batch; ++r) {
    const int64_t o = r * features;
    if (x && b) {
      for (int64_t j = 0; j < features; ++j) out[o + j] = x[o + j] + xhat[o + j] * w[j] + b[j];
    } else if (x) {
      for (int64_t j = 0; j < features; ++j) out[o + j] = x[o + j] + xhat[o + j] * w[j];
    } else if (b) {
      for (int64_t j = 0; j < features; ++j) out[o + j] = xhat[o + j] * w[j] + b[j];
    } else {
      for (int64_t j = 0; j < features; ++j) out[o + j] = xhat[o + j] * w[j];
    }
  }
}

// The term's input gradient at step t into out, from g, the gradient of its output
// (weight ⊙ x̂ + bias); tmp holds g ⊙ weight.
template <typename T>
NORMRNN_INLINE void term_input_grad(const T* __restrict__ g, const Term& term, int64_t t,
                                    int64_t batch, int64_t features, T* __restrict__ tmp,
                                    T* out, T* work) {
  const T* __restrict__ w = static_cast<const T*>(term.weight);
  for (int64_t r = 0; r < batch; ++r) {
    for (int64_t j = 0; j < features; ++j) tmp[r * features + j] = g[r * features + j] * w[j];
  }
  term_backward(tmp, term, at<T>(term, t, batch, features), out, batch, features, work);
}

template <typename T>
NORMRNN_INLINE void lstm_forward(const Loop& L) {
  const int64_t B = L.batch, H = L.size, G = 4 * H, steps = L.steps;
  const int m = static_cast<int>(G), n = static_cast<int>(B), k = static_cast<int>(H);
  const T one = 1, zero = 0;
  const auto gemm = reinterpret_cast<Gemm<T>>(L.gemm);
  const T* w = static_cast<const T*>(L.w);
  T* a = static_cast<T*>(L.work);  // W_h h_{t-1}
  T* xc = a + B * G;               // the cell term's x̂ input, then its affine output
  const T sg = static_cast<T>(L.candidate_scale), sc = static_cast<T>(L.cell_scale);
  const T so = static_cast<T>(L.output_scale);
  const Term &hid = L.hidden, &cel = L.cell;
  for (int64_t t = 0; t < steps; ++t) {
    const T* x = static_cast<const T*>(L.x) + t * B * G;
    const T* hp = static_cast<const T*>(L.hs) + t * B * H;
    const T* cp = static_cast<const T*>(L.cs) + t * B * H;
    T* __restrict__ act = static_cast<T*>(L.act) + t * B * G;
    T* __restrict__ c = static_cast<T*>(L.cs) + (t + 1) * B * H;
    T* __restrict__ h = static_cast<T*>(L.hs) + (t + 1) * B * H;
    T* __restrict__ tc = static_cast<T*>(L.tcs) + t * B * H;
    gemm("T", "N", &m, &n, &k, &one, w, &k, hp, &k, &zero, a, &m);  // (h W_hᵀ)ᵀ, column-major
    if (hid.kind == kNone) {
      for (int64_t i = 0; i < B * G; ++i) act[i] = x[i] + a[i];
    } else {
      const Step<T> s = at<T>(hid, t, B, G);
      term_forward(a, hid, s, B, G);
      affine(x, s.xhat, static_cast<const T*>(hid.weight), static_cast<const T*>(hid.bias), act,
             B, G);
    }
    for (int64_t r = 0; r < B; ++r) {
      T* __restrict__ gates = act + r * G;
      for (int64_t j = 0; j < 2 * H; ++j) gates[j] = sigmoid(gates[j]);
      for (int64_t j = 2 * H; j < 3 * H; ++j) gates[j] = tanh_of(gates[j]);
      for (int64_t j = 3 * H; j < G; ++j) gates[j] = sigmoid(gates[j]);
      const T *i = gates, *f = gates + H, *g = gates + 2 * H;
      for (int64_t j = 0; j < H; ++j) c[r * H + j] = f[j] * cp[r * H + j] + i[j] * (g[j] * sg);
    }
    const T* __restrict__ cell_in = c;
    T cell_mul = sc;
    if (cel.kind != kNone) {
      const Step<T> s = at<T>(cel, t, B, H);
      term_forward(c, cel, s, B, H);
      affine<T>(nullptr, s.xhat, static_cast<const T*>(cel.weight),
                static_cast<const T*>(cel.bias), xc, B, H);
      cell_in = xc;
      cell_mul = T(1);
    }
    for (int64_t r = 0; r < B; ++r) {
      const T* __restrict__ o = act + r * G + 3 * H;
      for (int64_t j = 0; j < H; ++j) {
        tc[r * H + j] = tanh_of(cell_in[r * H + j] * cell_mul);  // (× 1: exact)
        h[r * H + j] = o[j] * tc[r * H + j] * so;
      }
    }
  }
}

template <typename T>
NORMRNN_INLINE void lstm_backward(const Loop& L) {
  const int64_t B = L.batch, H = L.size, G = 4 * H, steps = L.steps;
  const int mh = static_cast<int>(H), n = static_cast<int>(B), kg = static_cast<int>(G);
  const T one = 1, zero = 0;
  const auto gemm = reinterpret_cast<Gemm<T>>(L.gemm);
  const T* w = static_cast<const T*>(L.w);
  T* tmp = static_cast<T*>(L.work);  // the gains applied to a term's output gradient
  T* out = tmp + B * G;              // the cell term's input gradient
  T* dh = out + B * G;
  T* dc = dh + B * H;
  T* bn_work = dc + B * H + B * H;
  const T sg = static_cast<T>(L.candidate_scale), so = static_cast<T>(L.output_scale);
  const Term &hid = L.hidden, &cel = L.cell;
  // d h_t / d(tanh's input): σ(o) · s_out · (1 - tc²), · s_c without a cell term
  const T kscale = cel.kind == kNone ? so * static_cast<T>(L.cell_scale) : so;
  const T* d_y = static_cast<const T*>(L.d_y);
  std::memcpy(dc, L.d_cT, sizeof(T) * B * H);
  const T* da = nullptr;
  for (int64_t t = steps - 1; t >= 0; --t) {
    const T* dyt = d_y + t * B * H;
    if (da == nullptr) {
      const T* dhT = static_cast<const T*>(L.d_hT);
      for (int64_t i = 0; i < B * H; ++i) dh[i] = dyt[i] + dhT[i];
    } else {
      std::memcpy(dh, dyt, sizeof(T) * B * H);
      gemm("N", "N", &mh, &n, &kg, &one, w, &mh, da, &kg, &one, dh, &mh);  // += da W_h
    }
    const T* __restrict__ act = static_cast<const T*>(L.act) + t * B * G;
    const T* __restrict__ tc = static_cast<const T*>(L.tcs) + t * B * H;
    const T* __restrict__ cp = static_cast<const T*>(L.cs) + t * B * H;
    T* __restrict__ dp = static_cast<T*>(L.d_pre) + t * B * G;
    if (cel.kind == kNone) {
      for (int64_t r = 0; r < B; ++r) {
        const T* __restrict__ o = act + r * G + 3 * H;
        for (int64_t j = 0; j < H; ++j) {
          const int64_t q = r * H + j;
          dc[q] += dh[q] * ((T(1) - tc[q] * tc[q]) * o[j] * kscale);
        }
      }
    } else {
      T* __restrict__ dcn = static_cast<T*>(L.d_cn) + t * B * H;
      for (int64_t r = 0; r < B; ++r) {
        const T* __restrict__ o = act + r * G + 3 * H;
        for (int64_t j = 0; j < H; ++j) {
          const int64_t q = r * H + j;
          dcn[q] = dh[q] * ((T(1) - tc[q] * tc[q]) * o[j] * kscale);
        }
      }
      term_input_grad(dcn, cel, t, B, H, tmp, out, bn_work);
      for (int64_t i = 0; i < B * H; ++i) dc[i] += out[i];
    }
    for (int64_t r = 0; r < B; ++r) {
      const T* __restrict__ i = act + r * G;
      const T* __restrict__ f = i + H;
      const T* __restrict__ g = i + 2 * H;
      const T* __restrict__ o = i + 3 * H;
      T* __restrict__ di = dp + r * G;
      T* __restrict__ df = di + H;
      T* __restrict__ dg = di + 2 * H;
      T* __restrict__ dq = di + 3 * H;
      const T* __restrict__ dcr = dc + r * H;
      const T* __restrict__ dhr = dh + r * H;
      const T* __restrict__ cpr = cp + r * H;
      const T* __restrict__ tcr = tc + r * H;
      for (int64_t j = 0; j < H; ++j) {
        di[j] = dcr[j] * ((i[j] - i[j] * i[j]) * g[j] * sg);
        df[j] = dcr[j] * ((f[j] - f[j] * f[j]) * cpr[j]);
        dg[j] = dcr[j] * ((T(1) - g[j] * g[j]) * i[j] * sg);
        dq[j] = dhr[j] * ((o[j] - o[j] * o[j]) * tcr[j] * so);
      }
    }
    if (hid.kind == kNone) {
      da = dp;
    } else {
      T* d_a = static_cast<T*>(L.d_a) + t * B * G;
      term_input_grad(dp, hid, t, B, G, tmp, d_a, bn_work);
      da = d_a;
    }
    for (int64_t r = 0; r < B; ++r) {
      const T* __restrict__ f = act + r * G + H;
      for (int64_t j = 0; j < H; ++j) dc[r * H + j] *= f[j];
    }
  }
  std::memcpy(L.d_c0, dc, sizeof(T) * B * H);
  gemm("N", "N", &mh, &n, &kg, &one, w, &mh, da, &kg, &zero, static_cast<T*>(L.d_h0), &mh);
}

// The GRU of cells.GRULayer: r, z = σ(x_rz + a_rz), u = x_n + r (a_n + b_hn),
// h' = n + z (h - n) with n = s_g tanh(u), a the (normalized) W_h h.
template <typename T>
NORMRNN_INLINE void gru_forward(const Loop& L) {
  const int64_t B = L.batch, H = L.size, G = 3 * H, steps = L.steps;
  const int m = static_cast<int>(G), n = static_cast<int>(B), k = static_cast<int>(H);
  const T one = 1, zero = 0;
  const auto gemm = reinterpret_cast<Gemm<T>>(L.gemm);
  const T* w = static_cast<const T*>(L.w);
  const T* __restrict__ b_hn = static_cast<const T*>(L.b_hn);
  T* a = static_cast<T*>(L.work);  // W_h h_{t-1}, then the term's output
  const T sg = static_cast<T>(L.candidate_scale);
  const Term& hid = L.hidden;
  for (int64_t t = 0; t < steps; ++t) {
    const T* x = static_cast<const T*>(L.x) + t * B * G;
    const T* hp = static_cast<const T*>(L.hs) + t * B * H;
    T* __restrict__ act = static_cast<T*>(L.act) + t * B * G;
    T* __restrict__ hnb = static_cast<T*>(L.tcs) + t * B * H;
    T* __restrict__ h = static_cast<T*>(L.hs) + (t + 1) * B * H;
    gemm("T", "N", &m, &n, &k, &one, w, &k, hp, &k, &zero, a, &m);
    if (hid.kind != kNone) {
      const Step<T> s = at<T>(hid, t, B, G);
      term_forward(a, hid, s, B, G);
      affine<T>(nullptr, s.xhat, static_cast<const T*>(hid.weight),
                static_cast<const T*>(hid.bias), a, B, G);
    }
    for (int64_t r = 0; r < B; ++r) {
      const T* __restrict__ xr = x + r * G;
      const T* __restrict__ ar = a + r * G;
      T* __restrict__ gates = act + r * G;
      for (int64_t j = 0; j < 2 * H; ++j) gates[j] = sigmoid(xr[j] + ar[j]);
      const T* __restrict__ hpr = hp + r * H;
      T* __restrict__ hbr = hnb + r * H;
      T* __restrict__ hr = h + r * H;
      for (int64_t j = 0; j < H; ++j) {
        hbr[j] = ar[2 * H + j] + b_hn[j];
        const T nv = tanh_of(xr[2 * H + j] + gates[j] * hbr[j]);
        gates[2 * H + j] = nv;
        const T nt = nv * sg;
        hr[j] = nt + gates[H + j] * (hpr[j] - nt);
      }
    }
  }
}

template <typename T>
NORMRNN_INLINE void gru_backward(const Loop& L) {
  const int64_t B = L.batch, H = L.size, G = 3 * H, steps = L.steps;
  const int mh = static_cast<int>(H), n = static_cast<int>(B), kg = static_cast<int>(G);
  const T one = 1;
  const auto gemm = reinterpret_cast<Gemm<T>>(L.gemm);
  const T* w = static_cast<const T*>(L.w);
  T* tmp = static_cast<T*>(L.work);  // the gains applied to the term's output gradient
  T* dh = tmp + B * G;
  T* bn_work = dh + B * H;
  const T sg = static_cast<T>(L.candidate_scale);
  const Term& hid = L.hidden;
  const T* d_y = static_cast<const T*>(L.d_y);
  const T* dhT = static_cast<const T*>(L.d_hT);
  for (int64_t i = 0; i < B * H; ++i) dh[i] = d_y[(steps - 1) * B * H + i] + dhT[i];
  for (int64_t t = steps - 1; t >= 0; --t) {
    const T* __restrict__ act = static_cast<const T*>(L.act) + t * B * G;
    const T* __restrict__ hnb = static_cast<const T*>(L.tcs) + t * B * H;
    const T* __restrict__ hp = static_cast<const T*>(L.hs) + t * B * H;
    T* __restrict__ dp = static_cast<T*>(L.d_pre) + t * B * G;
    T* __restrict__ dhid = static_cast<T*>(L.d_hid) + t * B * G;
    for (int64_t r = 0; r < B; ++r) {
      const T* __restrict__ rg = act + r * G;
      const T* __restrict__ zg = rg + H;
      const T* __restrict__ ng = rg + 2 * H;
      const T* __restrict__ hbr = hnb + r * H;
      const T* __restrict__ hpr = hp + r * H;
      const T* __restrict__ dhr = dh + r * H;
      T* __restrict__ d_r = dp + r * G;
      T* __restrict__ d_z = d_r + H;
      T* __restrict__ d_u = d_r + 2 * H;
      T* __restrict__ h_r = dhid + r * G;
      T* __restrict__ h_z = h_r + H;
      T* __restrict__ h_n = h_r + 2 * H;
      for (int64_t j = 0; j < H; ++j) {
        const T du = dhr[j] * ((T(1) - ng[j] * ng[j]) * sg * (T(1) - zg[j]));
        const T dz = dhr[j] * ((hpr[j] - sg * ng[j]) * (zg[j] - zg[j] * zg[j]));
        const T dr = du * ((rg[j] - rg[j] * rg[j]) * hbr[j]);
        d_u[j] = du;
        d_z[j] = h_z[j] = dz;
        d_r[j] = h_r[j] = dr;
        h_n[j] = du * rg[j];
      }
    }
    const T* da = dhid;
    if (hid.kind != kNone) {
      T* d_a = static_cast<T*>(L.d_a) + t * B * G;
      term_input_grad(dhid, hid, t, B, G, tmp, d_a, bn_work);
      da = d_a;
    }
    for (int64_t r = 0; r < B; ++r) {
      const T* __restrict__ zg = act + r * G + H;
      T* __restrict__ dhr = dh + r * H;
      const T* __restrict__ dyr = t > 0 ? d_y + (t - 1) * B * H + r * H : nullptr;
      for (int64_t j = 0; j < H; ++j) dhr[j] = dyr ? dhr[j] * zg[j] + dyr[j] : dhr[j] * zg[j];
    }
    gemm("N", "N", &mh, &n, &kg, &one, w, &mh, da, &kg, &one, dh, &mh);  // += da W_h
  }
  std::memcpy(L.d_h0, dh, sizeof(T) * B * H);
}

}  // namespace

extern "C" {
NORMRNN_CLONES void gru_forward_f32(const Loop* loop) { gru_forward<float>(*loop); }
NORMRNN_CLONES void gru_forward_f64(const Loop* loop) { gru_forward<double>(*loop); }
NORMRNN_CLONES void gru_backward_f32(const Loop* loop) { gru_backward<float>(*loop); }
NORMRNN_CLONES void gru_backward_f64(const Loop* loop) { gru_backward<double>(*loop); }
NORMRNN_CLONES void lstm_forward_f32(const Loop* loop) { lstm_forward<float>(*loop); }
NORMRNN_CLONES void lstm_forward_f64(const Loop* loop) { lstm_forward<double>(*loop); }
NORMRNN_CLONES void lstm_backward_f32(const Loop* loop) { lstm_backward<float>(*loop); }
NORMRNN_CLONES void lstm_backward_f64(const Loop* loop) { lstm_backward<double>(*loop); }
}
