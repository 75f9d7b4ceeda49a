// The batch norms' steps with per-step statistics over the batch (see batchnorm_step.cpp for
// the estimators), forward and backward, as templates: batchnorm_step.cpp exports them one
// step or stack of steps per call, lstm_loop.cpp calls them inside its recurrence.
#pragma once
#include <cmath>
#include <cstdint>

// On x86-64 (ELF) each entry point is compiled twice, for AVX2 and for the baseline, and the
// loader picks the one the CPU runs: one file for every node of a cluster.
#if defined(__x86_64__) && defined(__ELF__) && defined(__GNUC__)
#define NORMRNN_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define NORMRNN_CLONES
#endif
#define NORMRNN_INLINE inline __attribute__((always_inline))

namespace {

enum Kind { kL2 = 0, kL1 = 1, kLinf = 2 };

template <typename T>
inline T sign_of(T v) {
  return static_cast<T>(v > T(0)) - static_cast<T>(v < T(0));
}

template <typename T, int kind>
NORMRNN_INLINE void forward(const T* __restrict__ a, T* __restrict__ xhat, T* __restrict__ mean,
                            T* __restrict__ stat, T* __restrict__ den, int64_t steps, int64_t batch,
                            int64_t features, T eps, T c) {
  const T n = static_cast<T>(batch);
  for (int64_t s = 0; s < steps; ++s) {
    const T* __restrict__ x = a + s * batch * features;
    T* __restrict__ y = xhat + s * batch * features;
    T* __restrict__ m = mean + s * features;
    T* __restrict__ st = stat + s * features;
    T* __restrict__ d = den + s * features;
    for (int64_t f = 0; f < features; ++f) m[f] = st[f] = T(0);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t f = 0; f < features; ++f) m[f] += x[b * features + f];
    }
    for (int64_t f = 0; f < features; ++f) m[f] /= n;
    // The mean corrected by the mean of x - mean (two-pass): exact for a column constant
    // over the batch, where a mean off by an ulp would give x̂ = ±ulp / eps, not 0.
    for (int64_t f = 0; f < features; ++f) d[f] = T(0);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t f = 0; f < features; ++f) d[f] += x[b * features + f] - m[f];
    }
    for (int64_t f = 0; f < features; ++f) m[f] += d[f] / n;
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t f = 0; f < features; ++f) {
        const T v = x[b * features + f] - m[f];
        y[b * features + f] = v;
        if constexpr (kind == kL2) {
          st[f] += v * v;
        } else if constexpr (kind == kL1) {
          st[f] += std::abs(v);
        } else {
          const T size = std::abs(v);
          st[f] = st[f] < size ? size : st[f];
        }
      }
    }
    for (int64_t f = 0; f < features; ++f) {
      if constexpr (kind == kL2) {
        st[f] /= n;
        d[f] = std::sqrt(st[f] + eps);
      } else {
        st[f] = (kind == kL1 ? st[f] / n : st[f]) * c;
        d[f] = st[f] + eps;
      }
    }
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t f = 0; f < features; ++f) y[b * features + f] /= d[f];
    }
  }
}

// dL/dx from g = dL/dx̂, per column (sums over the batch, ḡ = mean g):
//   L2:   dx = (g - ḡ - x̂ mean(g x̂)) / den
//   L1:   dx = (g - ḡ) / den - k (sign x̂ - mean sign x̂),   k = Σ g x̂ / den · c / batch
//   Linf: dx = (g - ḡ) / den - k (v - mean v),             k = Σ g x̂ / den · c / #ties
//         v = sign x̂ on the rows where |x̂| is the column's maximum (ties share it), else 0
// `work` holds 5 · features values.
template <typename T, int kind>
NORMRNN_INLINE void backward(const T* __restrict__ g, const T* __restrict__ xhat,
                             const T* __restrict__ den, T* __restrict__ dx, int64_t steps,
                             int64_t batch, int64_t features, T c, T* __restrict__ work) {
  const T n = static_cast<T>(batch);
  T* __restrict__ sg = work;                   // Σ g, then ḡ
  T* __restrict__ sgx = work + features;       // Σ g x̂, then k (L1, Linf)
  T* __restrict__ top = work + 2 * features;   // Linf: the column's max |x̂|
  T* __restrict__ sv = work + 3 * features;    // Σ sign x̂ (L1) or Σ v (Linf), then the mean
  T* __restrict__ ties = work + 4 * features;  // Linf: the rows at the maximum
  for (int64_t s = 0; s < steps; ++s) {
    const T* __restrict__ gs = g + s * batch * features;
    const T* __restrict__ xs = xhat + s * batch * features;
    const T* __restrict__ d = den + s * features;
    T* __restrict__ out = dx + s * batch * features;
    for (int64_t f = 0; f < 5 * features; ++f) work[f] = T(0);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t f = 0; f < features; ++f) {
        const T gv = gs[b * features + f], xv = xs[b * features + f];
        sg[f] += gv;
        sgx[f] += gv * xv;
        if constexpr (kind == kL1) {
          sv[f] += sign_of(xv);
        } else if constexpr (kind == kLinf) {
          const T size = std::abs(xv);
          top[f] = top[f] < size ? size : top[f];
        }
      }
    }
    if constexpr (kind == kLinf) {
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t f = 0; f < features; ++f) {
          const T xv = xs[b * features + f];
          const T hit = static_cast<T>(std::abs(xv) == top[f]);
          const T v = hit * sign_of(xv);
          ties[f] += hit;
          sv[f] += v;
          out[b * features + f] = v;  // v, until the last pass
        }
      }
    }
    for (int64_t f = 0; f < features; ++f) {
      sg[f] /= n;
      if constexpr (kind == kL2) {
        sgx[f] /= n;
      } else {
        const T count = kind == kL1 ? n : (ties[f] < T(1) ? T(1) : ties[f]);
        sgx[f] = sgx[f] / d[f] * c / count;
        sv[f] /= n;
      }
    }
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t f = 0; f < features; ++f) {
        const T gv = gs[b * features + f], xv = xs[b * features + f];
        if constexpr (kind == kL2) {
          out[b * features + f] = (gv - sg[f] - xv * sgx[f]) / d[f];
        } else {
          const T v = kind == kLinf ? out[b * features + f] : sign_of(xv);
          out[b * features + f] = (gv - sg[f]) / d[f] - sgx[f] * (v - sv[f]);
        }
      }
    }
  }
}

template <typename T>
NORMRNN_INLINE void forward_any(const T* a, T* xhat, T* mean, T* stat, T* den, int64_t steps,
                                int64_t batch, int64_t features, int kind, double eps, double c) {
  const T e = static_cast<T>(eps), k = static_cast<T>(c);
  if (kind == kL2) forward<T, kL2>(a, xhat, mean, stat, den, steps, batch, features, e, k);
  if (kind == kL1) forward<T, kL1>(a, xhat, mean, stat, den, steps, batch, features, e, k);
  if (kind == kLinf) forward<T, kLinf>(a, xhat, mean, stat, den, steps, batch, features, e, k);
}

template <typename T>
NORMRNN_INLINE void backward_any(const T* g, const T* xhat, const T* den, T* dx, int64_t steps,
                                 int64_t batch, int64_t features, int kind, double c, T* work) {
  const T k = static_cast<T>(c);
  if (kind == kL2) backward<T, kL2>(g, xhat, den, dx, steps, batch, features, k, work);
  if (kind == kL1) backward<T, kL1>(g, xhat, den, dx, steps, batch, features, k, work);
  if (kind == kLinf) backward<T, kLinf>(g, xhat, den, dx, steps, batch, features, k, work);
}

}  // namespace
