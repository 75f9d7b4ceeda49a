// Batch-norm steps with per-step statistics over the batch, forward and backward, as plain
// loops: each op of the torch form is a pass over the step and a dispatch of a few µs, and
// at the sizes of a recurrent step (64 x 400) those, not the arithmetic, set the speed.
// Compiled and loaded by normrnn/compute/native.py (ctypes); the math is BatchNormTerm's and its
// subclasses' (norms/batch.py), held to it and to autograd by tests/unit/test_native.py.
//
// A call covers `steps` consecutive steps, each a row-major (batch, features) block; a
// feature's statistics are taken over its column. Scale estimators (kind):
//   0  L2:  stat = mean(xc^2),               den = sqrt(stat + eps)
//   1  L1:  stat = c mean|xc|,               den = stat + eps   (c = sqrt(pi/2))
//   2  Linf: stat = c max|xc|,               den = stat + eps   (c = C(batch))
// with xc = x - mean(x) and x̂ = xc / den.
#include "batchnorm.h"

extern "C" {
NORMRNN_CLONES void bn_forward_f32(const float* a, float* xhat, float* mean, float* stat,
                                   float* den, int64_t steps, int64_t batch, int64_t features,
                                   int kind, double eps, double c) {
  forward_any(a, xhat, mean, stat, den, steps, batch, features, kind, eps, c);
}
NORMRNN_CLONES void bn_forward_f64(const double* a, double* xhat, double* mean, double* stat,
                                   double* den, int64_t steps, int64_t batch, int64_t features,
                                   int kind, double eps, double c) {
  forward_any(a, xhat, mean, stat, den, steps, batch, features, kind, eps, c);
}
NORMRNN_CLONES void bn_backward_f32(const float* g, const float* xhat, const float* den, float* dx,
                                    int64_t steps, int64_t batch, int64_t features, int kind,
                                    double c, float* work) {
  backward_any(g, xhat, den, dx, steps, batch, features, kind, c, work);
}
NORMRNN_CLONES void bn_backward_f64(const double* g, const double* xhat, const double* den,
                                    double* dx, int64_t steps, int64_t batch, int64_t features,
                                    int kind, double c, double* work) {
  backward_any(g, xhat, den, dx, steps, batch, features, kind, c, work);
}
}
