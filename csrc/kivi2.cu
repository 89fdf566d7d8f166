// `kivi2` (KIVI 2-bit; src/kv/formats/kivi2.rs): asymmetric min-max at 3 levels (MinMax of
// common.cuh), codes four per byte, first in the low bits. Keys per channel over groups of 32
// tokens: a group is lo[D], s[D] (f16), then d/4 bytes per token. Values per token over groups
// of 32 channels: lo, s (f16) and the group's codes, the TokenGroups skeleton.
//
// Codes match the CPU bit for bit: min and max are order-free, (max - min)/3 and
// (x - lo)/s are single IEEE operations, roundf is Rust's round. Decoded values code·s + lo
// are exact products plus one rounding, fused or not.
//
// Attention: scores read keys, accumulate reads values, so each knows its layout. Key groups
// are 12·d bytes apart (every group but the last is full) and 4-byte aligned (d % 16 == 0),
// as are value rows (4·ceil(d/32) + d/4 bytes).
#pragma once

#include "mma.cuh"
#include "token_groups.cuh"

namespace kvb {

struct Kivi2Codec {
    static constexpr int kHead = 4, kBits = 2, kLevels = 3;

    __device__ static void encode(uint8_t *grp, const float (&v)[32], int L) {
        const MinMax mm = MinMax::over(v, L, kLevels);
        // Groups are 4-byte aligned: (lo, s), then sixteen codes per word, first lowest.
        uint32_t *at = reinterpret_cast<uint32_t *>(grp);
        at[0] = (uint32_t)__half_as_ushort(__float2half_rn(mm.lo)) |
                ((uint32_t)__half_as_ushort(__float2half_rn(mm.step)) << 16);
#pragma unroll
        for (int w = 0; w < 2; ++w) {
            uint32_t word = 0;
#pragma unroll
            for (int j = 0; j < 16; ++j) word |= mm.code(v[16 * w + j], kLevels) << (2 * j);
            if (16 * w < L) at[1 + w] = word;
        }
    }

    __device__ static float decode(const uint8_t *grp, int, int j) {
        const float2 ls = __half22float2(*reinterpret_cast<const __half2 *>(grp));
        return (float)code_at(grp + 4, j, 2) * ls.y + ls.x;
    }
};

template <int D>
struct FmtKivi2 {
    using Values = TokenGroups<D, Kivi2Codec>;
    static constexpr int kPrep = 0;
    static constexpr int kLevels = 3;
    static constexpr int kTokRow = D / 4;             // bytes of one key token's codes
    static constexpr int kKeyGroup = 4 * D + 32 * kTokRow;  // bytes of a full key group
    static_assert(D % 16 == 0, "4-byte aligned key rows");

    __host__ __device__ static int64_t bytes(int n, int role, int, QuantParams p) {
        return role == KEY ? (int64_t)((n + 31) / 32) * 4 * D + (int64_t)n * kTokRow
                           : Values::bytes(n, role, 0, p);
    }

    // Keys: a thread per (group, channel), the group's 32 tokens of its channel loaded at once
    // (a warp's channels are consecutive: each token's loads coalesce). A token's codes leave
    // as two ballots (bit planes over the warp's channels) that lane `token` keeps and
    // interleaves into its code words: D % 16 == 0, so each half-warp is 16 consecutive
    // channels of one group, one word per token.
    static constexpr int kQuantParts = Values::kQuantParts;
    template <class T>
    __device__ static void quantize_keys(const T *x, int64_t stride, int n, uint8_t *out, int part) {
        const int n_items = (n + 31) / 32 * D, lane = threadIdx.x & 31;
        // The bound is warp-uniform: every lane takes part in the ballots.
        for (int i0 = part * kThreads + (threadIdx.x & ~31); i0 < n_items; i0 += kQuantParts * kThreads) {
            const int i = min(i0 + lane, n_items - 1);
            const int g = i / D, c = i % D, tb = 32 * g, m = min(32, n - tb);
            const T *col = x + (int64_t)tb * stride + c;
            float v[32];
#pragma unroll
            for (int r = 0; r < 32; ++r) v[r] = r < m ? (float)col[r * stride] : 0.f;
            const MinMax mm = MinMax::over(v, m, kLevels);
            uint8_t *grp = out + (int64_t)g * kKeyGroup;
            if (i0 + lane < n_items) {
                reinterpret_cast<__half *>(grp)[c] = __float2half_rn(mm.lo);
                reinterpret_cast<__half *>(grp)[D + c] = __float2half_rn(mm.step);
            }
            uint32_t low = 0, high = 0;  // token `lane`'s code bits 0 and 1 over the warp's channels
#pragma unroll
            for (int r = 0; r < 32; ++r) {
                const unsigned code = mm.code(v[r], kLevels);
                const uint32_t b0 = __ballot_sync(0xffffffffu, code & 1), b1 = __ballot_sync(0xffffffffu, code & 2);
                if (lane == r) low = b0, high = b1;
            }
            auto spread = [](uint32_t b) {  // bits 0..15 to the even bits
                b = (b | b << 8) & 0x00ff00ffu;
                b = (b | b << 4) & 0x0f0f0f0fu;
                b = (b | b << 2) & 0x33333333u;
                return (b | b << 1) & 0x55555555u;
            };
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int item = i0 + 16 * h, gh = item / D, ch = item % D;
                if (item < n_items && lane < min(32, n - 32 * gh)) {
                    const uint32_t word = spread((low >> 16 * h) & 0xffffu) | spread((high >> 16 * h) & 0xffffu) << 1;
                    uint8_t *at = out + (int64_t)gh * kKeyGroup + 4 * D + lane * kTokRow + ch / 4;
                    *reinterpret_cast<uint32_t *>(at) = word;
                }
            }
        }
    }
    __device__ static void quantize(Src x, int n, int role, const uint8_t *protect, QuantParams p,
                                    uint8_t *out, float *smem, int part) {
        if (role != KEY) return Values::quantize(x, n, role, protect, p, out, smem, part);
        if (x.is_f16) quantize_keys(static_cast<const __half *>(x.data), x.stride, n, out, part);
        else quantize_keys(static_cast<const float *>(x.data), x.stride, n, out, part);
    }

    __device__ static void dequantize(const uint8_t *blk, int n, int role, __half *out, int64_t stride) {
        if (role != KEY) return Values::dequantize(blk, n, role, out, stride);
        for (int i = threadIdx.x; i < n * D; i += kThreads) {
            const int t = i / D, c = i % D;
            const uint8_t *grp = blk + (int64_t)(t / 32) * kKeyGroup;
            const float y = (float)code_at(grp + 4 * D + (t % 32) * kTokRow, c, 2) * ld_f16(grp, D + c) +
                            ld_f16(grp, c);
            out[t * stride + c] = __float2half_rn(y);
        }
    }

    __device__ static void prepare(const uint8_t *, int, const float *, int, float *) {}

    // Keys. Thread per token: a warp's 32 tokens are one group (chunks start at multiples of
    // 128), so the (lo, s) reads are uniform; the token's codes come a word (16 channels) at a
    // time, and each decoded value serves every head.
    __device__ static void scores(const uint8_t *blk, int, int t0, int t1, const float *q,
                                  const float *, int G, float *s) {
        for (int t = t0 + threadIdx.x; t < t1; t += kThreads) {
            const uint8_t *grp = blk + (int64_t)(t / 32) * kKeyGroup;
            const __half2 *lo = reinterpret_cast<const __half2 *>(grp);
            const __half2 *st = reinterpret_cast<const __half2 *>(grp + 2 * D);
            const uint32_t *codes = reinterpret_cast<const uint32_t *>(grp + 4 * D + (t % 32) * kTokRow);
            float dot[kMaxG] = {};
#pragma unroll 1
            for (int w = 0; w < D / 16; ++w) {
                const uint32_t word = codes[w];
#pragma unroll
                for (int k = 0; k < 16; k += 2) {
                    const int c = 16 * w + k;
                    const float2 l = __half22float2(lo[c / 2]), v = __half22float2(st[c / 2]);
                    const float y0 = (float)((word >> (2 * k)) & 3u) * v.x + l.x;
                    const float y1 = (float)((word >> (2 * k + 2)) & 3u) * v.y + l.y;
#pragma unroll
                    for (int h = 0; h < kMaxG; ++h)
                        if (h < G) dot[h] += q[h * D + c] * y0 + q[h * D + c + 1] * y1;
                }
            }
#pragma unroll
            for (int h = 0; h < kMaxG; ++h)
                if (h < G) s[h * kChunk + (t - t0)] = dot[h];
        }
    }

    // Values.
    __device__ static void accumulate(const uint8_t *blk, int n, int t0, int t1, const float *p,
                                      int G, float *acc, float *vt) {
        Values::accumulate(blk, n, t0, t1, p, G, acc, vt);
    }

    __device__ static void finish(const uint8_t *, int, int, float *, float *) {}

    // ---- tensor-core decode (decode_tiles.cuh) ----------------------------------------
    // Codes become exact f16 0..3 operands (codes2_to_half2). Keys: a group's per-channel s
    // folds into the query and Σ q·lo into the logit's base, once per 32-token group (a
    // warp's unit, staged in shared memory). Key slots of k-step s (word s of a token's codes): thread t takes channels
    // 16s + t, +8 (slots 2t, 2t+1) and 16s + t + 4, +12 (slots 2t+8, 2t+9), one mask each.
    // Values: m-tile m is word m % 2 of channel group m / 2, rows in channel order; a token's
    // s scales its probabilities for that group (P·s) and Σ p·lo adds to the group's channels.

    static constexpr bool kRotated = false;      // keys and values in the channel basis
    static constexpr bool kQueryPerUnit = true;  // the query folds each group's scales
    // CTAs per multiprocessor the tiled kernel is built for: at four (128 registers) the
    // fold spills, and batch-8 steps ran 10% slower on the H200 than at three.
    static constexpr int kTileCtasPerSm = 3;
    static constexpr int kValueGroups = Values::kGroups;
    __device__ static constexpr int value_group(int m) { return m / 2; }

    // Bytes a warp stages for the 32-token unit at u0 (a key group, or the value rows) as
    // {offset in the block, length}; offsets are 16-byte aligned.
    static constexpr int kKeyUnitBytes = kKeyGroup, kValueUnitBytes = 32 * Values::kRow;
    __device__ static int2 unit_span(int, int n, int u0, int role) {
        const int m = min(32, n - u0);
        return role == KEY ? make_int2((u0 / 32) * kKeyGroup, 4 * D + m * kTokRow)
                           : make_int2(u0 * Values::kRow, m * Values::kRow);
    }

    // Head qh's query for the key group of token u0; `rows` addresses the staged unit as the
    // block is addressed.
    __device__ static void mma_query(const float *qh, const float *, const uint8_t *rows, int u0, int lane,
                                     float (&qv)[D / 16][4], float &base) {
        const __half *lo = reinterpret_cast<const __half *>(rows + (int64_t)(u0 / 32) * kKeyGroup), *st = lo + D;
        const int t = lane & 3;
        base = 0.f;
#pragma unroll
        for (int s = 0; s < D / 16; ++s) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int c = 16 * s + t + key_slot(i);
                qv[s][i] = qh[c] * __half2float(st[c]);
                base += qh[c] * __half2float(lo[c]);
            }
        }
    }

    // Logits of tokens t0 + g, t0 + g + 8 for heads 2t, 2t + 1 (the query's C fragment).
    template <class Query>
    __device__ static void mma_key_logits(int, const Query &q, const float *, const float *, const uint8_t *,
                                          const uint8_t *rows, const uint8_t *, int n, int t0, int lane,
                                          float (&v)[4]) {
        const int g = lane >> 2, t = lane & 3;
        const uint8_t *codes = rows + (int64_t)(t0 / 32) * kKeyGroup + 4 * D;
        uint32_t w0[D / 16], w1[D / 16];
        load_words<kTokRow % 16 == 0>(codes + (min(t0 + g, n - 1) % 32) * kTokRow, w0);
        load_words<kTokRow % 16 == 0>(codes + (min(t0 + g + 8, n - 1) % 32) * kTokRow, w1);
        float part[4][4] = {};
#pragma unroll
        for (int s = 0; s < D / 16; ++s) {
            const uint32_t a[4] = {codes2_to_half2(w0[s], 2 * t), codes2_to_half2(w1[s], 2 * t),
                                   codes2_to_half2(w0[s], 2 * t + 8), codes2_to_half2(w1[s], 2 * t + 8)};
            mma_16816(part[s & 1], a, q.hi[s][0], q.hi[s][1]);
            mma_16816(part[2 + (s & 1)], a, q.lo[s][0], q.lo[s][1]);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e)
            v[e] = q.inv_scale[e & 1] * ((part[0][e] + part[1][e]) + (part[2][e] + part[3][e])) + q.base[e & 1];
    }

    // acc += V^T·(P·s) for tokens t0..t0+15 (p: probabilities of tokens g, g+8 x heads 2t,
    // 2t+1), lo_acc[group] += Σ p·lo per lane.
    __device__ static void mma_value_tile(int, const uint8_t *, const uint8_t *rows, const uint8_t *, int n, int t0,
                                          const float (&p)[4],
                                          float (&acc)[D / 16][4], float (&lo_acc)[kValueGroups][2],
                                          float *, int lane) {
        constexpr int kRow = Values::kRow, kGroupBytes = Values::kGroupBytes;
        const int g = lane >> 2, t = lane & 3;
        auto row = [&](int r) { return rows + (int64_t)min(t0 + r, n - 1) * kRow; };
        uint32_t b[kValueGroups][2];
        const uint8_t *rg = row(g), *rg8 = row(g + 8);
#pragma unroll
        for (int grp = 0; grp < kValueGroups; ++grp) {
            const float2 h0 = __half22float2(*reinterpret_cast<const __half2 *>(rg + grp * kGroupBytes));
            const float2 h8 = __half22float2(*reinterpret_cast<const __half2 *>(rg8 + grp * kGroupBytes));
            b[grp][0] = movmatrix_trans(half2_bits(p[0] * h0.y, p[1] * h0.y));
            b[grp][1] = movmatrix_trans(half2_bits(p[2] * h8.y, p[3] * h8.y));
            lo_acc[grp][0] += p[0] * h0.x + p[2] * h8.x;
            lo_acc[grp][1] += p[1] * h0.x + p[3] * h8.x;
        }
        const uint8_t *r0 = row(2 * t), *r1 = row(2 * t + 1), *r8 = row(2 * t + 8), *r9 = row(2 * t + 9);
#pragma unroll
        for (int m = 0; m < D / 16; ++m) {
            const int at = kGroupBytes * (m / 2) + Kivi2Codec::kHead + 4 * (m % 2);
            auto word = [&](const uint8_t *r) { return *reinterpret_cast<const uint32_t *>(r + at); };
            const uint32_t x0 = word(r0), x1 = word(r1), x8 = word(r8), x9 = word(r9);
            const uint32_t lo01 = __byte_perm(x0, x1, 0x5410), hi01 = __byte_perm(x0, x1, 0x7632);
            const uint32_t lo89 = __byte_perm(x8, x9, 0x5410), hi89 = __byte_perm(x8, x9, 0x7632);
            const uint32_t a[4] = {codes2_to_half2(lo01, 2 * g), codes2_to_half2(hi01, 2 * g),
                                   codes2_to_half2(lo89, 2 * g), codes2_to_half2(hi89, 2 * g)};
            mma_16816(acc[m], a, b[value_group(m)][0], b[value_group(m)][1]);
        }
    }
};

}  // namespace kvb
