// Per-token rows of channel groups of 32 (the last one 16 long at d = 80 and 112), each group a
// small header then packed codes: the skeleton that q8_0, q4_0 and kivi2's values share. A
// Codec gives
//   kHead, kBits                  header bytes and bits per code of a group;
//   encode(grp, v, L)             by one thread: v[0 .. L) are the group's channels;
//   decode(grp, L, j)             channel j's value, rounded as the CPU's dequantize rounds it.
// Groups before the last are full, so group g of token t sits at t·kRow + g·kGroupBytes.
// TokenGroups<D, Codec> is a whole device format (the interface of common.cuh); role and
// protect flags play no part.
#pragma once

#include "common.cuh"

namespace kvb {

template <int D, class Codec>
struct TokenGroups {
    static constexpr int kGroups = (D + 31) / 32;
    static constexpr int kGroupBytes = Codec::kHead + 32 * Codec::kBits / 8;
    static constexpr int kRow = Codec::kHead * kGroups + D * Codec::kBits / 8;
    static constexpr int kWarps = kThreads / 32;
    static constexpr int kPrep = 0;
    static_assert(D % 16 == 0, "the last group holds 16 or 32 channels");

    __host__ __device__ static constexpr int len(int g) { return D - 32 * g < 32 ? D - 32 * g : 32; }

    __device__ static const uint8_t *group(const uint8_t *blk, int t, int g) {
        return blk + (int64_t)t * kRow + g * kGroupBytes;
    }

    __host__ __device__ static int64_t bytes(int n, int, int, QuantParams) { return (int64_t)n * kRow; }

    // A thread per (token, group), over kQuantParts CTAs per block: each thread loads its
    // whole group at once and reduces it alone (no chain of shuffles), so a 128-token block
    // is one round trip to memory.
    static constexpr int kQuantParts = kGroups;
    __device__ static void quantize(Src x, int n, int, const uint8_t *, QuantParams, uint8_t *out,
                                    float *, int part) {
        for (int i = part * kThreads + threadIdx.x; i < n * kGroups; i += kQuantParts * kThreads) {
            const int t = i / kGroups, g = i % kGroups;
            float v[32];
            x.run(t, 32 * g, len(g), v);
            Codec::encode(out + (int64_t)t * kRow + g * kGroupBytes, v, len(g));
        }
    }

    __device__ static void dequantize(const uint8_t *blk, int n, int, __half *out, int64_t stride) {
        for (int i = threadIdx.x; i < n * D; i += kThreads) {
            const int t = i / D, c = i % D;
            out[t * stride + c] = __float2half_rn(Codec::decode(group(blk, t, c / 32), len(c / 32), c % 32));
        }
    }

    __device__ static void prepare(const uint8_t *, int, const float *, int, float *) {}

    // A warp per token, channel 32g + lane in slot g: one decode serves every head.
    __device__ static void scores(const uint8_t *blk, int, int t0, int t1, const float *q,
                                  const float *, int G, float *s) {
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        for (int t = t0 + warp; t < t1; t += kWarps) {
            float y[kGroups];
#pragma unroll
            for (int g = 0; g < kGroups; ++g)
                y[g] = lane < len(g) ? Codec::decode(group(blk, t, g), len(g), lane) : 0.f;
            for (int h = 0; h < G; ++h) {
                float dot = 0.f;
#pragma unroll
                for (int g = 0; g < kGroups; ++g)
                    if (lane < len(g)) dot += q[h * D + 32 * g + lane] * y[g];
                dot = warp_sum(dot);
                if (lane == 0) s[h * kChunk + (t - t0)] = dot;
            }
        }
    }

    // Thread per channel, tokens in order, every head in registers. A warp's channels are one
    // group, so its header reads are uniform and its code reads one contiguous run.
    __device__ static void accumulate(const uint8_t *blk, int, int t0, int t1, const float *p,
                                      int G, float *acc, float *) {
        for (int c = threadIdx.x; c < D; c += kThreads) {
            const int g = c / 32, L = len(g), j = c % 32;
            float a[kMaxG] = {};
            for (int t = t0; t < t1; ++t) {
                const float y = Codec::decode(group(blk, t, g), L, j);
                const float *pt = p + (t - t0);
#pragma unroll
                for (int h = 0; h < kMaxG; ++h)
                    if (h < G) a[h] += pt[h * kChunk] * y;
            }
#pragma unroll
            for (int h = 0; h < kMaxG; ++h)
                if (h < G) acc[h * D + c] += a[h];
        }
    }

    __device__ static void finish(const uint8_t *, int, int, float *, float *) {}
};

}  // namespace kvb
