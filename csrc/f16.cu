// `f16`: plain half precision, token-major (src/kv/formats/f16.rs). The baseline every other
// kernel's speed is compared with.
#pragma once

#include "common.cuh"
#include "mma.cuh"

namespace kvb {

template <int D>
struct FmtF16 {
    static constexpr int kPrep = 0;  // floats of prepared query per head

    __host__ __device__ static int64_t bytes(int n, int, int, QuantParams) { return 2LL * n * D; }

    // Eight channels per thread and step, a 16-byte store (blocks start 16-byte aligned), over
    // kQuantParts CTAs per block: a 128-token block is two steps per thread.
    static constexpr int kQuantParts = 8;
    __device__ static void quantize(Src x, int n, int, const uint8_t *, QuantParams, uint8_t *out,
                                    float *, int part) {
        for (int i = part * kThreads + threadIdx.x; i < n * D / 8; i += kQuantParts * kThreads) {
            float v[8];
            x.run(i / (D / 8), 8 * (i % (D / 8)), 8, v);
            uint32_t h[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) h[j] = half2_bits(v[2 * j], v[2 * j + 1]);
            reinterpret_cast<uint4 *>(out)[i] = make_uint4(h[0], h[1], h[2], h[3]);
        }
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

    // ---- tensor-core decode (decode_mma.cuh) ----------------------------------------
    // Rows are staged in shared memory padded by 16 bytes, so the eight rows an ldmatrix
    // reads fall in distinct banks; tokens past the block are zero-filled (no NaN can reach
    // the tensor cores through a masked token).

    static constexpr bool kScaled = false;      // no per-block scales to stage
    static constexpr int kSmemRow = 2 * D + 16;

    __device__ static void stage_rows(uint8_t *dst, const uint8_t *blk, int c0, int len, int lane) {
        constexpr int kPieces = 2 * D / 16;
        const int padded = (len + 15) & ~15;
        for (int i = lane; i < padded * kPieces; i += 32) {
            const int tok = i / kPieces, p = i % kPieces;
            const uint8_t *src = blk + (int64_t)(c0 + min(tok, len - 1)) * 2 * D + 16 * p;
            cp_async16(dst + tok * kSmemRow + 16 * p, src, tok < len ? 16 : 0);
        }
    }

    // The query in B-fragment slot order, natural channels: slot k of step s is 16s + k.
    __device__ static void mma_query(const float *qh, const uint8_t *, int t,
                                     float (&qv)[D / 16][4], float &base) {
#pragma unroll
        for (int s = 0; s < D / 16; ++s) {
            const int c = 16 * s + 2 * t;
            qv[s][0] = qh[c], qv[s][1] = qh[c + 1], qv[s][2] = qh[c + 8], qv[s][3] = qh[c + 9];
        }
        base = 0.f;
    }

    // A fragments of a 16-token tile: keys (tokens x channels) and values transposed
    // (channels x tokens), straight from the staged rows.
    struct KeyTile {
        const uint8_t *rows;
        __device__ KeyTile(const uint8_t *tile, int lane) {
            const int j = lane >> 3, r = lane & 7;
            rows = tile + (r + 8 * (j & 1)) * kSmemRow + 16 * (j >> 1);
        }
        __device__ void frag(int s, uint32_t (&a)[4]) const { ldmatrix_x4(a, rows + 32 * s); }
    };
    struct ValueTile {
        const uint8_t *rows;
        __device__ ValueTile(const uint8_t *tile, int lane) {
            const int j = lane >> 3, r = lane & 7;
            rows = tile + (r + 8 * (j >> 1)) * kSmemRow + 16 * (j & 1);
        }
        __device__ void frag(int m, uint32_t (&a)[4]) const { ldmatrix_x4_trans(a, rows + 32 * m); }
    };
};

}  // namespace kvb
