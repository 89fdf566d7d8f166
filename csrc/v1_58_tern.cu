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
#include "mma.cuh"

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
        // Protected tokens before token t0, counted by the whole warp (every lane calls).
        __device__ int protected_before(const uint8_t *blk, int t0, int lane) const {
            if (n_p == 0) return 0;
            int cnt = 0;
            for (int b = lane; b < (t0 >> 3); b += 32) cnt += __popc(blk[2 + b]);
            if (lane == 0 && (t0 & 7)) cnt += __popc(blk[2 + (t0 >> 3)] & ((1u << (t0 & 7)) - 1));
            return (int)__reduce_add_sync(kAll, (unsigned)cnt);
        }
    };

    __host__ __device__ static int64_t bytes(int n, int, int n_protected, QuantParams) {
        const Layout L(n, n_protected);
        return L.prot + (int64_t)L.n_p * kRow2;
    }

    __device__ static int64_t stored_bytes(const uint8_t *blk, int n, int role) {
        return bytes(n, role, blk[0] | blk[1] << 8, QuantParams{});
    }

    // 3^i, i < 5: the multiplier that selects digit i of a TQ1_0 byte.
    __device__ static uint32_t pow3(int i) { return (uint32_t)(0x511b090301ull >> (8 * i)) & 255u; }

    // Digit i of a TQ1_0 byte: ·3^i (mod 256) drops the leading digits, ·3 >> 8 reads the next.
    __device__ static int trit(unsigned byte, int i) { return (int)((((byte * pow3(i)) & 255u) * 3u) >> 8); }

    // Σ p over protected tokens of head g, summed over its four lanes, as heads 2t, 2t + 1 need it.
    __device__ static void protected_sums(float p_prot, int t, float (&pp)[2]) {
        p_prot += __shfl_xor_sync(kAll, p_prot, 1);
        p_prot += __shfl_xor_sync(kAll, p_prot, 2);
        pp[0] = __shfl_sync(kAll, p_prot, 8 * t), pp[1] = __shfl_sync(kAll, p_prot, 8 * t + 4);
    }

    static constexpr int kQuantSmem = 4 * (kMaxN + 4 * D);  // order, then gamma, the MinMax ranges
    __device__ static void quantize(Src x, int n, int, const uint8_t *protect, QuantParams,
                                    uint8_t *out, float *smem) {
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        // order[0, n_u): unprotected tokens in order; order[n_u, n): protected ones.
        int *order = reinterpret_cast<int *>(smem);
        float *gamma = smem + kMaxN;
        MinMax *range = reinterpret_cast<MinMax *>(gamma + D);  // of the protected tokens, per channel
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
        // Thread per channel, tokens in order (the CPU's summation order; unrolled, so that
        // many loads are in flight).
        for (int c = threadIdx.x; c < D; c += kThreads) {
            double sum = 0.0;
#pragma unroll 16
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
                const MinMax mm = range[c] = MinMax::make(mn, mx, kLevels);
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
                byte |= range[c0 + k].code(x.at(t, c0 + k), kLevels) << (2 * k);
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

    // On the tensor cores, channels as the MMA rows, tokens as k, eight heads per n-tile:
    // O_tern += T·P over the chunk's tokens, T each unprotected token's trit - 1 (0 for a
    // protected one), and O_code += C·P over its protected tokens in their stored order, C the
    // 2-bit codes; both exact f16, P split into f16 hi + lo parts. Then acc += γ·O_tern +
    // s·O_code + lo·Σ_protected p. Warp w takes the m-tiles w, w + kWarps. A lane's element
    // pairs are one channel of two tokens: the trit bytes of channels c and c + 8 of a token
    // share a word, whose digit one multiply brings to both 16-bit halves.
    __device__ static void accumulate(const uint8_t *blk, int n, int t0, int t1, const float *p,
                                      int G, float *acc, float *) {
        constexpr int kMyTiles = (D / 16 + kWarps - 1) / kWarps;
        const Layout L = Layout::read(blk, n);
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
        // The chunk's tokens, a thread each: the byte offset of an unprotected token's trit row
        // (five tokens) and the power of three that selects its digit (0: protected, or past
        // the chunk); the chunk's protected tokens in order; protected tokens before t0.
        static_assert(kThreads == kChunk, "a thread per token of a chunk");
        __shared__ int tok_row[kChunk];
        __shared__ uint8_t tok_pow3[kChunk], coded[kChunk];
        __shared__ int warp_codes[kWarps];
        const int base = L.protected_before(blk, t0, lane);
        int n_coded = 0;
        {
            const int tok = t0 + threadIdx.x;
            const bool valid = tok < t1, code = valid && L.is_protected(blk, tok);
            const unsigned codes = __ballot_sync(kAll, code);
            if (lane == 0) warp_codes[warp] = __popc(codes);
            __syncthreads();
            int before = __popc(codes & ((1u << lane) - 1));
            for (int w = 0; w < kWarps; ++w) before += w < warp ? warp_codes[w] : 0, n_coded += warp_codes[w];
            const int u = tok - base - before;
            if (code) coded[before] = (uint8_t)threadIdx.x;
            // A token without a trit still has its row read (and its digit discarded): γ's 2D
            // bytes, which every block has, where the trit section may be empty.
            tok_row[threadIdx.x] = valid && !code ? L.trits + u / 5 * D : L.gamma;
            tok_pow3[threadIdx.x] = valid && !code ? (uint8_t)pow3(u % 5) : 0;
            __syncthreads();
        }
        for (int h0 = 0; h0 < G; h0 += 8) {
            float o_tern[kMyTiles][4] = {}, o_code[kMyTiles][4] = {}, p_prot = 0.f;
            const int h = h0 + g;
            for (int k0 = 0; k0 < t1 - t0; k0 += 16) {
                int row[4];
                uint32_t pow3[4];
                float pv[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int i = k0 + 2 * t + (j & 1) + 8 * (j >> 1);
                    row[j] = tok_row[i];
                    pow3[j] = tok_pow3[i];
                    pv[j] = pow3[j] != 0 && h < G ? p[h * kChunk + i] : 0.f;
                }
                // Digits (0..2) of channels c (low half) and c + 8 (high half) per token; 1 (a
                // zero value) where the token has no trit.
                mma_tokens(o_tern, pv, [](uint32_t x) { return trits_to_half2(x); },
                           [&](int j, int c) { return trit_pair(blk + row[j], c, pow3[j]); });
            }
            for (int k0 = 0; k0 < n_coded; k0 += 16) {
                const uint8_t *rows[4];
                float pv[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const int r = k0 + 2 * t + (j & 1) + 8 * (j >> 1);
                    rows[j] = blk + L.prot + (int64_t)(base + min(r, n_coded - 1)) * kRow2;
                    pv[j] = r < n_coded && h < G ? p[h * kChunk + coded[r]] : 0.f;
                    p_prot += pv[j];
                }
                // 2-bit codes of channels c and c + 8 (the same bit offset) per token.
                mma_tokens(o_code, pv, [](uint32_t x) { return codes2_to_half2(x, 0); },
                           [&](int j, int c) { return code_pair(rows[j], c); });
            }
            float pp[2];
            protected_sums(p_prot, t, pp);
#pragma unroll
            for (int mi = 0; mi < kMyTiles; ++mi) {
                const int m = warp + kWarps * mi;
                if (m >= D / 16) break;
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int c = 16 * m + g + 8 * (e >> 1), head = h0 + 2 * t + (e & 1);
                    if (head >= G) continue;
                    const MinMax mm = L.n_p > 0 ? L.minmax_of(blk, c) : MinMax{0.f, 0.f};
                    acc[head * D + c] +=
                        ld_f16_at(blk, L.gamma + 2 * c) * o_tern[mi][e] + mm.step * o_code[mi][e] + mm.lo * pp[e & 1];
                }
            }
        }
    }

    // Digits (0..2) of channels c (low half) and c + 8 (high half) of the token whose trit row
    // is `row` and whose digit pow3 selects (3^i); 1 (a zero value) for pow3 = 0, a token
    // without a trit.
    __device__ static uint32_t trit_pair(const uint8_t *row, int c, uint32_t pow3) {
        const uint32_t pair = (uint32_t)row[c] | (uint32_t)row[c + 8] << 16;
        return pow3 != 0 ? ((((pair * pow3) & 0x00FF00FFu) * 3u) >> 8) & 0x00030003u : 0x00010001u;
    }

    // 2-bit codes of channels c and c + 8 (the same bit offset) of a protected token's row.
    __device__ static uint32_t code_pair(const uint8_t *row, int c) {
        const uint8_t *r = row + c / 4;
        return (((uint32_t)r[0] | (uint32_t)r[2] << 16) >> (2 * (c & 3))) & 0x00030003u;
    }

    // The f16 at `lo` (low half) and at `hi` (high half), bytewise: fields may start at odd bytes.
    __device__ static uint32_t f16_pair(const uint8_t *lo, const uint8_t *hi) {
        return (uint32_t)lo[0] | (uint32_t)lo[1] << 8 | (uint32_t)hi[0] << 16 | (uint32_t)hi[1] << 24;
    }

    // decode_prepared.cuh: acc (channels 16m + g, + 8 x heads 2t, 2t + 1) += the values of the
    // 32-token unit at u0 weighted by p (its two tiles' probabilities, C fragments: tokens
    // g, g + 8 x heads 2t, 2t + 1; 0 past n), with A operands that carry each channel's scale:
    // unprotected tokens as γ·(trit − 1) (exact in f16) against P; the unit's protected tokens,
    // compacted sixteen a tile, as s·code (rounded to f16, as P is: at most 2^-11 relative)
    // against their probabilities, then lo·Σ p. `scratch` holds the warp's [32 tokens][8 heads]
    // probabilities and its protected tokens' order.
    __device__ static void mma_unit_values(const uint8_t *blk, int n, int u0, const float (&p)[2][4],
                                           float (&acc)[D / 16][4], float *scratch, int lane) {
        const Layout L = Layout::read(blk, n);
        const int g = lane >> 2, t = lane & 3, tok = u0 + lane;
        const bool valid = tok < n, prot = valid && L.is_protected(blk, tok);
        const unsigned flags = __ballot_sync(kAll, prot);
        const int before = L.protected_before(blk, u0, lane);
        const int rank = __popc(flags & ((1u << lane) - 1)), u = tok - before - rank;
        // A token without a trit reads γ's bytes (every block has them) and discards them.
        const int my_row = valid && !prot ? L.trits + u / 5 * D : L.gamma;
        const uint32_t my_pow3 = valid && !prot ? pow3(u % 5) : 0u;
        uint32_t gamma[D / 16];  // γ of channels 16m + g (low half), + 8 (high half)
#pragma unroll
        for (int m = 0; m < D / 16; ++m) {
            const uint8_t *at = blk + L.gamma + 2 * (16 * m + g);
            gamma[m] = f16_pair(at, at + 16);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            if (u0 + 16 * i >= n) break;
            const uint32_t b0 = movmatrix_trans(half2_bits(p[i][0], p[i][1]));
            const uint32_t b1 = movmatrix_trans(half2_bits(p[i][2], p[i][3]));
            const uint8_t *row[4];
            uint32_t pow3[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int src = 16 * i + 2 * t + (j & 1) + 8 * (j >> 1);
                row[j] = blk + __shfl_sync(kAll, my_row, src);
                pow3[j] = __shfl_sync(kAll, my_pow3, src);
            }
#pragma unroll
            for (int m = 0; m < D / 16; ++m) {
                uint32_t x[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) x[j] = trit_pair(row[j], 16 * m + g, pow3[j]);
                uint32_t a[4];
                scaled_operand(x, gamma[m], [](uint32_t y) { return trits_to_half2(y); }, a);
                mma_16816(acc[m], a, b0, b1);
            }
        }
        const int n_coded = __popc(flags);
        if (n_coded == 0) return;
        // The unit's probabilities [token][head] and its protected tokens in order.
        int *order = reinterpret_cast<int *>(scratch + 32 * 8);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) scratch[(16 * i + g + 8 * (e >> 1)) * 8 + 2 * t + (e & 1)] = p[i][e];
        if (prot) order[rank] = lane;
        __syncwarp();
        float p_prot = 0.f;
        for (int k0 = 0; k0 < n_coded; k0 += 16) {
            const uint8_t *rows[4];
            float pv[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int k = k0 + 2 * t + (j & 1) + 8 * (j >> 1);
                rows[j] = blk + L.prot + (int64_t)(before + min(k, n_coded - 1)) * kRow2;
                pv[j] = k < n_coded ? __half2float(__float2half_rn(scratch[order[k] * 8 + g])) : 0.f;
                p_prot += pv[j];
            }
            const uint32_t b0 = half2_bits(pv[0], pv[1]), b1 = half2_bits(pv[2], pv[3]);
#pragma unroll
            for (int m = 0; m < D / 16; ++m) {
                uint32_t x[4];
#pragma unroll
                for (int j = 0; j < 4; ++j) x[j] = code_pair(rows[j], 16 * m + g);
                const uint8_t *at = blk + L.minmax + 4 * (16 * m + g) + 2;
                uint32_t a[4];
                scaled_operand(x, f16_pair(at, at + 32), [](uint32_t y) { return codes2_to_half2(y, 0); }, a);
                mma_16816(acc[m], a, b0, b1);
            }
        }
        float pp[2];
        protected_sums(p_prot, t, pp);
#pragma unroll
        for (int m = 0; m < D / 16; ++m)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float lo = ld_f16_at(blk, L.minmax + 4 * (16 * m + g + 8 * r));
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) acc[m][2 * r + hh] += lo * pp[hh];
            }
        __syncwarp();
    }

    // The A fragment of one m-tile from x[j], token j's channels c (low half) and c + 8 (high
    // half) as 16-bit values that to_half2 turns into f16 pairs, times the channels' scales
    // (c low, c + 8 high, f16): rows c take the low scale, rows c + 8 the high one.
    template <class ToHalf2>
    __device__ static void scaled_operand(const uint32_t (&x)[4], uint32_t scales, ToHalf2 to_half2,
                                          uint32_t (&a)[4]) {
        const uint32_t lo = __byte_perm(scales, 0u, 0x1010), hi = __byte_perm(scales, 0u, 0x3232);
        a[0] = hmul2_bits(to_half2(__byte_perm(x[0], x[1], 0x5410)), lo);
        a[1] = hmul2_bits(to_half2(__byte_perm(x[0], x[1], 0x7632)), hi);
        a[2] = hmul2_bits(to_half2(__byte_perm(x[2], x[3], 0x5410)), lo);
        a[3] = hmul2_bits(to_half2(__byte_perm(x[2], x[3], 0x7632)), hi);
    }

    // o[mi] += A·P for this warp's m-tiles mi (channels 16m..16m + 15, m = warp + kWarps·mi) and
    // the k-step whose P this lane holds for its tokens 2t, 2t + 1, 2t + 8, 2t + 9 (pv, split
    // into f16 hi and lo). pair(j, c) is token j's channels c (low half) and c + 8 (high half),
    // c = 16m + g, as 16-bit values that to_half2 turns into the f16 operands.
    template <int kMyTiles, class ToHalf2, class Pair>
    __device__ static void mma_tokens(float (&o)[kMyTiles][4], const float (&pv)[4], ToHalf2 to_half2, Pair pair) {
        const int warp = threadIdx.x >> 5, g = (threadIdx.x & 31) >> 2;
        uint32_t b_hi[2], b_lo[2];
        split_half2(pv[0], pv[1], b_hi[0], b_lo[0]);
        split_half2(pv[2], pv[3], b_hi[1], b_lo[1]);
#pragma unroll
        for (int mi = 0; mi < kMyTiles; ++mi) {
            const int m = warp + kWarps * mi;
            if (m >= D / 16) break;
            uint32_t x[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) x[j] = pair(j, 16 * m + g);
            const uint32_t a[4] = {to_half2(__byte_perm(x[0], x[1], 0x5410)), to_half2(__byte_perm(x[0], x[1], 0x7632)),
                                   to_half2(__byte_perm(x[2], x[3], 0x5410)), to_half2(__byte_perm(x[2], x[3], 0x7632))};
            mma_16816(o[mi], a, b_hi[0], b_hi[1]);
            mma_16816(o[mi], a, b_lo[0], b_lo[1]);
        }
    }

    // f16x2 product of two f16x2 operands.
    __device__ static uint32_t hmul2_bits(uint32_t a, uint32_t b) {
        const __half2 h = __hmul2(*reinterpret_cast<const __half2 *>(&a), *reinterpret_cast<const __half2 *>(&b));
        return *reinterpret_cast<const uint32_t *>(&h);
    }

    // f16x2 of trit digits d (0..2) at bits [0, 2) and [16, 18): d - 1, exact (as codes2_to_half2).
    __device__ static uint32_t trits_to_half2(uint32_t x) {
        const uint32_t y = x | 0x64006400u;
        const __half2 h = __hsub2(*reinterpret_cast<const __half2 *>(&y), __half2half2(__ushort_as_half(0x6401)));
        return *reinterpret_cast<const uint32_t *>(&h);
    }

    __device__ static void finish(const uint8_t *, int, int, float *, float *) {}
};

}  // namespace kvb
