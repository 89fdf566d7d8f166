// `k1_5_mix` (VidKV keys; src/kv/formats/k1_5_mix.rs): the Dh channels of widest range at
// 2-bit per-channel min-max, the other Dl of each token through a real FFT whose Dl real
// coefficients (Re Z_0, Re Z_{Dl/2}, Re Z_1, Im Z_1, …) keep one sign bit each, with a
// per-coefficient scale f16(mean_t |coef|). Layout (FORMATS.md): channel mask (D/8 bytes),
// (lo, s) per 2-bit channel, scale per coefficient, then per token the 2-bit codes (Dh/4 bytes)
// and the sign bits (Dl/8 bytes). The f16 fields are 2-byte aligned (D/8 is even), records
// start at any byte.
//
// Exactness. Bit for bit with the CPU: the mask (ranges max - min in f32, widest first, ties
// to the lower channel), the (lo, s) pairs and the 2-bit codes (MinMax, single IEEE
// operations), and the sign bits of coefficients 0 and 1 (DC and Nyquist: sums of the inputs,
// exact in f64 for every f16-valued input, however ordered). Not guaranteed bit for bit:
//  - the sign bits of the other coefficients and the scales. The CPU's rfft is realfft over
//    rustfft in f64, whose algorithm, butterfly order and twiddles depend on the length and on
//    the host's SIMD (rustfft picks AVX, SSE or scalar code at run time), so its rounding
//    cannot be reproduced here. This file computes each coefficient as a direct f64 DFT
//    (twiddles from sincospi). Both agree to a few f64 ulps of Σ_n |z_n|, so a sign bit can
//    differ only where the CPU's coefficient is within that of 0 (e.g. a coefficient that is
//    exactly 0 for the input, as the alternating sums Re Z_{Dl/4} can be), and a scale only
//    where f32(mean) sits within as much of an f16 rounding midpoint. The mean itself sums
//    |coef| per coefficient in token order, as the CPU, and rounds f64 → f32 → f16 as
//    half's from_f64 does on x86 with F16C.
//  - dequantized low-range channels: an f64 inverse DFT against the CPU's inverse rfft, equal
//    after rounding to f16 unless the value sits within those ulps of an f16 midpoint.
// tests/cuda_kernels.rs asserts exactly these conditions (k1_5_mix_tolerated).
//
// Attention never runs an inverse FFT: prepare folds the query through the adjoint of the
// reconstruction (FORMATS.md), so a token's score is a constant plus a weight per set bit of
// its record. Keys only (Applies::Keys): accumulate and finish are never called and do nothing.
#pragma once

#include "common.cuh"
#include "mma.cuh"

namespace kvb {

template <int D>
struct FmtK1_5Mix {
    static constexpr int kMask = D / 8;  // bytes of the channel mask
    static constexpr int kLevels = 3;
    static constexpr int kMaxDl = D - 8 * ((D + 16) / 32);  // Dl at mix_fraction 0.25
    static constexpr int kMaxDh = 8 * ((3 * D + 16) / 32);  // Dh at mix_fraction 0.75
    // Per head: weights of the record's bits [0, D + Dh), the constant term at kConst, the
    // f16 split's scale at kConst + 1. Per block (kPrepShared, from a 16-byte boundary): the
    // twiddles as (cos, sin) pairs, each channel's min-max offset (0 for low-range channels),
    // and the low-range query of eight heads as [position][8].
    static constexpr int kConst = D + kMaxDh;
    static constexpr int kPrep = kConst + 2;
    static constexpr int kPrepShared = 3 + 2 * kMaxDl + D + 8 * kMaxDl;
    static constexpr int kFftTokens = D <= 128 ? 32 : 16;    // tokens per quantize step
    static constexpr int kChains = 4;                        // tokens one thread transforms at once
    static_assert(kFftTokens % kChains == 0, "a step's groups of kChains tokens stay in its rows");
    static constexpr int kWarps = kThreads / 32;
    static constexpr unsigned kAll = 0xffffffffu;

    // The CPU's high_channels: mix_fraction·D/8 rounded half away from zero, times 8. A
    // fraction the CPU refuses gets D/2, the size block_size (and so the arena check) assumes.
    __host__ __device__ static int high_channels(float f) {
        if (!(f >= 0.25f && f <= 0.75f)) return D / 2;
        return (int)round((double)f * D / 8.0) * 8;
    }

    struct Layout {
        int dh, dl, scales, codes, stride;
        __host__ __device__ explicit Layout(int dh_)
            : dh(dh_), dl(D - dh_), scales(kMask + 4 * dh_), codes(kMask + 4 * dh_ + 2 * (D - dh_)),
              stride((D + dh_) / 8) {}
    };

    __device__ static bool is_high(const uint8_t *mask, int c) { return (mask[c >> 3] >> (c & 7)) & 1; }

    // The block's 2-bit channels: the mask's popcount, two bytes at a time (blocks start
    // 16-byte aligned and D/8 is even).
    __device__ static Layout read(const uint8_t *blk) {
        int dh = 0;
#pragma unroll
        for (int b = 0; b < kMask / 2; ++b) dh += __popc(reinterpret_cast<const uint16_t *>(blk)[b]);
        return Layout(dh);
    }

    // The 2-bit channels below channel c = c0 + lane, for every lane of the warp (all call),
    // `high` its mask bit: the bits below the warp's first channel, a byte per lane, then the
    // warp's own by ballot.
    __device__ static int rank_in_warp(const uint8_t *mask, int c, bool high) {
        const int lane = threadIdx.x & 31, first_byte = (c - lane) >> 3;
        const unsigned below = __reduce_add_sync(kAll, lane < first_byte ? (unsigned)__popc(mask[lane]) : 0u);
        return (int)below + __popc(__ballot_sync(kAll, high) & ((1u << lane) - 1));
    }

    __device__ static int64_t stored_bytes(const uint8_t *blk, int n, int) {
        const Layout L = read(blk);
        return L.codes + (int64_t)n * L.stride;
    }

    __host__ __device__ static int64_t bytes(int n, int, int, QuantParams p) {
        const Layout L(high_channels(p.mix_fraction));
        return L.codes + (int64_t)n * L.stride;
    }

    // The 2-bit and the low-range channels in ascending order, from the mask (warp 0 only).
    __device__ static void channel_lists(const uint8_t *mask, int *hi_ch, int *lo_ch) {
        if (threadIdx.x >= 32) return;
        const int lane = threadIdx.x;
        int nh = 0, nl = 0;
        for (int c0 = 0; c0 < D; c0 += 32) {
            const int c = c0 + lane;
            const bool valid = c < D, hi = valid && is_high(mask, c);
            const unsigned on = __ballot_sync(kAll, hi), off = __ballot_sync(kAll, valid && !hi);
            const unsigned below = (1u << lane) - 1;
            if (hi) hi_ch[nh + __popc(on & below)] = c;
            else if (valid) lo_ch[nl + __popc(off & below)] = c;
            nh += __popc(on), nl += __popc(off);
        }
    }

    // Coefficient j of kChains real signals z + k·zs (length dl; the CPU's coefficient order),
    // as independent chains that each sum in the same order: a direct DFT against the twiddle
    // tables (angle 2π·m/dl at m). DC (j = 0) and Nyquist (j = 1) take the cosines at steps 0
    // and dl/2, exactly 1 and ±1, so their fused sums are the CPU's plain ones and every lane
    // of a warp runs the one loop.
    __device__ static void coefficients(const float *z, int zs, int dl, int j, const double *cos_t,
                                        const double *sin_t, double (&acc)[kChains]) {
#pragma unroll
        for (int k = 0; k < kChains; ++k) acc[k] = 0.0;
        const int step = j < 2 ? j * (dl / 2) : j >> 1;
        const bool sine = j > 1 && (j & 1);
        const double *tw = sine ? sin_t : cos_t;
        for (int i = 0, m = 0; i < dl; ++i) {
            const double w = tw[m];
#pragma unroll
            for (int k = 0; k < kChains; ++k) acc[k] = fma((double)z[k * zs + i], w, acc[k]);
            m += step;
            if (m >= dl) m -= dl;
        }
        if (sine)
#pragma unroll
            for (int k = 0; k < kChains; ++k) acc[k] = -acc[k];  // Im Z_k = -Σ z_i sin(2πki/dl)
    }

    __device__ static void twiddles(int dl, double *cos_t, double *sin_t) {
        for (int m = threadIdx.x; m < dl; m += blockDim.x) sincospi(2.0 * m / dl, &sin_t[m], &cos_t[m]);
    }

    // A block is one CTA of up to kQuantThreads (blockDim.x: fewer where the launcher puts
    // more than one CTA per multiprocessor): its statistics, ranking and sums need the whole
    // block, and sixteen warps keep four times the loads and transforms of four in flight.
    // No register cap: at 64 registers the four f64 chains spill, which measured 20% slower.
    static constexpr int kQuantThreads = 512, kQuantMinCtas = 1;
    // Most threads per channel in the range pass: their partial ranges meet in shared memory.
    static constexpr int kRangeParts = kQuantThreads / D;
    // Bytes of shared memory `quantize` lays out below (doubles counted as two floats).
    static constexpr int kQuantSmem = 4 * (2 * (3 + kFftTokens) * kMaxDl + 2 * D + kFftTokens * (kMaxDl + 1) +
                                           4 * kMaxDh + kMaxDl + 2 * kRangeParts * D);
    __device__ static void quantize(Src x, int n, int, const uint8_t *, QuantParams p, uint8_t *out,
                                    float *smem) {
        const Layout L(high_channels(p.mix_fraction));
        const int dl = L.dl;
        double *cos_t = reinterpret_cast<double *>(smem), *sin_t = cos_t + kMaxDl, *sums = sin_t + kMaxDl;
        double *coef = sums + kMaxDl;  // [kFftTokens][dl]
        float *mn = reinterpret_cast<float *>(coef + kFftTokens * kMaxDl), *mx = mn + D;
        float *z = mx + D;  // [kFftTokens][dl + 1]: padded rows, so that chains read distinct banks
        MinMax *range = reinterpret_cast<MinMax *>(z + kFftTokens * (kMaxDl + 1));  // per 2-bit channel
        int *hi_ch = reinterpret_cast<int *>(range + kMaxDh), *lo_ch = hi_ch + kMaxDh;
        float *part_mn = reinterpret_cast<float *>(lo_ch + kMaxDl), *part_mx = part_mn + kRangeParts * D;

        // Ranges: blockDim.x / D threads per channel (at least one), each every such-th token
        // (unrolled, so that many loads are in flight); min and max are exact in any order.
        const int range_parts = max(1, (int)blockDim.x / D);
        for (int i = threadIdx.x; i < range_parts * D; i += blockDim.x) {
            const int c = i % D, part = i / D;
            float a = INFINITY, b = -INFINITY;
#pragma unroll 8
            for (int t = part; t < n; t += range_parts) {
                const float v = x.at(t, c);
                a = fminf(a, v), b = fmaxf(b, v);
            }
            part_mn[i] = a, part_mx[i] = b;
        }
        __syncthreads();
        for (int c = threadIdx.x; c < D; c += blockDim.x) {
            float a = INFINITY, b = -INFINITY;
            for (int k = 0; k < range_parts; ++k) a = fminf(a, part_mn[k * D + c]), b = fmaxf(b, part_mx[k * D + c]);
            mn[c] = a, mx[c] = b;
        }
        __syncthreads();
        // Mask: channel c is 2-bit when fewer than Dh channels precede it in the CPU's order
        // (range descending, then index); thread per channel, a warp's 32 bits by ballot.
        for (int c0 = 32 * (threadIdx.x >> 5); c0 < D; c0 += blockDim.x) {
            const int c = c0 + (threadIdx.x & 31);
            bool high = false;
            if (c < D) {
                const float r = mx[c] - mn[c];
                int before = 0;
                for (int o = 0; o < D; ++o) {
                    const float ro = mx[o] - mn[o];
                    before += ro > r || (ro == r && o < c);
                }
                high = before < L.dh;
            }
            const unsigned bits = __ballot_sync(kAll, high);
            if ((threadIdx.x & 31) < 4 && c0 / 8 + (threadIdx.x & 31) < kMask)
                out[c0 / 8 + (threadIdx.x & 31)] = (uint8_t)(bits >> (8 * (threadIdx.x & 31)));
        }
        __syncthreads();
        channel_lists(out, hi_ch, lo_ch);
        twiddles(dl, cos_t, sin_t);
        for (int j = threadIdx.x; j < dl; j += blockDim.x) sums[j] = 0.0;
        __syncthreads();
        __half *params = reinterpret_cast<__half *>(out + kMask);
        for (int j = threadIdx.x; j < L.dh; j += blockDim.x) {
            const int c = hi_ch[j];
            const MinMax mm = range[j] = MinMax::make(mn[c], mx[c], kLevels);
            params[2 * j] = __float2half_rn(mm.lo);
            params[2 * j + 1] = __float2half_rn(mm.step);
        }
        __syncthreads();
        // kFftTokens tokens at a time: gather, transform, write the records, sum |coef|.
        uint8_t *recs = out + L.codes;
        const int code_bytes = L.dh / 4;
        for (int tb = 0; tb < n; tb += kFftTokens) {
            const int nt = min(kFftTokens, n - tb);
            const int zs = dl + 1, groups = (nt + kChains - 1) / kChains;
            for (int i = threadIdx.x; i < nt * dl; i += blockDim.x)
                z[i / dl * zs + i % dl] = x.at(tb + i / dl, lo_ch[i % dl]);
            __syncthreads();
            // Lanes of a warp take few coefficients (each one twiddle read) over many chains.
            // Rows past nt in a last short group are stale and their coefficients dropped.
            for (int i = threadIdx.x; i < groups * dl; i += blockDim.x) {
                const int j = i / groups, t0 = i % groups * kChains;
                double acc[kChains];
                coefficients(z + t0 * zs, zs, dl, j, cos_t, sin_t, acc);
#pragma unroll
                for (int k = 0; k < kChains; ++k)
                    if (t0 + k < nt) coef[(t0 + k) * dl + j] = acc[k];
            }
            __syncthreads();
            for (int i = threadIdx.x; i < nt * L.stride; i += blockDim.x) {
                const int tt = i / L.stride, b = i % L.stride, t = tb + tt;
                unsigned byte = 0;
                if (b < code_bytes) {
#pragma unroll
                    for (int k = 0; k < 4; ++k) {
                        const int j = 4 * b + k;
                        byte |= range[j].code(x.at(t, hi_ch[j]), kLevels) << (2 * k);
                    }
                } else {
                    const double *ct = coef + tt * dl + 8 * (b - code_bytes);
#pragma unroll
                    for (int k = 0; k < 8; ++k) byte |= (ct[k] >= 0.0 ? 1u : 0u) << k;
                }
                recs[(int64_t)t * L.stride + b] = (uint8_t)byte;
            }
            // One thread per coefficient across all steps: tokens in order, as the CPU sums.
            for (int j = threadIdx.x; j < dl; j += blockDim.x)
                for (int tt = 0; tt < nt; ++tt) sums[j] += fabs(coef[tt * dl + j]);
            __syncthreads();
        }
        // f16(f32(mean)): half's f16::from_f64 on x86 with F16C.
        __half *scales = reinterpret_cast<__half *>(out + L.scales);
        for (int j = threadIdx.x; j < dl; j += blockDim.x) scales[j] = __float2half_rn((float)(sums[j] / n));
    }

    // Warp per token: 2-bit channels directly, low-range channels by an f64 inverse DFT of the
    // token's ±scale coefficients (staged per warp), divided by dl, rounded f64 → f32 → f16.
    __device__ static void dequantize(const uint8_t *blk, int n, int, __half *out, int64_t stride) {
        __shared__ double cos_t[kMaxDl], sin_t[kMaxDl], scale[kMaxDl], chat[kWarps][kMaxDl];
        __shared__ int hi_ch[kMaxDh], lo_ch[kMaxDl];
        __shared__ MinMax mm[kMaxDh];
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        const Layout L = read(blk);
        const int dl = L.dl;
        channel_lists(blk, hi_ch, lo_ch);
        twiddles(dl, cos_t, sin_t);
        for (int j = threadIdx.x; j < L.dh; j += kThreads)
            mm[j] = {ld_f16_at(blk, kMask + 4 * j), ld_f16_at(blk, kMask + 4 * j + 2)};
        for (int k = threadIdx.x; k < dl; k += kThreads) scale[k] = ld_f16_at(blk, L.scales + 2 * k);
        __syncthreads();
        double *ch = chat[warp];
        for (int t = warp; t < n; t += kWarps) {
            const uint8_t *rec = blk + L.codes + (int64_t)t * L.stride;
            __half *o = out + t * stride;
            for (int j = lane; j < L.dh; j += 32) o[hi_ch[j]] = __float2half_rn(mm[j].value(code_at(rec, j, 2)));
            for (int k = lane; k < dl; k += 32) ch[k] = code_at(rec + L.dh / 4, k, 1) ? scale[k] : -scale[k];
            __syncwarp();
            for (int i = lane; i < dl; i += 32) {
                // ẑ_i = (ĉ_0 + (-1)^i ĉ_1 + 2 Σ_k (ĉ_2k cos(2πki/dl) - ĉ_2k+1 sin(2πki/dl))) / dl
                double acc = 0.0;
                for (int k = 1, m = i; k < dl / 2; ++k) {
                    acc += ch[2 * k] * cos_t[m] - ch[2 * k + 1] * sin_t[m];
                    m += i;
                    if (m >= dl) m -= dl;
                }
                const double v = (ch[0] + (i & 1 ? -ch[1] : ch[1]) + 2.0 * acc) / dl;
                o[lo_ch[i]] = __float2half_rn((float)v);
            }
            __syncwarp();
        }
    }

    // Per block and head: code-bit weights q_c·s_j (low bit) and 2·q_c·s_j (high bit), sign-bit
    // weights 2·f_k with f = adjoint(q_lo)·scale, and the constant Σ q_c·lo_j - Σ f_k: a set
    // sign bit adds f_k, a clear one subtracts it. Also the power of two that scales the
    // head's weights for the f16 split of scores (largest below 2^14). G <= kMaxG.
    __device__ static void prepare(const uint8_t *blk, int, const float *q, int G, float *qt) {
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        const Layout L = read(blk);
        const int dh = L.dh, dl = L.dl;
        float *shared = qt + ((G * kPrep + 3) & ~3);
        float2 *tw = reinterpret_cast<float2 *>(shared);  // (cos, sin) of 2π·m/dl
        float *lo_of = shared + 2 * kMaxDl;
        float4 *z = reinterpret_cast<float4 *>(lo_of + D);  // [position][8 heads]
        for (int m = threadIdx.x; m < dl; m += kThreads) sincospif(2.f * m / dl, &tw[m].y, &tw[m].x);
        // Eight heads at a time (all of them: the tensor-core kernels take G <= 8).
        for (int h0 = 0; h0 < G; h0 += 8) {
            // Thread per channel (the loop's bounds are warp-uniform: D % 32 == 0 or the last
            // warp is partial, and every lane takes the ballot).
            for (int c0 = 0; c0 < D; c0 += kThreads) {
                const int c = c0 + threadIdx.x;
                const bool high = c < D && is_high(blk, c);
                const int r = rank_in_warp(blk, c, high);
                if (c >= D) continue;
                if (high && h0 == 0) {
                    lo_of[c] = ld_f16_at(blk, kMask + 4 * r);
                    const float st = ld_f16_at(blk, kMask + 4 * r + 2);
                    for (int g = 0; g < G; ++g) {
                        const float qs = q[g * D + c] * st;
                        qt[g * kPrep + 2 * r] = qs;
                        qt[g * kPrep + 2 * r + 1] = 2.f * qs;
                    }
                } else if (!high) {
                    lo_of[c] = 0.f;
                    float *zc = reinterpret_cast<float *>(z) + (c - r) * 8;
                    for (int hh = 0; hh < 8; ++hh) zc[hh] = h0 + hh < G ? q[(h0 + hh) * D + c] : 0.f;
                }
            }
            __syncthreads();
            // The real input's symmetry halves the DFT: z_i ± z_{dl-i} in place (i in [1, dl/2)).
            for (int item = threadIdx.x; item < (dl / 2 - 1) * 8; item += kThreads) {
                float *zh = reinterpret_cast<float *>(z) + item % 8;
                const int i = 1 + item / 8;
                const float a = zh[i * 8], b = zh[(dl - i) * 8];
                zh[i * 8] = a + b, zh[(dl - i) * 8] = a - b;
            }
            __syncthreads();
            // Thread per bin k of Q = rfft(q_lo), for eight heads: each twiddle and each
            // position's eight values read once.
            for (int k = threadIdx.x; k <= dl / 2; k += kThreads) {
                float re[8], im[8] = {};
                const float sign = k & 1 ? -1.f : 1.f;
#pragma unroll
                for (int half = 0; half < 2; ++half) {
                    const float4 a = z[half], b = z[dl + half];  // positions 0 and dl/2
                    re[4 * half] = a.x + sign * b.x, re[4 * half + 1] = a.y + sign * b.y;
                    re[4 * half + 2] = a.z + sign * b.z, re[4 * half + 3] = a.w + sign * b.w;
                }
                for (int i = 1, m = k; i < dl / 2; ++i) {
                    const float2 c = tw[m];
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const float4 zp = z[2 * i + half], zm = z[2 * (dl - i) + half];
                        const float p[4] = {zp.x, zp.y, zp.z, zp.w}, n[4] = {zm.x, zm.y, zm.z, zm.w};
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            re[4 * half + e] = fmaf(p[e], c.x, re[4 * half + e]);
                            im[4 * half + e] = fmaf(-n[e], c.y, im[4 * half + e]);
                        }
                    }
                    m += k;
                    if (m >= dl) m -= dl;
                }
                // w_0 = Re Q_0/dl, w_1 = Re Q_{dl/2}/dl, w_2k = 2 Re Q_k/dl, w_2k+1 = 2 Im Q_k/dl.
                const bool edge = k == 0 || 2 * k == dl;
                const int j = k == 0 ? 0 : edge ? 1 : 2 * k;
                const float twice_w = (edge ? 2.f : 4.f) / dl;
                const float s_re = ld_f16_at(blk, L.scales + 2 * j);
                const float s_im = edge ? 0.f : ld_f16_at(blk, L.scales + 2 * j + 2);
#pragma unroll
                for (int hh = 0; hh < 8; ++hh) {
                    if (h0 + hh >= G) break;
                    float *w = qt + (h0 + hh) * kPrep + 2 * dh;
                    w[j] = twice_w * re[hh] * s_re;
                    if (!edge) w[j + 1] = twice_w * im[hh] * s_im;
                }
            }
            __syncthreads();
        }
        for (int g = warp; g < G; g += kWarps) {
            float sum = 0.f, amax = 0.f;
            for (int c = lane; c < D; c += 32) sum += q[g * D + c] * lo_of[c];
            for (int k = lane; k < dl; k += 32) sum -= 0.5f * qt[g * kPrep + 2 * dh + k];
            for (int b = lane; b < D + dh; b += 32) amax = fmaxf(amax, fabsf(qt[g * kPrep + b]));
            sum = warp_sum(sum), amax = warp_max(amax);
            int e = 0;
            frexpf(amax, &e);
            if (lane == 0) qt[g * kPrep + kConst] = sum, qt[g * kPrep + kConst + 1] = amax > 0.f ? ldexpf(1.f, 14 - e) : 1.f;
        }
    }

    // Bytes 2s, 2s + 1 of a record (0 past its end): the record bits of k-step s.
    __device__ static uint32_t halfword(const uint8_t *rec, int s, int stride, bool aligned) {
        if (aligned) return *reinterpret_cast<const uint16_t *>(rec + 2 * s);
        return rec[2 * s] | (2 * s + 1 < stride ? (uint32_t)rec[2 * s + 1] << 8 : 0u);
    }

    // On the tensor cores: a record's D + Dh bits are exact 0/1 f16 operands against the
    // weights as B (the f16 split of decode_mma.cuh: scaled by a power of two, hi + lo parts,
    // about 22 bits), eight heads h0.. per n-tile. Slots as q1_calib's keys: thread t takes
    // bits t, t + 8 (slots 2t, 2t + 1) and t + 4, t + 12 (slots 2t + 8, 2t + 9) of halfword s.
    // sum[j]: the C fragment (tokens g, g + 8 x heads h0 + 2t, + 1) of the 16-token tile at
    // tile[j], j < tiles, under the heads' powers of two; both tiles share each k-step's B.
    __device__ static void logit_tiles(const uint8_t *blk, const Layout &L, int n, const int (&tile)[2], int tiles,
                                       const float *qt, int G, int h0, int lane, float (&sum)[2][4]) {
        const int g = lane >> 2, t = lane & 3;
        const int nbits = D + L.dh, steps = (nbits + 15) / 16;
        const uint8_t *recs = blk + L.codes;
        const bool aligned = ((reinterpret_cast<uintptr_t>(recs) | L.stride) & 1) == 0;
        const uint8_t *rec[2][2];
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int r = 0; r < 2; ++r) rec[j][r] = recs + (int64_t)min(tile[j] + g + 8 * r, n - 1) * L.stride;
        const int h = h0 + g;
        const float *w = qt + min(h, G - 1) * kPrep;
        const float sq = h < G ? w[kConst + 1] : 0.f;
        float part[2][2][4] = {};  // [tile][hi, lo]
        for (int st = 0; st < steps; ++st) {
            float x[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int b = 16 * st + t + key_slot(i);
                x[i] = b < nbits ? w[b] * sq : 0.f;
            }
            uint32_t bh0, bh1, bl0, bl1;
            split_half2(x[0], x[1], bh0, bl0);
            split_half2(x[2], x[3], bh1, bl1);
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                if (j >= tiles) break;
                const uint32_t x0 = __byte_perm(halfword(rec[j][0], st, L.stride, aligned), 0u, 0x4110u);
                const uint32_t x1 = __byte_perm(halfword(rec[j][1], st, L.stride, aligned), 0u, 0x4110u);
                const uint32_t a[4] = {bits_to_half2(x0, t), bits_to_half2(x1, t), bits_to_half2(x0, t + 4),
                                       bits_to_half2(x1, t + 4)};
                mma_16816(part[j][0], a, bh0, bh1);
                mma_16816(part[j][1], a, bl0, bl1);
            }
        }
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) sum[j][e] = part[j][0][e] + part[j][1][e];
    }

    // Generic kernel: warp w scores the 16-token tiles w, w + kWarps of the chunk into s.
    __device__ static void scores(const uint8_t *blk, int n, int t0, int t1, const float *,
                                  const float *qt, int G, float *s) {
        const Layout L = read(blk);
        const int warp = threadIdx.x >> 5, t = (threadIdx.x & 31) & 3, g = (threadIdx.x & 31) >> 2;
        const int tile[2] = {t0 + 16 * warp, t0 + 16 * (warp + kWarps)};
        if (tile[0] >= t1) return;
        const int tiles = tile[1] < t1 ? 2 : 1;
        for (int h0 = 0; h0 < G; h0 += 8) {
            float sum[2][4];
            logit_tiles(blk, L, n, tile, tiles, qt, G, h0, threadIdx.x & 31, sum);
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                if (j >= tiles) break;
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int tok = tile[j] + g + 8 * (e >> 1), head = h0 + 2 * t + (e & 1);
                    if (tok < t1 && head < G) {
                        const float *wh = qt + head * kPrep;
                        s[head * kChunk + (tok - t0)] = sum[j][e] / wh[kConst + 1] + wh[kConst];
                    }
                }
            }
        }
    }

    // decode_prepared.cuh: the logits v[j] (C fragments: tokens g, g + 8 x heads 2t, 2t + 1) of
    // the tiles at t0 and t0 + 16 from the weights `prepare` left in qt; -inf past n, 0 for heads
    // past G (whose columns are never read).
    __device__ static void mma_unit_logits(const uint8_t *blk, int n, int t0, const float *qt, int G, int lane,
                                           float (&v)[2][4]) {
        const int g = lane >> 2, t = lane & 3;
        const int tile[2] = {t0, t0 + 16}, tiles = n - t0 > 16 ? 2 : 1;
        float sum[2][4];
        logit_tiles(blk, read(blk), n, tile, tiles, qt, G, 0, lane, sum);
        float inv[2], base[2];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int head = 2 * t + hh;
            const float *wh = qt + min(head, G - 1) * kPrep;
            inv[hh] = head < G ? 1.f / wh[kConst + 1] : 0.f;
            base[hh] = head < G ? wh[kConst] : 0.f;
        }
#pragma unroll
        for (int j = 0; j < 2; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                v[j][e] = tile[j] + g + 8 * (e >> 1) < n ? sum[j][e] * inv[e & 1] + base[e & 1] : -INFINITY;
    }

    __device__ static void accumulate(const uint8_t *, int, int, int, const float *, int, float *,
                                      float *) {}
    __device__ static void finish(const uint8_t *, int, int, float *, float *) {}
};

}  // namespace kvb
