// Causal softmax of attention scores [H, L, L] (one packed segment), forward and backward, for
// tunekit's GPU path. One block per row; the row's query position is row % L and only keys up to
// it take part. Arithmetic in f32 whatever the storage type, as transformers' eager attention.
#include <cuda_bf16.h>
#include <math.h>

template <typename T> __device__ __forceinline__ float load(const T x);
template <> __device__ __forceinline__ float load<float>(const float x) { return x; }
template <> __device__ __forceinline__ float load<__nv_bfloat16>(const __nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T store(const float x);
template <> __device__ __forceinline__ float store<float>(const float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 store<__nv_bfloat16>(const float x) { return __float2bfloat16(x); }

// Reductions over the block (blockDim.x a multiple of 32, at most 1024).
__device__ float block_max(float v, float *sh) {
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  const int w = threadIdx.x / 32, l = threadIdx.x % 32, nw = blockDim.x / 32;
  __syncthreads();
  if (l == 0) sh[w] = v;
  __syncthreads();
  v = l < nw ? sh[l] : -INFINITY;
  for (int o = 16; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}

__device__ float block_sum(float v, float *sh) {
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
  const int w = threadIdx.x / 32, l = threadIdx.x % 32, nw = blockDim.x / 32;
  __syncthreads();
  if (l == 0) sh[w] = v;
  __syncthreads();
  v = l < nw ? sh[l] : 0.0f;
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

template <typename T>
__device__ void softmax_fwd(const T *s, T *p, const int len, const float scale) {
  __shared__ float sh[32];
  const size_t row = blockIdx.x;
  const int i = row % len;
  const T *x = s + row * len;
  T *y = p + row * len;
  float m = -INFINITY;
  for (int j = threadIdx.x; j <= i; j += blockDim.x) m = fmaxf(m, load(x[j]) * scale);
  m = block_max(m, sh);
  float sum = 0.0f;
  for (int j = threadIdx.x; j <= i; j += blockDim.x) sum += expf(load(x[j]) * scale - m);
  const float inv = 1.0f / block_sum(sum, sh);
  for (int j = threadIdx.x; j < len; j += blockDim.x)
    y[j] = store<T>(j <= i ? expf(load(x[j]) * scale - m) * inv : 0.0f);
}

template <typename T>
__device__ void softmax_bwd(const T *p, const T *dp, T *ds, const int len, const float scale) {
  __shared__ float sh[32];
  const size_t row = blockIdx.x;
  const int i = row % len;
  const T *pr = p + row * len, *gr = dp + row * len;
  T *out = ds + row * len;
  float dot = 0.0f;
  for (int j = threadIdx.x; j <= i; j += blockDim.x) dot += load(pr[j]) * load(gr[j]);
  dot = block_sum(dot, sh);
  for (int j = threadIdx.x; j < len; j += blockDim.x)
    out[j] = store<T>(j <= i ? scale * load(pr[j]) * (load(gr[j]) - dot) : 0.0f);
}

extern "C" __global__ void causal_softmax_fwd_f32(const float *s, float *p, int len, float scale) { softmax_fwd(s, p, len, scale); }
extern "C" __global__ void causal_softmax_fwd_bf16(const __nv_bfloat16 *s, __nv_bfloat16 *p, int len, float scale) { softmax_fwd(s, p, len, scale); }
extern "C" __global__ void causal_softmax_bwd_f32(const float *p, const float *dp, float *ds, int len, float scale) { softmax_bwd(p, dp, ds, len, scale); }
extern "C" __global__ void causal_softmax_bwd_bf16(const __nv_bfloat16 *p, const __nv_bfloat16 *dp, __nv_bfloat16 *ds, int len, float scale) { softmax_bwd(p, dp, ds, len, scale); }
