// `q1_calib` (CalibQuant; src/kv/formats/q1_calib.rs): per channel over the block,
// lo = α·min, hi = α·max as f16, then 1 bit per value token-major (D/8 bytes per token).
// Scores by post-scaling: q·x̂_t = Σ q·lo + Σ (q·(hi-lo))·bit, never dequantizing.
#pragma once

#include <type_traits>

#include "common.cuh"
#include "mma.cuh"

namespace kvb {

template <int D>
struct FmtQ1Calib {
    static constexpr int kPrep = D + 1;  // q·(hi - lo) per channel, then Σ q·lo
    static constexpr int kRow = D / 8;   // bytes of bits per token
    static constexpr int kBits = 4 * D;  // offset of the bits: after lo[D] and hi[D]

    __host__ __device__ static int64_t bytes(int n, int, int, QuantParams) {
        return 4LL * D + (int64_t)n * kRow;
    }

    // Eight channels of token t as loaded (one 16-byte load from f16 rows, two from f32 rows),
    // kept packed while held, and as f32.
    template <bool kF16>
    struct Raw8 {
        uint4 w[kF16 ? 1 : 2];
        Raw8() = default;
        __device__ Raw8(Src x, int t, int c0) {
            const int64_t i = (int64_t)t * x.stride + c0;
            const char *p = static_cast<const char *>(x.data) + (kF16 ? 2 : 4) * i;
#pragma unroll
            for (int k = 0; k < (kF16 ? 1 : 2); ++k) w[k] = reinterpret_cast<const uint4 *>(p)[k];
        }
        __device__ void unpack(float (&v)[8]) const {
            const uint32_t *u = reinterpret_cast<const uint32_t *>(w);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                if constexpr (kF16) {
                    const float2 f = __half22float2(*reinterpret_cast<const __half2 *>(&u[k]));
                    v[2 * k] = f.x, v[2 * k + 1] = f.y;
                } else {
                    v[2 * k] = __uint_as_float(u[2 * k]), v[2 * k + 1] = __uint_as_float(u[2 * k + 1]);
                }
            }
        }
    };

    // A lane's running range of its 8 channels: as f16 pairs from f16 rows (min and max of f16
    // values are exact in f16, at half the instructions and shuffles), as f32 otherwise.
    template <bool kF16>
    struct Range {
        using T = std::conditional_t<kF16, __half2, float>;
        static constexpr int kN = kF16 ? 4 : 8;
        T lo[kN], hi[kN];
        __device__ Range() {
#pragma unroll
            for (int k = 0; k < kN; ++k) {
                if constexpr (kF16) lo[k] = __float2half2_rn(INFINITY), hi[k] = __float2half2_rn(-INFINITY);
                else lo[k] = INFINITY, hi[k] = -INFINITY;
            }
        }
        __device__ void see(const Raw8<kF16> &r) {
            const T *v = reinterpret_cast<const T *>(r.w);
#pragma unroll
            for (int k = 0; k < kN; ++k) {
                if constexpr (kF16) lo[k] = __hmin2(lo[k], v[k]), hi[k] = __hmax2(hi[k], v[k]);
                else lo[k] = fminf(lo[k], v[k]), hi[k] = fmaxf(hi[k], v[k]);
            }
        }
        // Over the lanes that differ in bits 1..4 (those of one channel half).
        __device__ void reduce() {
#pragma unroll
            for (int m = 2; m < 32; m *= 2) {
#pragma unroll
                for (int k = 0; k < kN; ++k) {
                    const T l = __shfl_xor_sync(0xffffffffu, lo[k], m), h = __shfl_xor_sync(0xffffffffu, hi[k], m);
                    if constexpr (kF16) lo[k] = __hmin2(lo[k], l), hi[k] = __hmax2(hi[k], h);
                    else lo[k] = fminf(lo[k], l), hi[k] = fmaxf(hi[k], h);
                }
            }
        }
        __device__ float low(int k) const {
            if constexpr (kF16) return k & 1 ? __high2float(lo[k / 2]) : __low2float(lo[k / 2]);
            else return lo[k];
        }
        __device__ float high(int k) const {
            if constexpr (kF16) return k & 1 ? __high2float(hi[k / 2]) : __low2float(hi[k / 2]);
            else return hi[k];
        }
    };

    // A warp per 16 channels of the block (four to a CTA): lanes pair up on a token, 8
    // channels each by 16-byte loads, and hold their first kHeld tokens (all of a 128-token
    // block from f16 rows) between the range and the bits; tokens past them are read again.
    // Ranges meet by warp shuffles alone, so no CTA barrier, and every load of a 4096-token
    // span is in flight in one wave.
    static constexpr int kQuantParts = (D / 16 + kThreads / 32 - 1) / (kThreads / 32);
    static constexpr int kQuantSmem = 4 * 2 * D;  // the scalar path's lo and hi
    // 108 registers (the held tokens, unpacked again for the bits), no spills: 16 warps per
    // multiprocessor still keep 64 KB of loads in flight on each.
    static constexpr int kQuantMinCtas = 4;

    template <bool kF16>
    __device__ static void quantize_part(Src x, int n, float alpha, uint8_t *out, int part) {
        constexpr int kTokens = 16;  // tokens side by side in a warp
        constexpr int kHeld = kF16 ? 8 : 4;
        const int lane = threadIdx.x & 31, j = lane & 1, tg = lane >> 1, c0 = 16 * part + 8 * j;
        Range<kF16> range;
        Raw8<kF16> held[kHeld];
#pragma unroll
        for (int u = 0; u < kHeld; ++u) held[u] = Raw8<kF16>(x, min(tg + u * kTokens, n - 1), c0);
#pragma unroll
        for (int u = 0; u < kHeld; ++u) range.see(held[u]);
        for (int t = tg + kHeld * kTokens; t < n; t += kTokens) range.see(Raw8<kF16>(x, t, c0));
        range.reduce();
        float lo[8], hi[8], mid[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            lo[k] = round_f16(alpha * range.low(k));
            hi[k] = round_f16(alpha * range.high(k));
            mid[k] = (lo[k] + hi[k]) * 0.5f;
        }
        // Blocks start 16-byte aligned: each lane of token group 0 stores its 8 lo and 8 hi.
        if (tg == 0) {
            __half2 l[4], h[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) l[k] = __floats2half2_rn(lo[2 * k], lo[2 * k + 1]), h[k] = __floats2half2_rn(hi[2 * k], hi[2 * k + 1]);
            reinterpret_cast<uint4 *>(out)[c0 / 8] = *reinterpret_cast<const uint4 *>(l);
            reinterpret_cast<uint4 *>(out)[(D + c0) / 8] = *reinterpret_cast<const uint4 *>(h);
        }
        // The two lanes of a token meet in one 16-bit store (kBits and kRow are even).
        auto store_bits = [&](int t, const Raw8<kF16> &r) {
            float v[8];
            r.unpack(v);
            unsigned byte = 0;
#pragma unroll
            for (int k = 0; k < 8; ++k) byte |= (v[k] > mid[k] ? 1u : 0u) << k;
            const unsigned pair = byte | __shfl_xor_sync(0xffffffffu, byte, 1) << 8;
            if (j == 0 && t < n) *reinterpret_cast<uint16_t *>(out + kBits + (int64_t)t * kRow + 2 * part) = (uint16_t)pair;
        };
#pragma unroll
        for (int u = 0; u < kHeld; ++u) store_bits(tg + u * kTokens, held[u]);
        for (int t0 = kHeld * kTokens; t0 < n; t0 += kTokens) store_bits(t0 + tg, Raw8<kF16>(x, min(t0 + tg, n - 1), c0));
    }

    // Rows whose 8-channel groups are not 16-byte aligned take the scalar loop, in CTA 0.
    __device__ static void quantize(Src x, int n, int role, const uint8_t *, QuantParams p,
                                    uint8_t *out, float *smem, int cta) {
        const float alpha = role == KEY ? p.calib_alpha_k : p.calib_alpha_v;
        const int elem = x.is_f16 ? 2 : 4;
        if ((reinterpret_cast<uintptr_t>(x.data) | (uintptr_t)(x.stride * elem)) % 16 == 0) {
            const int part = cta * (kThreads / 32) + (threadIdx.x >> 5);
            if (part >= D / 16) return;
            if (x.is_f16) quantize_part<true>(x, n, alpha, out, part);
            else quantize_part<false>(x, n, alpha, out, part);
            return;
        }
        if (cta != 0) return;
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
            reinterpret_cast<__half *>(out)[c] = __float2half_rn(lo[c]);
            reinterpret_cast<__half *>(out)[D + c] = __float2half_rn(hi[c]);
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

    // ---- tensor-core decode (decode_mma.cuh) ----------------------------------------
    // Bits become exact f16 operands by one AND each: a bit left at position p < 10 of its f16
    // half (a mantissa bit) is the subnormal 2^(p-24), so no multiply makes it 0/1. The other
    // operand (the query) or the result (values) carries 2^(24-p) instead. The block's scales
    // stay out of the tensor cores: keys fold them into the query (post-scaling), values into
    // the output at the block's end (lo·Σp + (hi − lo)·Σ p·bit).
    //
    // Key slots: k-steps 2j and 2j + 1 take the 32 channels of a token's word j, bytes 0 and
    // 2, then (the word shifted down a byte) bytes 1 and 3. Thread t's A registers mask bits t
    // and t + 4 of each half: slots 2t, 2t+8 (low half) are channels 32j + 8h + t (+4), slots
    // 2t+1, 2t+9 (high half) 16 channels on. A last k-step of 16 channels (D = 80, 112) spreads
    // its halfword as [bits 0-15 | bits 8-15] first: channels t, t + 8, t + 4, t + 12 (key_slot).
    // Value m-tile m is halfword m of tokens 2t, 2t+1 (2t+8, 2t+9): row g is channel 16m + g
    // from its low byte, row g + 8 channel 16m + g + 8 from its high byte, both at bit g.

    static constexpr bool kScaled = true;  // stage lo[D], hi[D] with every chunk
    static constexpr int kSmemRow = kRow;
    static constexpr int kWords = (D / 16 + 1) / 2;  // 32-bit words holding a token's bits

    // Whether k-step s shares its word with another k-step.
    __host__ __device__ static constexpr bool paired(int s) { return (s | 1) < D / 16; }
    // Bit position, within its f16 half, of thread t's key slot i.
    __host__ __device__ static constexpr int key_bit(int i, int t) { return t + 4 * (i >> 1); }
    __host__ __device__ static constexpr int key_channel(int s, int i, int t) {
        return paired(s) ? 32 * (s / 2) + 8 * (s & 1) + key_bit(i, t) + 16 * (i & 1) : 16 * s + t + key_slot(i);
    }
    // 2^(24 - p): undoes a bit's subnormal weight 2^(p-24).
    __device__ static float unsubnormal(int p) { return __int_as_float((127 + 24 - p) << 23); }

    __device__ static void stage_rows(uint8_t *dst, const uint8_t *blk, int c0, int len, int lane) {
        const uint8_t *src = blk + kBits + (int64_t)c0 * kRow;
        const int bytes = len * kRow;
        for (int p = lane; 16 * p < bytes; p += 32) cp_async16(dst + 16 * p, src + 16 * p, min(16, bytes - 16 * p));
    }

    // One token's bits from shared memory, with the widest loads its row alignment allows.
    __device__ static void load_row(const uint8_t *row, uint32_t (&w)[kWords]) {
        if constexpr (kRow % 16 == 0) {
#pragma unroll
            for (int i = 0; i < kWords / 4; ++i) {
                uint4 v = reinterpret_cast<const uint4 *>(row)[i];
                w[4 * i] = v.x, w[4 * i + 1] = v.y, w[4 * i + 2] = v.z, w[4 * i + 3] = v.w;
            }
        } else if constexpr (kRow % 8 == 0) {
#pragma unroll
            for (int i = 0; i < kWords / 2; ++i) {
                uint2 v = reinterpret_cast<const uint2 *>(row)[i];
                w[2 * i] = v.x, w[2 * i + 1] = v.y;
            }
        } else if constexpr (kRow % 4 == 0) {
#pragma unroll
            for (int i = 0; i < kWords; ++i) w[i] = reinterpret_cast<const uint32_t *>(row)[i];
        } else {
            const uint16_t *h = reinterpret_cast<const uint16_t *>(row);
#pragma unroll
            for (int i = 0; i < kWords; ++i)
                w[i] = h[2 * i] | (2 * i + 1 < D / 16 ? (uint32_t)h[2 * i + 1] << 16 : 0u);
        }
    }

    __device__ static void mma_query(const float *qh, const uint8_t *scales, int t,
                                     float (&qv)[D / 16][4], float &base) {
        const __half *lo = reinterpret_cast<const __half *>(scales), *hi = lo + D;
        base = 0.f;
#pragma unroll
        for (int s = 0; s < D / 16; ++s) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int c = key_channel(s, i, t);
                const float l = __half2float(lo[c]);
                qv[s][i] = qh[c] * (__half2float(hi[c]) - l) * unsubnormal(key_bit(i, t));
                base += qh[c] * l;
            }
        }
    }

    struct KeyTile {
        uint32_t w0[kWords], w1[kWords];  // tokens g and g + 8
        uint32_t mask;                    // bit t of each half
        __device__ KeyTile(const uint8_t *tile, int lane) : mask(0x00010001u << (lane & 3)) {
            load_row(tile + (lane >> 2) * kRow, w0);
            load_row(tile + ((lane >> 2) + 8) * kRow, w1);
        }
        __device__ void frag(int s, uint32_t (&a)[4]) const {
            uint32_t x0 = w0[s / 2], x1 = w1[s / 2];
            if (!paired(s)) x0 = __byte_perm(x0, 0u, 0x4110u), x1 = __byte_perm(x1, 0u, 0x4110u);
            else if (s & 1) x0 >>= 8, x1 >>= 8;
            a[0] = x0 & mask, a[1] = x1 & mask;
            a[2] = x0 & (mask << 4), a[3] = x1 & (mask << 4);
        }
    };

    struct ValueTile {
        uint32_t r0[kWords], r1[kWords], r8[kWords], r9[kWords];  // tokens 2t, 2t+1, 2t+8, 2t+9
        uint32_t mask;                                           // bit g of each half
        __device__ ValueTile(const uint8_t *tile, int lane) : mask(0x00010001u << (lane >> 2)) {
            const int t = lane & 3;
            load_row(tile + (2 * t) * kRow, r0);
            load_row(tile + (2 * t + 1) * kRow, r1);
            load_row(tile + (2 * t + 8) * kRow, r8);
            load_row(tile + (2 * t + 9) * kRow, r9);
        }
        __device__ void frag(int m, uint32_t (&a)[4]) const {
            // Low bytes of the two tokens' halfwords, then their high bytes, as [x | y].
            const uint32_t low = m & 1 ? 0x6622u : 0x4400u, high = m & 1 ? 0x7733u : 0x5511u;
            a[0] = __byte_perm(r0[m / 2], r1[m / 2], low) & mask, a[1] = __byte_perm(r0[m / 2], r1[m / 2], high) & mask;
            a[2] = __byte_perm(r8[m / 2], r9[m / 2], low) & mask, a[3] = __byte_perm(r8[m / 2], r9[m / 2], high) & mask;
        }
    };

    // acc += lo·Σp + (hi − lo)·Σ p·bit for the block just finished; bits[m] is the C fragment
    // of m-tile m (heads 2t, 2t+1; rows at their bits' subnormal weight 2^(g-24)), psum the block's Σp
    // of those heads.
    __device__ static void mma_fold(const uint8_t *scales, int g, const float (&bits)[D / 16][4],
                                    const float (&psum)[2], float (&acc)[D / 16][4]) {
        const __half *lo = reinterpret_cast<const __half *>(scales), *hi = lo + D;
#pragma unroll
        for (int m = 0; m < D / 16; ++m) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int c = 16 * m + g + 8 * r;
                const float l = __half2float(lo[c]), d = (__half2float(hi[c]) - l) * unsubnormal(g);
                acc[m][2 * r] += d * bits[m][2 * r] + l * psum[0];
                acc[m][2 * r + 1] += d * bits[m][2 * r + 1] + l * psum[1];
            }
        }
    }
};

}  // namespace kvb
