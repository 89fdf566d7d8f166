// Shared device code: format ids, block jobs, f16 access, bit unpacking, CTA reductions.
//
// Every format is a struct `Fmt<D>` in its own file (csrc/<name>.cu mirrors
// src/kv/formats/<name>.rs) with the same static device functions, called by one CTA of
// kThreads threads for one block:
//   quantize(Src x, int n, Role role, const uint8_t* protect, QuantParams p, uint8_t* out, Smem)
//   dequantize(const uint8_t* blk, int n, Role role, __half* out, int64_t out_stride)
//   bytes(int n, Role role, int n_protected, QuantParams p)      (host and device)
// and, for attention, per block against G query heads held in shared memory:
//   scores(const uint8_t* blk, int n, const float* q /*[G][D]*/, int G, float* s /*[G][kMaxN]*/)
//   accumulate(const uint8_t* blk, int n, const float* p /*[G][kMaxN]*/, int G, float* acc /*[G][D]*/)
// Byte layouts are those of docs/FORMATS.md: a block written here decodes on the CPU and back.
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

#include "kvbits_cuda.h"

namespace kvb {

enum Format : int {
    F16 = 0,
    Q8_0 = 1,
    Q4_0 = 2,
    KIVI2 = 3,
    Q1_CALIB = 4,
    K1_5_MIX = 5,
    V1_58_TERN = 6,
    Q2_HAD = 7,
    Q4_HAD = 8,
};

enum Role : int { KEY = 0, VALUE = 1 };

constexpr int kThreads = 128;  // threads of every block-level CTA
constexpr int kMaxN = 4096;    // tokens per block at most (BlockTokens up to 4096)
constexpr int kChunk = 128;    // tokens scored and accumulated per step of attention
constexpr int kMaxG = 16;      // query heads per KV head (GQA group) at most

using QuantParams = kvb_cuda_quant_params;

// Rows of one KV head: channel c of token t at data[t * stride + c], f32 or f16.
struct Src {
    const void *data;
    int64_t stride;
    int is_f16;
    __device__ __forceinline__ float at(int t, int c) const {
        int64_t i = (int64_t)t * stride + c;
        return is_f16 ? __half2float(static_cast<const __half *>(data)[i])
                      : static_cast<const float *>(data)[i];
    }

    // Channels c0 .. c0 + L of token t into v[0 .. L), zero after (L a multiple of 8): 16-byte
    // loads where the row is aligned for them, so that a thread's whole run is in flight at once.
    template <int N>
    __device__ __forceinline__ void run(int t, int c0, int L, float (&v)[N]) const {
        static_assert(N % 8 == 0, "runs of whole 16-byte pieces");
        const int64_t i = (int64_t)t * stride + c0;
        const char *p = static_cast<const char *>(data) + (is_f16 ? 2 : 4) * i;
        const bool vec = (reinterpret_cast<uintptr_t>(p) & 15) == 0;
#pragma unroll
        for (int k = 0; k < N; k += 8) {
            if (k >= L) {
#pragma unroll
                for (int j = 0; j < 8; ++j) v[k + j] = 0.f;
            } else if (vec && is_f16) {
                const uint4 u = *reinterpret_cast<const uint4 *>(p + 2 * k);
                const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float2 f = __half22float2(*reinterpret_cast<const __half2 *>(&w[j]));
                    v[k + 2 * j] = f.x, v[k + 2 * j + 1] = f.y;
                }
            } else if (vec) {
                const float4 a = reinterpret_cast<const float4 *>(p + 4 * k)[0];
                const float4 b = reinterpret_cast<const float4 *>(p + 4 * k)[1];
                v[k] = a.x, v[k + 1] = a.y, v[k + 2] = a.z, v[k + 3] = a.w;
                v[k + 4] = b.x, v[k + 5] = b.y, v[k + 6] = b.z, v[k + 7] = b.w;
            } else {
#pragma unroll
                for (int j = 0; j < 8; ++j) v[k + j] = at(t, c0 + k + j);
            }
        }
    }
};

__device__ __forceinline__ float ld_f16(const uint8_t *p, int i) {
    return __half2float(reinterpret_cast<const __half *>(p)[i]);
}

// Unaligned little-endian f16 at byte offset `off` (blocks pack fields without padding).
__device__ __forceinline__ float ld_f16_at(const uint8_t *p, int64_t off) {
    unsigned short bits = (unsigned short)p[off] | ((unsigned short)p[off + 1] << 8);
    return __half2float(__ushort_as_half(bits));
}

// The bits pass through an empty asm: CUDA 13.0's ptxas (sm_80..sm_90) otherwise turns the
// low-byte store of a converted half into a float-to-int conversion (F2I.U8.F16), so the low
// byte came out 0, 1, 6... Widening alone compiles to the same.
__device__ __forceinline__ void st_f16_at(uint8_t *p, int64_t off, float v) {
    uint32_t bits = __half_as_ushort(__float2half_rn(v));
    asm("" : "+r"(bits));
    p[off] = (uint8_t)(bits & 0xffu);
    p[off + 1] = (uint8_t)(bits >> 8);
}

// f32 -> f16 -> f32, the precision of every stored scale (round to nearest even, as `half`).
__device__ __forceinline__ float round_f16(float v) { return __half2float(__float2half_rn(v)); }

// Code j of a little-end-first bit string of `bits`-bit codes.
__device__ __forceinline__ unsigned code_at(const uint8_t *p, int64_t j, int bits) {
    int64_t bit = j * bits;
    return (p[bit >> 3] >> (bit & 7)) & ((1u << bits) - 1);
}

// N 32-bit words from p: 4-byte aligned, or with kAlign16 16-byte aligned (one load per four).
template <bool kAlign16, int N>
__device__ __forceinline__ void load_words(const uint8_t *p, uint32_t (&w)[N]) {
    if constexpr (kAlign16 && N % 4 == 0) {
#pragma unroll
        for (int i = 0; i < N / 4; ++i) {
            const uint4 v = reinterpret_cast<const uint4 *>(p)[i];
            w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) w[i] = reinterpret_cast<const uint32_t *>(p)[i];
    }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_min(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the CTA; every thread gets the result. `red` holds kThreads / 32 floats.
__device__ __forceinline__ float cta_sum(float v, float *red) {
    v = warp_sum(v);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = 0.f;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) t += red[w];
    return t;
}

// Asymmetric min-max with f16-stored offset and step (src/kv/formats/minmax.rs):
// code = round(clamp((x - lo) / step, 0, levels)) against the rounded values, 0 when step = 0.
// The quotient is the IEEE one without a division per value: q = (x − lo)·inv with inv =
// RN(1/step) is within 1.5 ulps, one FMA correction brings it within one, and a second gives
// the correctly rounded quotient (Markstein: for q within an ulp, the remainder
// fma(−step, q, x − lo) is exact and fma(remainder, inv, q) = RN((x − lo)/step)). Codes turn
// only on quotients near 0.5, 1.5, …, where every term is a normal f32, so they equal the CPU's.
struct MinMax {
    float lo, step, inv;
    __device__ static MinMax make(float lo, float hi, int levels) {
        const float step = round_f16((hi - lo) / (float)levels);
        return {round_f16(lo), step, step > 0.f ? 1.f / step : 0.f};
    }
    // make over the range of v[0 .. L) as the CPU's fold finds it: the first of equal values,
    // so that a zero's sign matches.
    template <int N>
    __device__ static MinMax over(const float (&v)[N], int L, int levels) {
        float lo = INFINITY, hi = -INFINITY;
#pragma unroll
        for (int j = 0; j < N; ++j)
            if (j < L) lo = v[j] < lo ? v[j] : lo, hi = v[j] > hi ? v[j] : hi;
        return make(lo, hi, levels);
    }
    // Without a branch: where step is 0 or NaN, inv = 0 turns every quotient into 0 or NaN,
    // both clamped to code 0.
    __device__ unsigned code(float x, int levels) const {
        const float a = __fsub_rn(x, lo), q0 = __fmul_rn(a, inv);
        const float q1 = __fmaf_rn(__fmaf_rn(-step, q0, a), inv, q0);
        const float q = __fmaf_rn(__fmaf_rn(-step, q1, a), inv, q1);
        return (unsigned)roundf(fminf(fmaxf(q, 0.f), (float)levels));
    }
    __device__ float value(unsigned q) const { return (float)q * step + lo; }
};

}  // namespace kvb
