// `q2_had` and `q4_had` (AKVQ-VL; src/kv/formats/q2_had.rs): per token a normalised
// Walsh-Hadamard rotation over power-of-two sub-blocks, then min-max over groups of 64 rotated
// values at BITS bits; protected (pivot) tokens stay unrotated f16 rows in the same block.
//
// Per-token transforms run one warp per token, channel c = lane + 32·j in register slot j.
// Every WHT sub-block (64, 32 or 16 long, starting at 0, 64 or 96) covers whole slots, or
// the low 16 lanes of one, so butterflies at distance h < 32 are lane shuffles and the others
// pairs of slots in one lane. Butterflies run h = 1, 2, 4, … as in the Rust `wht` (within a
// stage every value is written once, so the order inside a stage is free), then the same
// f32 scaling by 1/sqrt(len): rotated values, and so codes, match the CPU bit for bit.
//
// Exactness: products whose result is rounded or compared use __fmul_rn/__fadd_rn, which
// nvcc never contracts into an FMA (Rust never does). Bit-equality can still fail where
// the CPU and the GPU disagree on the sign of a zero group minimum or maximum (Rust's
// f32::min/max leave ±0 unspecified; only groups whose extreme is exactly ±0), and where the
// CPU refuses a block (an f16 overflow of LO, S or a protected value): the GPU cannot report
// that and stores ±inf.
//
// Blocks start 4-byte aligned (16 in the arena), and every section but the mask is a multiple
// of 4 bytes, so pairs and codes are read and written as 32-bit words.
#pragma once

#include "common.cuh"
#include "mma.cuh"

namespace kvb {

template <int D, int BITS>
struct FmtHad {
    static constexpr int kGroups = (D + 63) / 64;       // min-max groups per token
    static constexpr int kPrep = D + kGroups;           // rotated query, then its group sums
    static constexpr int kSlots = (D + 31) / 32;        // values per lane in a warp's token
    static constexpr int kLevels = (1 << BITS) - 1;
    static constexpr int kPerWord = 32 / BITS;          // codes per 32-bit word
    static constexpr int kWords = D / kPerWord;         // words of codes per token
    static constexpr int kCodesAt = 4 * kGroups;        // codes after the (LO, S) pairs
    static constexpr int kRec = kCodesAt + 4 * kWords;  // bytes of a quantized token
    static constexpr int kHeader = 4;
    static constexpr int kWarps = kThreads / 32;
    static constexpr unsigned kAll = 0xffffffffu;
    static_assert(D % 16 == 0 && (BITS == 2 || BITS == 4), "supported head dims and widths");

    // ---- geometry --------------------------------------------------------------------

    // The WHT sub-block holding channel c < D (pieces of D by its set bits, largest first):
    // its length is the highest bit where c and D differ, it starts at c without lower bits.
    // Plain bit arithmetic, so unrolled loops fold it to constants.
    __device__ static int sub_len(int c) { return 1 << (31 - __clz(D ^ c)); }
    __device__ static int sub_start(int c) { return c & ~(sub_len(c) - 1); }
    // Rust's `1.0 / (len as f32).sqrt()` for len = 2^k: 2^(-k/2) for even k; for odd k
    // f32(sqrt(len)) = 2^((k-1)/2)·f32(sqrt 2), and 1 / f32(sqrt 2) rounds to 0x1.6a09e6p-1
    // (power-of-two scalings are exact, so they commute with the rounding).
    __device__ static float inv_sqrt(int len) {
        int k = 31 - __clz(len);
        float p = __int_as_float((127 - k / 2) << 23);
        return k & 1 ? p * 0x1.6a09e6p-1f : p;
    }
    __host__ __device__ static constexpr int group_end(int g) { return 64 * g + 64 < D ? 64 * g + 64 : D; }

    struct Layout {
        int n_p;      // protected tokens
        int rows_at;  // byte offset of the protected rows
        int mask_at;  // byte offset of the token mask (when n_p > 0)
    };
    __device__ static Layout layout(const uint8_t *blk, int n) {
        int n_p = (int)*reinterpret_cast<const uint32_t *>(blk);
        int rows_at = kHeader + (n - n_p) * kRec;
        return {n_p, rows_at, rows_at + n_p * 2 * D};
    }

    __host__ __device__ static int64_t bytes(int n, int, int n_protected, QuantParams) {
        int n_p = n_protected < n ? n_protected : n;
        return kHeader + (int64_t)(n - n_p) * kRec + (int64_t)n_p * 2 * D + (n_p > 0 ? (n + 7) / 8 : 0);
    }

    __device__ static int64_t stored_bytes(const uint8_t *blk, int n, int role) {
        return bytes(n, role, (int)*reinterpret_cast<const uint32_t *>(blk), QuantParams{});
    }

    // Protected flags of tokens c0 + lane (a warp-wide ballot; false past n or without mask).
    __device__ static unsigned mask_run(const uint8_t *blk, const Layout &L, int n, int c0) {
        int t = c0 + (threadIdx.x & 31);
        bool on = L.n_p > 0 && t < n && ((blk[L.mask_at + (t >> 3)] >> (t & 7)) & 1);
        return __ballot_sync(kAll, on);
    }

    // Protected tokens before t0, by one warp (every lane gets it).
    __device__ static int protected_before(const uint8_t *blk, const Layout &L, int t0) {
        if (L.n_p == 0) return 0;
        const uint8_t *mask = blk + L.mask_at;
        int lane = threadIdx.x & 31, cnt = 0;
        for (int b = lane; b < (t0 >> 3); b += 32) cnt += __popc(mask[b]);
        if (lane == 0 && (t0 & 7)) cnt += __popc(mask[t0 >> 3] & ((1u << (t0 & 7)) - 1));
        return (int)__reduce_add_sync(kAll, (unsigned)cnt);
    }

    // ---- the rotation (a warp's token in slots) ---------------------------------------

    __device__ static void rotate(float (&v)[kSlots]) {
        const int lane = threadIdx.x & 31;
#pragma unroll
        for (int s = 0; s < 5; ++s) {
            const int h = 1 << s;
            const bool upper = lane & h;
#pragma unroll
            for (int j = 0; j < kSlots; ++j) {
                if (h < sub_len(32 * j)) {
                    float o = __shfl_xor_sync(kAll, v[j], h);
                    // (x[i], x[i+h]) <- (x[i] + x[i+h], x[i] - x[i+h]).
                    v[j] = upper ? o - v[j] : v[j] + o;
                }
            }
        }
#pragma unroll
        for (int s = 0; s < 3; ++s) {
            const int hs = 1 << s;  // distance in slots: h = 32·hs
#pragma unroll
            for (int j = 0; j + hs < kSlots; ++j) {
                if (32 * hs < sub_len(32 * j) && (((j - sub_start(32 * j) / 32) & hs) == 0)) {
                    float a = v[j], b = v[j + hs];
                    v[j] = a + b;
                    v[j + hs] = a - b;
                }
            }
        }
#pragma unroll
        for (int j = 0; j < kSlots; ++j) v[j] = __fmul_rn(v[j], inv_sqrt(sub_len(32 * j)));
    }

    __device__ static bool valid(int j) { return 32 * j + (threadIdx.x & 31) < D; }

    // ---- quantize and dequantize: a warp per token --------------------------------------

    // One quantized record from the warp's token in slots v (rotated here).
    __device__ static void write_record(float (&v)[kSlots], float clip, uint8_t *rec) {
        const int lane = threadIdx.x & 31;
        rotate(v);
        unsigned code[kSlots];
#pragma unroll
        for (int g = 0; g < kGroups; ++g) {
            float mn = INFINITY, mx = -INFINITY;
#pragma unroll
            for (int j = 2 * g; j < 2 * g + 2 && j < kSlots; ++j) {
                if (valid(j)) mn = fminf(mn, v[j]), mx = fmaxf(mx, v[j]);
            }
            mn = warp_min(mn);
            mx = warp_max(mx);
            // __fmul_rn keeps hi - lo in MinMax::make from fusing into an FMA.
            MinMax mm = MinMax::make(__fmul_rn(clip, mn), __fmul_rn(clip, mx), kLevels);
            if (lane == 0) {
                uint32_t pair = (uint32_t)__half_as_ushort(__float2half_rn(mm.lo)) |
                                ((uint32_t)__half_as_ushort(__float2half_rn(mm.step)) << 16);
                *reinterpret_cast<uint32_t *>(rec + 4 * g) = pair;
            }
#pragma unroll
            for (int j = 2 * g; j < 2 * g + 2 && j < kSlots; ++j)
                code[j] = valid(j) ? mm.code(v[j], kLevels) : 0u;
        }
        // Gather 32 / BITS consecutive channels' codes into one word (first code lowest).
        uint32_t *words = reinterpret_cast<uint32_t *>(rec + kCodesAt);
#pragma unroll
        for (int j = 0; j < kSlots; ++j) {
            uint32_t w = code[j] << (BITS * (lane % kPerWord));
#pragma unroll
            for (int o = 1; o < kPerWord; o <<= 1) w |= __shfl_xor_sync(kAll, w, o);
            if (lane % kPerWord == 0 && valid(j)) words[(32 * j + lane) / kPerWord] = w;
        }
    }

    // Tokens of the block in runs of 32, a warp per token of a run over kQuantParts CTAs: warp
    // w of CTA `part` takes token i = part·kWarps + w of every run, with the protected ones
    // before it counted from the run's flags. It loads the next run's token before it rotates
    // this one, so that its loads overlap its shuffles.
    static constexpr int kQuantParts = 32 / kWarps;
    __device__ static void quantize(Src x, int n, int, const uint8_t *protect, QuantParams p,
                                    uint8_t *out, float *, int part) {
        const int lane = threadIdx.x & 31, i = part * kWarps + (threadIdx.x >> 5);
        int n_p = 0;
        for (int c0 = 0; c0 < n; c0 += 32) {
            int t = c0 + lane;
            n_p += __popc(__ballot_sync(kAll, protect && t < n && protect[t]));
        }
        const int rows_at = kHeader + (n - n_p) * kRec;
        if (part == 0 && threadIdx.x == 0) *reinterpret_cast<uint32_t *>(out) = (uint32_t)n_p;
        if (part == 0 && n_p > 0) {
            uint8_t *mask = out + rows_at + n_p * 2 * D;
            for (int b = threadIdx.x; b < (n + 7) / 8; b += kThreads) {
                unsigned byte = 0;
                for (int k = 0; k < 8 && 8 * b + k < n; ++k) byte |= (protect[8 * b + k] ? 1u : 0u) << k;
                mask[b] = (uint8_t)byte;
            }
        }
        auto load = [&](int t, float (&v)[kSlots]) {
#pragma unroll
            for (int j = 0; j < kSlots; ++j) v[j] = t < n && valid(j) ? x.at(t, 32 * j + lane) : 0.f;
        };
        float next[kSlots];
        load(i, next);
        int m = 0;  // protected tokens before the run
        for (int c0 = 0; c0 < n; c0 += 32) {
            const int t = c0 + i;
            float v[kSlots];
#pragma unroll
            for (int j = 0; j < kSlots; ++j) v[j] = next[j];
            load(t + 32, next);
            const unsigned flags = __ballot_sync(kAll, protect && c0 + lane < n && protect[c0 + lane]);
            const int before = m + __popc(flags & ((1u << i) - 1));
            m += __popc(flags);
            if (t >= n) continue;
            if ((flags >> i) & 1) {
                __half *row = reinterpret_cast<__half *>(out + rows_at + before * 2 * D);
#pragma unroll
                for (int j = 0; j < kSlots; ++j)
                    if (valid(j)) row[32 * j + lane] = __float2half_rn(v[j]);
            } else {
                write_record(v, p.had_clip, out + kHeader + (t - before) * kRec);
            }
        }
    }

    __device__ static void dequantize(const uint8_t *blk, int n, int, __half *out, int64_t stride) {
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        const Layout L = layout(blk, n);
        int m = 0;
        for (int c0 = 0; c0 < n; c0 += 32) {
            unsigned flags = mask_run(blk, L, n, c0);
            for (int i = warp; i < 32 && c0 + i < n; i += kWarps) {
                const int t = c0 + i, before = m + __popc(flags & ((1u << i) - 1));
                __half *o = out + (int64_t)t * stride;
                if ((flags >> i) & 1) {
                    const __half *row = reinterpret_cast<const __half *>(blk + L.rows_at + before * 2 * D);
                    for (int c = lane; c < D; c += 32) o[c] = row[c];
                    continue;
                }
                const uint8_t *rec = blk + kHeader + (t - before) * kRec;
                float v[kSlots];
#pragma unroll
                for (int j = 0; j < kSlots; ++j) {
                    const int c = 32 * j + lane;
                    // As MinMax::value, unfused: code·S + LO.
                    v[j] = valid(j) ? __fadd_rn(__fmul_rn((float)code_at(rec + kCodesAt, c, BITS),
                                                          ld_f16(rec, 2 * (j / 2) + 1)),
                                                ld_f16(rec, 2 * (j / 2)))
                                    : 0.f;
                }
                rotate(v);
#pragma unroll
                for (int j = 0; j < kSlots; ++j)
                    if (valid(j)) o[32 * j + lane] = __float2half_rn(v[j]);
            }
            m += __popc(flags);
        }
    }

    // ---- attention ---------------------------------------------------------------------

    // q·R(ŷ) = (Rq)·ŷ (R symmetric, orthonormal): a warp per head rotates its query once per
    // block, then sums it per group for the LO terms.
    __device__ static void prepare(const uint8_t *, int, const float *q, int G, float *qt) {
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        for (int g = warp; g < G; g += kWarps) {
            float v[kSlots];
#pragma unroll
            for (int j = 0; j < kSlots; ++j) v[j] = valid(j) ? q[g * D + 32 * j + lane] : 0.f;
            rotate(v);
            float *w = qt + g * kPrep;
#pragma unroll
            for (int j = 0; j < kSlots; ++j)
                if (valid(j)) w[32 * j + lane] = v[j];
#pragma unroll
            for (int grp = 0; grp < kGroups; ++grp) {
                float sum = 0.f;
#pragma unroll
                for (int j = 2 * grp; j < 2 * grp + 2 && j < kSlots; ++j) sum += valid(j) ? v[j] : 0.f;
                sum = warp_sum(sum);
                if (lane == 0) w[D + grp] = sum;
            }
        }
    }

    // Code i of a word, as a float (exact: 2^23 + code, minus 2^23).
    __device__ static float code_f(uint32_t w, int i) {
        return __uint_as_float(0x4b000000u | ((w >> (BITS * i)) & kLevels)) - 8388608.f;
    }

    // Thread per token: Σ_grp S·(q'·codes) + LO·Σ q' over its groups, or q·row when protected.
    __device__ static void scores(const uint8_t *blk, int n, int t0, int t1, const float *q,
                                  const float *qt, int G, float *s) {
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        const Layout L = layout(blk, n);
        int m = protected_before(blk, L, t0);
        for (int c0 = t0; c0 < t1; c0 += 32) {
            const unsigned flags = mask_run(blk, L, n, c0);
            const int t = c0 + lane, before = m + __popc(flags & ((1u << lane) - 1));
            m += __popc(flags);
            if (((c0 - t0) >> 5) % kWarps != warp || t >= t1) continue;
            float *st = s + (t - t0);
            if ((flags >> lane) & 1) {
                const __half2 *row = reinterpret_cast<const __half2 *>(blk + L.rows_at + before * 2 * D);
                for (int g = 0; g < G; ++g) {
                    const float *qg = q + g * D;
                    float dot = 0.f;
#pragma unroll 8
                    for (int c = 0; c < D / 2; ++c) {
                        float2 r = __half22float2(row[c]);
                        dot += qg[2 * c] * r.x + qg[2 * c + 1] * r.y;
                    }
                    st[g * kChunk] = dot;
                }
                continue;
            }
            // Group by group (one group's codes live in registers), every head, partial sums in s.
            const uint8_t *rec = blk + kHeader + (t - before) * kRec;
            const uint32_t *words = reinterpret_cast<const uint32_t *>(rec + kCodesAt);
#pragma unroll
            for (int grp = 0; grp < kGroups; ++grp) {
                constexpr int kMaxW = 64 / kPerWord;
                const int k0 = 64 * grp / kPerWord, nw = (group_end(grp) - 64 * grp) / kPerWord;
                uint32_t w[kMaxW];
#pragma unroll
                for (int k = 0; k < kMaxW; ++k) w[k] = k < nw ? words[k0 + k] : 0u;
                const float2 pr = __half22float2(reinterpret_cast<const __half2 *>(rec)[grp]);
#pragma unroll 1
                for (int g = 0; g < G; ++g) {
                    const float *qg = qt + g * kPrep;
                    float dg = 0.f;
#pragma unroll
                    for (int k = 0; k < kMaxW; ++k) {
#pragma unroll
                        for (int i = 0; i < kPerWord; ++i) {
                            if (k < nw) dg += qg[(k0 + k) * kPerWord + i] * code_f(w[k], i);
                        }
                    }
                    const float part = pr.y * dg + pr.x * qg[D + grp];
                    st[g * kChunk] = grp == 0 ? part : st[g * kChunk] + part;
                }
            }
        }
    }

    // Thread per channel, tokens in order, heads four at a time (one decode per token and
    // four heads): quantized tokens add p·ŷ into vt (rotated basis), protected rows p·row into
    // acc.
    __device__ static void accumulate(const uint8_t *blk, int n, int t0, int t1, const float *p,
                                      int G, float *acc, float *vt) {
        constexpr int kHeads = 4;
        const Layout L = layout(blk, n);
        const int base = protected_before(blk, L, t0);
        for (int c = threadIdx.x; c < D; c += kThreads) {
            const int grp = c / 64;
            for (int g0 = 0; g0 < G; g0 += kHeads) {
                float av[kHeads] = {}, aa[kHeads] = {};
                int m = base;  // protected tokens before t
                for (int t = t0; t < t1; ++t) {
                    const bool prot = L.n_p > 0 && ((blk[L.mask_at + (t >> 3)] >> (t & 7)) & 1);
                    float y;
                    if (prot) {
                        y = __half2float(reinterpret_cast<const __half *>(blk + L.rows_at + m * 2 * D)[c]);
                        ++m;
                    } else {
                        const uint8_t *rec = blk + kHeader + (t - m) * kRec;
                        y = (float)code_at(rec + kCodesAt, c, BITS) * ld_f16(rec, 2 * grp + 1) +
                            ld_f16(rec, 2 * grp);
                    }
                    const float *pt = p + (t - t0);
#pragma unroll
                    for (int k = 0; k < kHeads; ++k) {
                        if (g0 + k < G) {
                            float py = pt[(g0 + k) * kChunk] * y;
                            if (prot) aa[k] += py;
                            else av[k] += py;
                        }
                    }
                }
#pragma unroll
                for (int k = 0; k < kHeads; ++k) {
                    if (g0 + k < G) {
                        vt[(g0 + k) * D + c] += av[k];
                        acc[(g0 + k) * D + c] += aa[k];
                    }
                }
            }
        }
    }

    // Rotate each head's vt back into acc (a warp per head) and clear it for the next block.
    __device__ static void finish(const uint8_t *, int, int G, float *acc, float *vt) {
        const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
        for (int g = warp; g < G; g += kWarps) {
            float v[kSlots];
#pragma unroll
            for (int j = 0; j < kSlots; ++j) v[j] = valid(j) ? vt[g * D + 32 * j + lane] : 0.f;
            rotate(v);
#pragma unroll
            for (int j = 0; j < kSlots; ++j) {
                if (valid(j)) {
                    acc[g * D + 32 * j + lane] += v[j];
                    vt[g * D + 32 * j + lane] = 0.f;
                }
            }
        }
    }
    // ---- tensor-core decode (decode_tiles.cuh), 2-bit codes ----------------------------
    // Keys: the query is rotated once per work item (q·R(ŷ) = (Rq)·ŷ). Codes become exact f16
    // 0..3 operands in kivi2's key slot order (k-step s is word s; thread t takes channels
    // 16s + t, +8, +4, +12), one accumulator pair per group of 64 channels, scaled per token by
    // S, plus LO·Σ_group Rq. Values accumulate in the rotated basis (m-tile m is word m, rows
    // in channel order; P·S per group, Σ p·LO per lane), rotated back once per work item.
    // Records come from the warp's staged unit (`rows` addresses it as the block is
    // addressed) in blocks without protected tokens; blocks with some are read from global
    // memory, where the MMAs see protected tokens with S = LO = 0 and the warp adds their
    // logits q·row (unrotated query) and values R(row).

    static constexpr bool kRotated = true;
    static constexpr bool kQueryPerUnit = false;  // one rotated query serves every block
    // CTAs per multiprocessor the tiled kernel is built for: four (128 registers) run the
    // 4 x 132 work items of a batch-1 step in one wave; faster at every size on the H200.
    static constexpr int kTileCtasPerSm = 4;
    static constexpr int kValueGroups = kGroups;
    __device__ static constexpr int value_group(int m) { return m / 4; }

    // The protected tokens of the tile at t0 (bit r: token t0 + r, tokens < n only) and how
    // many come before it; warp-uniform.
    struct TileRanks {
        unsigned prot;
        int before;
        // The record of token t0 + r when it is quantized (else of the next quantized token,
        // which may lie past the records: still inside the block, read with S = 0).
        __device__ int record(int t0, int r) const { return t0 + r - before - __popc(prot & ((1u << r) - 1)); }
        // The protected row of token t0 + r when it is protected.
        __device__ int row(int r) const { return before + __popc(prot & ((1u << r) - 1)); }
    };
    __device__ static TileRanks tile_ranks(const uint8_t *blk, const Layout &L, int n, int t0) {
        if (L.n_p == 0) return {0u, 0};
        const uint8_t *mask = blk + L.mask_at + (t0 >> 3);
        const unsigned bits = mask[0] | (t0 + 8 < n ? (unsigned)mask[1] << 8 : 0u);
        const unsigned valid = n - t0 >= 16 ? 0xffffu : (1u << (n - t0)) - 1;
        return {bits & valid, protected_before(blk, L, t0)};
    }

    // (LO, S) of group grp of token t0 + r, zero when protected.
    __device__ static float2 lo_step(const uint8_t *rows, const TileRanks &tr, int t0, int r, int grp) {
        if ((tr.prot >> r) & 1) return make_float2(0.f, 0.f);
        const uint8_t *rec = rows + kHeader + (int64_t)tr.record(t0, r) * kRec;
        return __half22float2(reinterpret_cast<const __half2 *>(rec)[grp]);
    }

    // Bytes a warp stages for the 32-token unit at u0 as {offset in the block, length}: its
    // records from the 16-byte boundary below them, as they lie in a block without protected
    // tokens (the tile code reads a block with some from global memory).
    static constexpr int kKeyUnitBytes = 32 * kRec + 16, kValueUnitBytes = kKeyUnitBytes;
    __device__ static int2 unit_span(int, int n, int u0, int) {
        const int from = kHeader + u0 * kRec, to = kHeader + min(n, u0 + 32) * kRec;
        return make_int2(from & ~15, to - (from & ~15));
    }

    __device__ static void mma_query(const float *, const float *qr, const uint8_t *, int, int lane,
                                     float (&qv)[D / 16][4], float &base) {
        const int t = lane & 3;
#pragma unroll
        for (int s = 0; s < D / 16; ++s)
#pragma unroll
            for (int i = 0; i < 4; ++i) qv[s][i] = qr[16 * s + t + key_slot(i)];
        base = 0.f;
    }

    // Logits of tokens t0 + g, t0 + g + 8 for heads 2t, 2t + 1. qs: the unrotated query and
    // qsum[head][group] the group sums of the rotated one, both [8] heads.
    // hdr: the block's first bytes, staged with the unit (n_p says whether `rows` holds it).
    template <class Query>
    __device__ static void mma_key_logits(int, const Query &q, const float *qs, const float *qsum, const uint8_t *blk,
                                          const uint8_t *rows, const uint8_t *hdr, int n, int t0, int lane,
                                          float (&v)[4]) {
        if (*reinterpret_cast<const uint32_t *>(hdr) == 0) key_logits<true>(q, qs, qsum, blk, rows, n, t0, lane, v);
        else key_logits<false>(q, qs, qsum, blk, blk, n, t0, lane, v);
    }

    // kPlain: no protected tokens, records in `rows`; else everything from the block.
    template <bool kPlain, class Query>
    __device__ static void key_logits(const Query &q, const float *qs, const float *qsum, const uint8_t *blk,
                                      const uint8_t *rows, int n, int t0, int lane, float (&v)[4]) {
        const int g = lane >> 2, t = lane & 3;
        const Layout L = kPlain ? Layout{0, 0, 0} : layout(blk, n);
        const TileRanks tr = kPlain ? TileRanks{0u, 0} : tile_ranks(blk, L, n, t0);
        const int ra = min(g, n - 1 - t0), rb = min(g + 8, n - 1 - t0);
        uint32_t wa[kWords], wb[kWords];
        load_words<false>(rows + kHeader + (int64_t)tr.record(t0, ra) * kRec + kCodesAt, wa);
        load_words<false>(rows + kHeader + (int64_t)tr.record(t0, rb) * kRec + kCodesAt, wb);
        float part[kGroups][2][4] = {};
#pragma unroll
        for (int s = 0; s < D / 16; ++s) {
            uint32_t a[4];
            key_frag(wa, wb, s, t, a);
            mma_16816(part[s / 4][0], a, q.hi[s][0], q.hi[s][1]);
            mma_16816(part[s / 4][1], a, q.lo[s][0], q.lo[s][1]);
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) v[e] = 0.f;
#pragma unroll
        for (int grp = 0; grp < kGroups; ++grp) {
            const float2 pa = lo_step(rows, tr, t0, ra, grp), pb = lo_step(rows, tr, t0, rb, grp);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float2 pr = e < 2 ? pa : pb;
                v[e] += pr.y * q.inv_scale[e & 1] * (part[grp][0][e] + part[grp][1][e]) +
                        pr.x * qsum[(2 * t + (e & 1)) * kGroups + grp];
            }
        }
        // Protected tokens: q·row by the warp, every head, lanes across channels.
        for (unsigned left = tr.prot; !kPlain && left; left &= left - 1) {
            const int r = __ffs(left) - 1;
            const __half *row = reinterpret_cast<const __half *>(blk + L.rows_at + (int64_t)tr.row(r) * 2 * D);
            float y[kSlots];
#pragma unroll
            for (int j = 0; j < kSlots; ++j) y[j] = valid(j) ? __half2float(row[32 * j + lane]) : 0.f;
#pragma unroll
            for (int h = 0; h < 8; ++h) {
                float d = 0.f;
#pragma unroll
                for (int j = 0; j < kSlots; ++j)
                    if (valid(j)) d += qs[h * D + 32 * j + lane] * y[j];
                d = warp_sum(d);
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (g == (r & 7) && e >> 1 == r >> 3 && h == 2 * t + (e & 1)) v[e] = d;
            }
        }
    }

    // The A fragment of k-step s (channels 16s..16s+15) of the tokens whose code words are wa
    // (rows g) and wb (rows g + 8). At either width, slots 2t, 2t+1 hold channels 16s + t, +8
    // and slots 2t+8, 2t+9 channels 16s + t + 4, +12, so one query serves both widths.
    __device__ static void key_frag(const uint32_t (&wa)[kWords], const uint32_t (&wb)[kWords], int s, int t,
                                    uint32_t (&a)[4]) {
        if constexpr (BITS == 2) {
            a[0] = codes2_to_half2(wa[s], 2 * t), a[1] = codes2_to_half2(wb[s], 2 * t);
            a[2] = codes2_to_half2(wa[s], 2 * t + 8), a[3] = codes2_to_half2(wb[s], 2 * t + 8);
        } else {
            // Word 2s holds channels 16s..16s+7, word 2s+1 the next eight: their low halves
            // side by side hold channels t, t + 8 at bit 4t; their high halves t + 4, t + 12.
            a[0] = codes4_to_half2(__byte_perm(wa[2 * s], wa[2 * s + 1], 0x5410), 4 * t);
            a[1] = codes4_to_half2(__byte_perm(wb[2 * s], wb[2 * s + 1], 0x5410), 4 * t);
            a[2] = codes4_to_half2(__byte_perm(wa[2 * s], wa[2 * s + 1], 0x7632), 4 * t);
            a[3] = codes4_to_half2(__byte_perm(wb[2 * s], wb[2 * s + 1], 0x7632), 4 * t);
        }
    }

    // The A fragment of value m-tile m (rows: channels 16m + g, +8; columns: tokens 2t, 2t+1,
    // then 2t+8, 2t+9) from the codes of those four tokens.
    __device__ static void value_frag(const uint8_t *r0, const uint8_t *r1, const uint8_t *r8, const uint8_t *r9,
                                      int m, int g, uint32_t (&a)[4]) {
        auto word = [](const uint8_t *r, int i) { return reinterpret_cast<const uint32_t *>(r)[i]; };
        if constexpr (BITS == 2) {
            const uint32_t x0 = word(r0, m), x1 = word(r1, m), x8 = word(r8, m), x9 = word(r9, m);
            a[0] = codes2_to_half2(__byte_perm(x0, x1, 0x5410), 2 * g);
            a[1] = codes2_to_half2(__byte_perm(x0, x1, 0x7632), 2 * g);
            a[2] = codes2_to_half2(__byte_perm(x8, x9, 0x5410), 2 * g);
            a[3] = codes2_to_half2(__byte_perm(x8, x9, 0x7632), 2 * g);
        } else {
            // Channel 16m + g is code g of word 2m (16m + 8 + g: of word 2m + 1), in the low
            // half for g < 4.
            const uint32_t sel = g < 4 ? 0x5410u : 0x7632u;
            const int at = 4 * (g & 3);
            a[0] = codes4_to_half2(__byte_perm(word(r0, 2 * m), word(r1, 2 * m), sel), at);
            a[1] = codes4_to_half2(__byte_perm(word(r0, 2 * m + 1), word(r1, 2 * m + 1), sel), at);
            a[2] = codes4_to_half2(__byte_perm(word(r8, 2 * m), word(r9, 2 * m), sel), at);
            a[3] = codes4_to_half2(__byte_perm(word(r8, 2 * m + 1), word(r9, 2 * m + 1), sel), at);
        }
    }

    // acc += V̂^T·(P·S) for tokens t0..t0+15 in the rotated basis, lo_acc[group] += Σ p·LO per
    // lane; protected tokens add p·R(row) through the warp's `scratch` (D floats).
    __device__ static void mma_value_tile(int, const uint8_t *blk, const uint8_t *rows, const uint8_t *hdr, int n, int t0,
                                          const float (&p)[4], float (&acc)[D / 16][4],
                                          float (&lo_acc)[kValueGroups][2], float *scratch, int lane) {
        if (*reinterpret_cast<const uint32_t *>(hdr) == 0) value_tile<true>(blk, rows, n, t0, p, acc, lo_acc, scratch, lane);
        else value_tile<false>(blk, blk, n, t0, p, acc, lo_acc, scratch, lane);
    }

    template <bool kPlain>
    __device__ static void value_tile(const uint8_t *blk, const uint8_t *rows, int n, int t0, const float (&p)[4],
                                      float (&acc)[D / 16][4], float (&lo_acc)[kValueGroups][2], float *scratch,
                                      int lane) {
        const int g = lane >> 2, t = lane & 3;
        const Layout L = kPlain ? Layout{0, 0, 0} : layout(blk, n);
        const TileRanks tr = kPlain ? TileRanks{0u, 0} : tile_ranks(blk, L, n, t0);
        auto clamp = [&](int r) { return min(r, n - 1 - t0); };
        uint32_t b[kGroups][2];
#pragma unroll
        for (int grp = 0; grp < kGroups; ++grp) {
            const float2 h0 = lo_step(rows, tr, t0, clamp(g), grp), h8 = lo_step(rows, tr, t0, clamp(g + 8), grp);
            b[grp][0] = movmatrix_trans(half2_bits(p[0] * h0.y, p[1] * h0.y));
            b[grp][1] = movmatrix_trans(half2_bits(p[2] * h8.y, p[3] * h8.y));
            lo_acc[grp][0] += p[0] * h0.x + p[2] * h8.x;
            lo_acc[grp][1] += p[1] * h0.x + p[3] * h8.x;
        }
        auto codes = [&](int r) { return rows + kHeader + (int64_t)tr.record(t0, clamp(r)) * kRec + kCodesAt; };
        const uint8_t *r0 = codes(2 * t), *r1 = codes(2 * t + 1), *r8 = codes(2 * t + 8), *r9 = codes(2 * t + 9);
#pragma unroll
        for (int m = 0; m < D / 16; ++m) {
            uint32_t a[4];
            value_frag(r0, r1, r8, r9, m, g, a);
            mma_16816(acc[m], a, b[value_group(m)][0], b[value_group(m)][1]);
        }
        for (unsigned left = tr.prot; !kPlain && left; left &= left - 1) {
            const int r = __ffs(left) - 1;
            const __half *row = reinterpret_cast<const __half *>(blk + L.rows_at + (int64_t)tr.row(r) * 2 * D);
            float y[kSlots];
#pragma unroll
            for (int j = 0; j < kSlots; ++j) y[j] = valid(j) ? __half2float(row[32 * j + lane]) : 0.f;
            rotate(y);
#pragma unroll
            for (int j = 0; j < kSlots; ++j)
                if (valid(j)) scratch[32 * j + lane] = y[j];
            __syncwarp();
            const int src = 4 * (r & 7) + t;
            const float p0 = __shfl_sync(kAll, r < 8 ? p[0] : p[2], src);
            const float p1 = __shfl_sync(kAll, r < 8 ? p[1] : p[3], src);
#pragma unroll
            for (int m = 0; m < D / 16; ++m) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const float x = scratch[16 * m + g + 8 * h];
                    acc[m][2 * h] += p0 * x;
                    acc[m][2 * h + 1] += p1 * x;
                }
            }
            __syncwarp();
        }
    }
};

template <int D>
using FmtQ2Had = FmtHad<D, 2>;
template <int D>
using FmtQ4Had = FmtHad<D, 4>;

// The tiled kernel's view of an AKVQ cache: q2_had blocks (visual tokens) beside q4_had ones
// (text). One rotation and one query serve both widths; each block's format picks its tile
// code, and stages are sized for the wider.
template <int D>
struct FmtHadMix : FmtQ2Had<D> {
    using Q2 = FmtQ2Had<D>;
    using Q4 = FmtQ4Had<D>;
    // Both widths' tile code in one kernel: 168 registers at three CTAs per multiprocessor.
    static constexpr int kTileCtasPerSm = 3;
    static constexpr int kKeyUnitBytes = Q4::kKeyUnitBytes, kValueUnitBytes = Q4::kValueUnitBytes;

    __device__ static int2 unit_span(int fmt, int n, int u0, int role) {
        return fmt == Q4_HAD ? Q4::unit_span(fmt, n, u0, role) : Q2::unit_span(fmt, n, u0, role);
    }
    template <class Query, class... Args>
    __device__ static void mma_key_logits(int fmt, const Query &q, Args &&...args) {
        if (fmt == Q4_HAD) Q4::mma_key_logits(fmt, q, args...);
        else Q2::mma_key_logits(fmt, q, args...);
    }
    template <class... Args>
    __device__ static void mma_value_tile(int fmt, Args &&...args) {
        if (fmt == Q4_HAD) Q4::mma_value_tile(fmt, args...);
        else Q2::mma_value_tile(fmt, args...);
    }
};

}  // namespace kvb
