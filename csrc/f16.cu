// `f16`: plain half precision, token-major (src/kv/formats/f16.rs). The baseline every other
// kernel's speed is compared with.
#pragma once

#include "common.cuh"

namespace kvb {

template <int D>
struct FmtF16 {
    static constexpr int kPrep = 0;  // floats of prepared query per head

    __host__ __device__ static int64_t bytes(int n, int, int, QuantParams) { return 2LL * n * D; }

    __device__ static void quantize(Src x, int n, int, const uint8_t *, QuantParams, uint8_t *out,
                                    float *) {
        __half *o = reinterpret_cast<__half *>(out);
        for (int i = threadIdx.x; i < n * D; i += kThreads) o[i] = __float2half_rn(x.at(i / D, i % D));
    }

    __device__ static void dequantize(const uint8_t *blk, int n, int, __half *out, int64_t stride) {
        const __half *k = reinterpret_cast<const __half *>(blk);
        for (int i = threadIdx.x; i < n * D; i += kThreads) out[(i / D) * stride + i % D] = k[i];
    }

    __device__ static void prepare(const uint8_t *, int, const float *, int, float *) {}

    // One warp per token, lanes across channels.
    __device__ static void scores(const uint8_t *blk, int, int t0, int t1, const float *q,
                                  const float *, int G, float *s) {
        const __half *k = reinterpret_cast<const __half *>(blk);
        int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        for (int t = t0 + warp; t < t1; t += kThreads / 32) {
            float kv[(D + 31) / 32];
#pragma unroll
            for (int j = 0; j < (D + 31) / 32; ++j) {
                int c = lane + 32 * j;
                kv[j] = c < D ? __half2float(k[(int64_t)t * D + c]) : 0.f;
            }
            for (int g = 0; g < G; ++g) {
                float dot = 0.f;
#pragma unroll
                for (int j = 0; j < (D + 31) / 32; ++j) {
                    int c = lane + 32 * j;
                    if (c < D) dot += q[g * D + c] * kv[j];
                }
                dot = warp_sum(dot);
                if (lane == 0) s[g * kChunk + (t - t0)] = dot;
            }
        }
    }

    // One thread per channel, tokens in order.
    __device__ static void accumulate(const uint8_t *blk, int, int t0, int t1, const float *p,
                                      int G, float *acc, float *) {
        const __half *v = reinterpret_cast<const __half *>(blk);
        for (int c = threadIdx.x; c < D; c += kThreads) {
            for (int g = 0; g < G; ++g) {
                float a = 0.f;
                for (int t = t0; t < t1; ++t) a += p[g * kChunk + (t - t0)] * __half2float(v[(int64_t)t * D + c]);
                acc[g * D + c] += a;
            }
        }
    }

    __device__ static void finish(const uint8_t *, int, int, float *, float *) {}
};

}  // namespace kvb
