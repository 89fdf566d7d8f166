// `q1_calib` (CalibQuant; src/kv/formats/q1_calib.rs): per channel over the block,
// lo = α·min, hi = α·max as f16, then 1 bit per value token-major (D/8 bytes per token).
// Scores by post-scaling: q·x̂_t = Σ q·lo + Σ (q·(hi-lo))·bit, never dequantizing.
#pragma once

#include "common.cuh"

namespace kvb {

template <int D>
struct FmtQ1Calib {
    static constexpr int kPrep = D + 1;  // q·(hi - lo) per channel, then Σ q·lo
    static constexpr int kRow = D / 8;   // bytes of bits per token
    static constexpr int kBits = 4 * D;  // offset of the bits: after lo[D] and hi[D]

    __host__ __device__ static int64_t bytes(int n, int, int, QuantParams) {
        return 4LL * D + (int64_t)n * kRow;
    }

    // Thread per channel for the ranges, then thread per (token, byte) for the bits.
    __device__ static void quantize(Src x, int n, int role, const uint8_t *, QuantParams p,
                                    uint8_t *out, float *smem) {
        float alpha = role == KEY ? p.calib_alpha_k : p.calib_alpha_v;
        float *lo = smem, *hi = smem + D;
        for (int c = threadIdx.x; c < D; c += kThreads) {
            float mn = INFINITY, mx = -INFINITY;
            for (int t = 0; t < n; ++t) {
                float v = x.at(t, c);
                mn = fminf(mn, v);
                mx = fmaxf(mx, v);
            }
            lo[c] = round_f16(alpha * mn);
            hi[c] = round_f16(alpha * mx);
            st_f16_at(out, 2 * c, lo[c]);
            st_f16_at(out, 2 * (D + c), hi[c]);
        }
        __syncthreads();
        for (int i = threadIdx.x; i < n * kRow; i += kThreads) {
            int t = i / kRow, c0 = (i % kRow) * 8;
            unsigned byte = 0;
#pragma unroll
            for (int b = 0; b < 8; ++b) {
                int c = c0 + b;
                byte |= (x.at(t, c) > (lo[c] + hi[c]) * 0.5f ? 1u : 0u) << b;
            }
            out[kBits + i] = (uint8_t)byte;
        }
    }

    __device__ static void dequantize(const uint8_t *blk, int n, int, __half *out, int64_t stride) {
        for (int i = threadIdx.x; i < n * D; i += kThreads) {
            int t = i / D, c = i % D;
            float lo = ld_f16_at(blk, 2 * c), hi = ld_f16_at(blk, 2 * (D + c));
            unsigned bit = (blk[kBits + t * kRow + c / 8] >> (c % 8)) & 1u;
            out[t * stride + c] = __float2half_rn(bit ? hi : lo);
        }
    }

    __device__ static void prepare(const uint8_t *blk, int, const float *q, int G, float *qt) {
        for (int i = threadIdx.x; i < G * D; i += kThreads) {
            int g = i / D, c = i % D;
            float lo = ld_f16_at(blk, 2 * c), hi = ld_f16_at(blk, 2 * (D + c));
            qt[g * kPrep + c] = q[g * D + c] * (hi - lo);
        }
        int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        for (int g = warp; g < G; g += kThreads / 32) {
            float base = 0.f;
            for (int c = lane; c < D; c += 32) base += q[g * D + c] * ld_f16_at(blk, 2 * c);
            base = warp_sum(base);
            if (lane == 0) qt[g * kPrep + D] = base;
        }
    }

    // Thread per token: its D bits against every head's folded query.
    __device__ static void scores(const uint8_t *blk, int, int t0, int t1, const float *,
                                  const float *qt, int G, float *s) {
        for (int t = t0 + threadIdx.x; t < t1; t += kThreads) {
            uint8_t bits[kRow];
#pragma unroll
            for (int j = 0; j < kRow; ++j) bits[j] = blk[kBits + t * kRow + j];
            for (int g = 0; g < G; ++g) {
                const float *w = qt + g * kPrep;
                float dot = w[D];
#pragma unroll
                for (int j = 0; j < kRow; ++j) {
#pragma unroll
                    for (int b = 0; b < 8; ++b) dot += ((bits[j] >> b) & 1) ? w[8 * j + b] : 0.f;
                }
                s[g * kChunk + (t - t0)] = dot;
            }
        }
    }

    // Thread per channel: lo·Σp + (hi - lo)·Σ p·bit.
    __device__ static void accumulate(const uint8_t *blk, int, int t0, int t1, const float *p,
                                      int G, float *acc, float *) {
        for (int c = threadIdx.x; c < D; c += kThreads) {
            float lo = ld_f16_at(blk, 2 * c), hi = ld_f16_at(blk, 2 * (D + c));
            for (int g = 0; g < G; ++g) {
                const float *pg = p + g * kChunk;
                float sum = 0.f, on = 0.f;
                for (int t = t0; t < t1; ++t) {
                    float pt = pg[t - t0];
                    sum += pt;
                    on += ((blk[kBits + t * kRow + c / 8] >> (c % 8)) & 1u) ? pt : 0.f;
                }
                acc[g * D + c] += lo * sum + (hi - lo) * on;
            }
        }
    }

    __device__ static void finish(const uint8_t *, int, int, float *, float *) {}
};

}  // namespace kvb
