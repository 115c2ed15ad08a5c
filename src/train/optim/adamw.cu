// AdamW on a GPU, in place, three launches per variable instead of a dozen elementwise ops:
// m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  p <- p decay - step m / (sqrt(v) / sqrt(bc2) + eps).
extern "C" __global__ void ema(float *m, const float *g, const int n, const float beta, const int square) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    const float x = square ? g[i] * g[i] : g[i];
    m[i] = beta * m[i] + (1.0f - beta) * x;
  }
}

extern "C" __global__ void adamw_apply(float *p, const float *m, const float *v, const int n, const float decay,
                                       const float step, const float inv_sqrt_bc2, const float eps) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) p[i] = p[i] * decay - m[i] / (sqrtf(v[i]) * inv_sqrt_bc2 + eps) * step;
}
