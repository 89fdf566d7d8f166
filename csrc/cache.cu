// The device-resident cache's own kernels (src/cuda/cache.rs): appending rows to its f16
// residual, and the key norms AKVQ-VL's pivot rule ranks. Quantize, dequantize and attention
// are the shared kernels of kernels.cu.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kvbits_cuda.h"

namespace {

constexpr int kThreads = 256;
constexpr float kF16Max = 65504.0f;

__device__ __forceinline__ float load(const float *x, int64_t i) { return x[i]; }
__device__ __forceinline__ float load(const __half *x, int64_t i) { return __half2float(x[i]); }

// Element i of x[t][g][c] goes to dst[g * head_stride + t * d + c]; any value an f16 residual
// cannot hold (NaN, infinite, beyond ±65504) sets *bad.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    scatter_rows_kernel(const T *x, int64_t n_values, int h, int d, __half *dst,
                        int64_t head_stride, unsigned *bad) {
    bool seen_bad = false;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n_values;
         i += (int64_t)gridDim.x * blockDim.x) {
        const float v = load(x, i);
        seen_bad |= !(fabsf(v) <= kF16Max);
        const int64_t row = i / d;
        const int c = (int)(i - row * d);
        const int64_t t = row / h;
        const int g = (int)(row - t * h);
        dst[g * head_stride + t * d + c] = __float2half_rn(v);
    }
    if (__syncthreads_or(seen_bad) && threadIdx.x == 0) atomicOr(bad, 1u);
}

// out[g * n + t] = |row t of head g| with the CPU's summation order (channel by channel, no
// fused multiply-add), so that both caches find the same pivots.
__global__ void __launch_bounds__(kThreads)
    key_norms_kernel(const __half *x, int64_t head_stride, int n, int h, int d, float *out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * h) return;
    const int g = i / n, t = i - g * n;
    const __half *row = x + g * head_stride + (int64_t)t * d;
    float sum = 0.0f;
    for (int c = 0; c < d; ++c) {
        const float v = __half2float(row[c]);
        sum = __fadd_rn(sum, __fmul_rn(v, v));
    }
    out[i] = sqrtf(sum);
}

int launched() { return cudaGetLastError(); }

}  // namespace

extern "C" int kvb_cuda_scatter_rows(const void *x, int32_t x_is_f16, int32_t n, int32_t n_head_kv,
                                     int32_t head_dim, void *dst, int64_t head_stride,
                                     uint32_t *bad, kvb_cuda_stream stream) {
    if (!x || !dst || !bad || n <= 0 || n_head_kv <= 0 || head_dim <= 0 ||
        head_stride < (int64_t)n * head_dim)
        return KVB_CUDA_INVALID_ARGUMENT;
    const int64_t values = (int64_t)n * n_head_kv * head_dim;
    const int64_t blocks = (values + kThreads - 1) / kThreads;
    const int grid = (int)(blocks < 4096 ? blocks : 4096);
    auto s = static_cast<cudaStream_t>(stream);
    auto out = static_cast<__half *>(dst);
    if (x_is_f16)
        scatter_rows_kernel<<<grid, kThreads, 0, s>>>(static_cast<const __half *>(x), values,
                                                      n_head_kv, head_dim, out, head_stride, bad);
    else
        scatter_rows_kernel<<<grid, kThreads, 0, s>>>(static_cast<const float *>(x), values,
                                                      n_head_kv, head_dim, out, head_stride, bad);
    return launched();
}

extern "C" int kvb_cuda_key_norms(const void *x, int64_t head_stride, int32_t n, int32_t n_head_kv,
                                  int32_t head_dim, float *out, kvb_cuda_stream stream) {
    if (!x || !out || n <= 0 || n_head_kv <= 0 || head_dim <= 0 ||
        head_stride < (int64_t)n * head_dim)
        return KVB_CUDA_INVALID_ARGUMENT;
    const int rows = n * n_head_kv;
    key_norms_kernel<<<(rows + kThreads - 1) / kThreads, kThreads, 0,
                       static_cast<cudaStream_t>(stream)>>>(static_cast<const __half *>(x),
                                                            head_stride, n, n_head_kv, head_dim,
                                                            out);
    return launched();
}
