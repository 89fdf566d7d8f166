// `v1_58_tern` (VidKV values; src/kv/formats/v1_58_tern.rs): per channel γ = f16(mean |x|)
// over the unprotected tokens, trits q = clamp(round(x/γ), -1, 1) packed five per byte the
// TQ1_0 way; protected (salient) tokens at 2-bit per-channel min-max. Layout (FORMATS.md):
// n_p (u16), token mask when n_p > 0, γ[D], protected (lo, s)[D] when n_p > 0, trit bytes
// (byte g·D + c: channel c of unprotected tokens 5g..5g+4), 2-bit codes of protected tokens.
// Sections after the mask start at any byte, so f16 fields are read and written bytewise.
//
// Codes match the CPU bit for bit: the mean sums |x| in f64 in token order (one thread per
// channel) and divides in f64; half's f16::from_f64 goes through f32 on x86 with F16C (the
// CPU every GPU host has), so γ = f16(f32(mean)) here too. x/γ is one IEEE division.
//
// Values only (Applies::Values): prepare and scores are never called and do nothing.
#pragma once

#include "common.cuh"

namespace kvb {

template <int D>
struct FmtV1_58Tern {
    static constexpr int kPrep = 0;
    static constexpr int kLevels = 3;
    static constexpr int kRow2 = D / 4;  // bytes of a protected token's codes
    static constexpr int kWarps = kThreads / 32;
    static constexpr unsigned kAll = 0xffffffffu;

    struct Layout {
        int n_p, n_u, gamma, minmax, trits, prot;
        __host__ __device__ Layout(int n, int n_protected) {
            n_p = n_protected < n ? n_protected : n;
            n_u = n - n_p;
            gamma = 2 + (n_p > 0 ? (n + 7) / 8 : 0);
            minmax = gamma + 2 * D;
            trits = minmax + (n_p > 0 ? 4 * D : 0);
            prot = trits + (n_u + 4) / 5 * D;
        }
        __device__ static Layout read(const uint8_t *blk, int n) { return Layout(n, blk[0] | blk[1] << 8); }
        __device__ bool is_protected(const uint8_t *blk, int t) const {
            return n_p > 0 && ((blk[2 + (t >> 3)] >> (t & 7)) & 1);
        }
        __device__ MinMax minmax_of(const uint8_t *blk, int c) const {
            return {ld_f16_at(blk, minmax + 4 * c), ld_f16_at(blk, minmax + 4 * c + 2)};
        }
    };

    __host__ __device__ static int64_t bytes(int n, int, int n_protected, QuantParams) {
        const Layout L(n, n_protected);
        return L.prot + (int64_t)L.n_p * kRow2;
    }

    // Digit i of a TQ1_0 byte: ·3^i (mod 256) drops the leading digits, ·3 >> 8 reads the next.
    __device__ static int trit(unsigned byte, int i) {
        const unsigned pow3 = (unsigned)(0x511b090301ull >> (8 * i)) & 255u;  // 3^i, i < 5
        return (int)((((byte * pow3) & 255u) * 3u) >> 8);
    }

    __device__ static void quantize(Src x, int n, int, const uint8_t *protect, QuantParams,
                                    uint8_t *out, float *smem) {
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        // order[0, n_u): unprotected tokens in order; order[n_u, n): protected ones.
        int *order = reinterpret_cast<int *>(smem);
        float *gamma = smem + kMaxN, *lo = gamma + D, *step = lo + D;
        auto flag = [&](int t) { return protect && t < n && protect[t]; };
        int n_p = 0;
        for (int c0 = 0; c0 < n; c0 += 32) n_p += __popc(__ballot_sync(kAll, flag(c0 + lane)));
        const Layout L(n, n_p);
        if (threadIdx.x == 0) out[0] = (uint8_t)(n_p & 255), out[1] = (uint8_t)(n_p >> 8);
        if (n_p > 0) {
            for (int b = threadIdx.x; b < (n + 7) / 8; b += kThreads) {
                unsigned byte = 0;
                for (int i = 0; i < 8 && 8 * b + i < n; ++i) byte |= (flag(8 * b + i) ? 1u : 0u) << i;
                out[2 + b] = (uint8_t)byte;
            }
        }
        if (warp == 0) {
            int u = 0, pr = L.n_u;
            for (int c0 = 0; c0 < n; c0 += 32) {
                const int t = c0 + lane;
                const unsigned on = __ballot_sync(kAll, flag(t)), below = (1u << lane) - 1;
                const unsigned valid = c0 + 32 <= n ? kAll : (1u << (n - c0)) - 1;
                if (t < n) order[flag(t) ? pr + __popc(on & below) : u + __popc(~on & valid & below)] = t;
                pr += __popc(on);
                u += __popc(~on & valid);
            }
        }
        __syncthreads();
        // Thread per channel, tokens in order (the CPU's summation order).
        for (int c = threadIdx.x; c < D; c += kThreads) {
            double sum = 0.0;
            for (int u = 0; u < L.n_u; ++u) sum += (double)fabsf(x.at(order[u], c));
            const float g = L.n_u > 0 ? round_f16((float)(sum / L.n_u)) : 0.f;
            gamma[c] = g;
            st_f16_at(out, L.gamma + 2 * c, g);
            if (n_p > 0) {
                float mn = INFINITY, mx = -INFINITY;
                for (int i = L.n_u; i < n; ++i) {
                    const float v = x.at(order[i], c);
                    mn = fminf(mn, v), mx = fmaxf(mx, v);
                }
                const MinMax mm = MinMax::make(mn, mx, kLevels);
                lo[c] = mm.lo, step[c] = mm.step;
                st_f16_at(out, L.minmax + 4 * c, mm.lo);
                st_f16_at(out, L.minmax + 4 * c + 2, mm.step);
            }
        }
        __syncthreads();
        // Trit bytes: thread per (group of five tokens, channel); a short last group pads with 1.
        for (int i = threadIdx.x; i < (L.n_u + 4) / 5 * D; i += kThreads) {
            const int g5 = i / D, c = i % D;
            const float g = gamma[c];
            unsigned v = 0;
#pragma unroll
            for (int k = 0; k < 5; ++k) {
                const int u = 5 * g5 + k;
                unsigned digit = 1;
                if (u < L.n_u && g > 0.f)
                    digit = (unsigned)(fminf(fmaxf(roundf(x.at(order[u], c) / g), -1.f), 1.f) + 1.f);
                v = 3 * v + digit;
            }
            out[L.trits + i] = (uint8_t)((v * 256 + 242) / 243);
        }
        // Protected codes: thread per (protected token, four channels).
        for (int i = threadIdx.x; i < n_p * kRow2; i += kThreads) {
            const int t = order[L.n_u + i / kRow2], c0 = 4 * (i % kRow2);
            unsigned byte = 0;
#pragma unroll
            for (int k = 0; k < 4; ++k)
                byte |= MinMax{lo[c0 + k], step[c0 + k]}.code(x.at(t, c0 + k), kLevels) << (2 * k);
            out[L.prot + i] = (uint8_t)byte;
        }
    }

    // Tokens in runs of 32 (the run's mask bits by ballot give each token its rank); warp w
    // takes every kWarps-th token of a run, lanes across channels.
    __device__ static void dequantize(const uint8_t *blk, int n, int, __half *out, int64_t stride) {
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        const Layout L = Layout::read(blk, n);
        int m = 0;  // protected tokens before the run
        for (int c0 = 0; c0 < n; c0 += 32) {
            const unsigned flags = __ballot_sync(kAll, c0 + lane < n && L.is_protected(blk, c0 + lane));
            for (int i = warp; i < 32 && c0 + i < n; i += kWarps) {
                const int t = c0 + i, before = m + __popc(flags & ((1u << i) - 1));
                for (int c = lane; c < D; c += 32) {
                    float y;
                    if ((flags >> i) & 1) {
                        y = L.minmax_of(blk, c).value(code_at(blk + L.prot + (int64_t)before * kRow2, c, 2));
                    } else {
                        const int u = t - before;
                        y = (float)(trit(blk[L.trits + (int64_t)(u / 5) * D + c], u % 5) - 1) *
                            ld_f16_at(blk, L.gamma + 2 * c);
                    }
                    out[t * stride + c] = __float2half_rn(y);
                }
            }
            m += __popc(flags);
        }
    }

    __device__ static void prepare(const uint8_t *, int, const float *, int, float *) {}
    __device__ static void scores(const uint8_t *, int, int, int, const float *, const float *, int,
                                  float *) {}

    // Thread per channel, tokens in order, every head in registers: Σ p·trit, Σ p·code and
    // Σ p over protected tokens, scaled once per chunk. A trit byte serves five tokens.
    __device__ static void accumulate(const uint8_t *blk, int n, int t0, int t1, const float *p,
                                      int G, float *acc, float *) {
        const Layout L = Layout::read(blk, n);
        // Protected tokens before t0: each warp counts the mask.
        int base = 0;
        if (L.n_p > 0) {
            const int lane = threadIdx.x & 31;
            int cnt = 0;
            for (int b = lane; b < (t0 >> 3); b += 32) cnt += __popc(blk[2 + b]);
            if (lane == 0 && (t0 & 7)) cnt += __popc(blk[2 + (t0 >> 3)] & ((1u << (t0 & 7)) - 1));
            base = (int)__reduce_add_sync(kAll, (unsigned)cnt);
        }
        for (int c = threadIdx.x; c < D; c += kThreads) {
            float tern[kMaxG] = {}, code[kMaxG] = {}, psum[kMaxG] = {};
            int m = base, cached = -1;
            unsigned byte = 0;
            for (int t = t0; t < t1; ++t) {
                const float *pt = p + (t - t0);
                if (L.is_protected(blk, t)) {
                    const float y = (float)code_at(blk + L.prot + (int64_t)m * kRow2, c, 2);
                    ++m;
#pragma unroll
                    for (int h = 0; h < kMaxG; ++h)
                        if (h < G) code[h] += pt[h * kChunk] * y, psum[h] += pt[h * kChunk];
                } else {
                    const int u = t - m;
                    if (u / 5 != cached) cached = u / 5, byte = blk[L.trits + (int64_t)cached * D + c];
                    const float y = (float)(trit(byte, u % 5) - 1);
#pragma unroll
                    for (int h = 0; h < kMaxG; ++h)
                        if (h < G) tern[h] += pt[h * kChunk] * y;
                }
            }
            const float g = ld_f16_at(blk, L.gamma + 2 * c);
            const MinMax mm = L.n_p > 0 ? L.minmax_of(blk, c) : MinMax{0.f, 0.f};
#pragma unroll
            for (int h = 0; h < kMaxG; ++h)
                if (h < G) acc[h * D + c] += g * tern[h] + mm.step * code[h] + mm.lo * psum[h];
        }
    }

    __device__ static void finish(const uint8_t *, int, int, float *, float *) {}
};

}  // namespace kvb
