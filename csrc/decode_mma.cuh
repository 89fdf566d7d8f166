// Tensor-core decode attention for work whose blocks hold keys and values as f16 or q1_calib,
// head dims up to 128 and up to 8 query heads per KV head (every preset shape we benchmark).
// Other work takes the generic kernels in kernels.cu.
//
// Per work item a CTA of kWarps warps (LOCAL: eight, on sm_90 possibly two CTAs); warp w takes
// blocks w, w + kWarps, ... of the item (of an item of few blocks, every kWarps-th chunk) and
// streams them through two shared-memory stages with cp.async (the next chunk is in flight
// while this one is computed). Per 16-token tile, with tokens as the MMA rows and the G query
// heads as its 8 columns:
//   scores  S[tok][head] = K[tok][ch] · Q[ch][head]   (k-steps over channels)
//   values  O[ch][head] += V[ch][tok] · P[tok][head]  (m-tiles over channels, P by movmatrix)
// Code bits expand to exact f16 0/1; the query (with the softmax scale and, for q1_calib
// keys, the block's hi − lo folded in) is split into f16 hi + lo parts scaled by a power of
// two, so scores keep about 22 bits; P is rounded to f16 once and the softmax sum counts the
// rounded values, so the output is a convex combination of exactly what was multiplied.
// Partial (max, sum, acc) per item go to the scratch layout of the generic kernel, and
// combine_kernel merges them.
//
// CalibQuant spans: the RANGE instance of the same kernel scores the calibrated blocks only
// and records each span's logit range (keys only, no values read); the main pass then maps
// logits affinely per span. A span that is one work item instead runs the LOCAL instance,
// which keeps the span's logits on chip (see Pass).
#pragma once

#include <cooperative_groups.h>

#include "f16.cu"
#include "mma.cuh"
#include "q1_calib.cu"

namespace kvb {

// The CTAs sharing a LOCAL work item: a thread block cluster on sm_90, whose distributed
// shared memory carries the span's logit range and the partial results between them; one CTA
// elsewhere.
struct ItemCtas {
    __device__ static int count() {
#if __CUDA_ARCH__ >= 900
        return (int)cooperative_groups::this_cluster().num_blocks();
#else
        return 1;
#endif
    }
    __device__ static int rank() {
#if __CUDA_ARCH__ >= 900
        return (int)cooperative_groups::this_cluster().block_rank();
#else
        return 0;
#endif
    }
    // Every thread of every CTA of the item, with their shared-memory writes.
    __device__ static void sync() {
#if __CUDA_ARCH__ >= 900
        cooperative_groups::this_cluster().sync();
#else
        __syncthreads();
#endif
    }
    // `p` in the shared memory of CTA r of the item.
    template <class T>
    __device__ static T *of(T *p, int r) {
#if __CUDA_ARCH__ >= 900
        return cooperative_groups::this_cluster().map_shared_rank(p, r);
#else
        return p;
#endif
    }
};

template <int D, int W = 4>
struct MmaDecode {
    static constexpr int kSteps = D / 16;
    static constexpr int kWarps = W;
    static constexpr int kHeads = 8;                // query heads per KV head, one n-tile
    static constexpr int kScales = 8 * D;           // K then V lo[D], hi[D] at a stage's head
    static constexpr int kQBytes = 4 * kHeads * D;  // the scaled query, f32
    static constexpr unsigned kAll = 0xffffffffu;
    // Tokens of bits a stage holds: a whole 128-token block at four warps; at eight (LOCAL),
    // half of one, so that two CTAs' stages and span logits fit one multiprocessor. Warps
    // sharing a block take it kSharedTokens at a time.
    static constexpr int kBitTokens = W == 4 ? 128 : 64;
    static constexpr int kSharedTokens = 32;

    // Bytes of one stage: the scales, then the rows of `parts` (1: keys or values, 2: both)
    // for 16 tokens where f16 rows may come (8.7 KB at D = 128, both parts), else
    // kBitTokens tokens of bits. Small stages leave room for more CTAs per multiprocessor.
    __host__ __device__ static int stage_size(bool has_f16, int parts) {
        const int row = parts * (has_f16 ? 2 * D + 16 : D / 8);
        return kScales + (has_f16 ? 16 : kBitTokens) * row;
    }
    // Single-pass calibration keeps every logit of the item's span: [tokens][8 heads] f32.
    static constexpr int kLocalTokens = KVB_CUDA_LOCAL_SPAN_TOKENS;
    static constexpr size_t kLogitBytes = sizeof(float) * kLocalTokens * kHeads;
    static constexpr size_t kRangeBytes = sizeof(float) * kWarps * kHeads * 2;
    // Shared memory: the query, the warps' stages (which write_partial reuses to merge the
    // warps), then with LOCAL the span's logits and ranges.
    __host__ __device__ static int stages_bytes(int stage_sz) {
        const int stages = kWarps * 2 * stage_sz, merge = (int)sizeof(float) * kWarps * kHeads * (D + 2);
        return stages > merge ? stages : merge;
    }
    static size_t smem_bytes(bool has_f16, int parts, bool local) {
        return kQBytes + stages_bytes(stage_size(has_f16, parts)) + (local ? kLogitBytes + kRangeBytes : 0);
    }

    __device__ static int row_bytes(int fmt) {
        return fmt == F16 ? FmtF16<D>::kSmemRow : FmtQ1Calib<D>::kSmemRow;
    }

    // Which rows a sweep stages: keys, values or both.
    enum Parts : int { kKeys = 1, kValues = 2, kBoth = 3 };

    struct Chunk {
        int b;     // index into args.blocks; -1 past the end
        int c0;    // first token of the chunk in the block
        int len;   // tokens in the chunk
        int cap;   // tokens the stage holds for this block's formats (sets where V rows start)
        int tok0;  // the block's first token, counted from the work item's first
        kvb_cuda_block blk;
    };

    // The warps working on one item (a CTA's, or with LOCAL a cluster's): this one, how many.
    struct Team {
        int warp, warps;
    };
    // Whether the warps of an item take its chunks in turn instead of whole blocks each: in
    // items of few blocks (a quarter block per warp or less), and in f16 caches where whole
    // blocks would not share out evenly (a warp prepares an f16 query once; one entering a
    // quantized block prepares the query for it, so sharing larger items of those costs more
    // than it gains). Items of two f16 blocks had left half the warps idle; sharing every f16
    // item made long ones 7% slower (each warp then walks every block's descriptor).
    __device__ static bool shares_blocks(const kvb_cuda_decode_args &a, const kvb_cuda_work &w, int warps) {
        return 4 * w.n_blocks <= warps || (a.formats_used == 1u << F16 && w.n_blocks % warps != 0);
    }

    // First chunk of the first block this sweep reads (with kCalibOnly, calibrated blocks
    // only) among item-relative blocks rel, rel + skip, ...
    template <int kParts, bool kCalibOnly>
    __device__ static Chunk block_chunk(const kvb_cuda_decode_args &a, const kvb_cuda_work &w, int rel, int skip,
                                       int stage, const Team &team) {
        for (; rel < w.n_blocks; rel += skip) {
            const kvb_cuda_block blk = a.blocks[w.first_block + rel];
            if (kCalibOnly && blk.span < 0) continue;
            // Key and value sweeps of one block cut it alike (LOCAL's value sweep reads the
            // logits its key sweep left): a token's rows take twice the wider of K and V.
            const int wider = max(row_bytes(blk.k_format), row_bytes(blk.v_format));
            int cap = ((stage - kScales) / (kParts == kBoth ? 2 * wider : wider)) & ~15;
            if (shares_blocks(a, w, team.warps)) cap = min(cap, kSharedTokens);
            int tok0 = 0;
            for (int i = 0; i < rel; ++i) tok0 += a.blocks[w.first_block + i].n;
            return {w.first_block + rel, 0, min(blk.n, cap), cap, tok0, blk};
        }
        return {-1, 0, 0, 0, 0, {}};
    }

    // The chunk k chunks after c among every chunk the sweep reads, in the item's order.
    template <int kParts, bool kCalibOnly>
    __device__ static Chunk chunk_after(const kvb_cuda_decode_args &a, const kvb_cuda_work &w, Chunk c, int k,
                                        int stage, const Team &team) {
        while (c.b >= 0 && k > 0) {
            const int left = (c.blk.n - c.c0 - 1) / c.cap;  // chunks after c in its block
            if (k <= left) {
                c.c0 += k * c.cap;
                c.len = min(c.blk.n - c.c0, c.cap);
                return c;
            }
            k -= left + 1;
            c = block_chunk<kParts, kCalibOnly>(a, w, c.b - w.first_block + 1, 1, stage, team);
        }
        return c;
    }

    // A warp's chunks: where the warps share blocks (shares_blocks), every team.warps-th
    // chunk; else every chunk of blocks warp, warp + warps, ...
    template <int kParts, bool kCalibOnly>
    __device__ static Chunk first_chunk(const kvb_cuda_decode_args &a, const kvb_cuda_work &w, const Team &team,
                                        int stage) {
        if (!shares_blocks(a, w, team.warps))
            return block_chunk<kParts, kCalibOnly>(a, w, team.warp, team.warps, stage, team);
        const Chunk first = block_chunk<kParts, kCalibOnly>(a, w, 0, 1, stage, team);
        return chunk_after<kParts, kCalibOnly>(a, w, first, team.warp, stage, team);
    }
    template <int kParts, bool kCalibOnly>
    __device__ static Chunk next_chunk(const kvb_cuda_decode_args &a, const kvb_cuda_work &w, const Chunk &c,
                                       const Team &team, int stage) {
        if (shares_blocks(a, w, team.warps)) return chunk_after<kParts, kCalibOnly>(a, w, c, team.warps, stage, team);
        if (c.c0 + c.len < c.blk.n) return chunk_after<kParts, kCalibOnly>(a, w, c, 1, stage, team);
        return block_chunk<kParts, kCalibOnly>(a, w, c.b - w.first_block + team.warps, team.warps, stage, team);
    }

    __device__ static void copy_bytes(uint8_t *dst, const uint8_t *src, int bytes, int lane) {
        for (int p = lane; 16 * p < bytes; p += 32) cp_async16(dst + 16 * p, src + 16 * p, 16);
    }

    // Where a stage's value rows start.
    template <int kParts>
    __device__ static int values_at(const Chunk &c) {
        return kScales + (kParts & kKeys ? c.cap * row_bytes(c.blk.k_format) : 0);
    }

    // Start the copies of chunk `c` into stage `st` (asynchronous; the caller commits):
    // K scales at 0, V scales at 4D, then the rows.
    template <int kParts>
    __device__ static void stage(uint8_t *st, const uint8_t *arena, const Chunk &c, int lane) {
        if (kParts & kKeys) {
            const uint8_t *kb = arena + c.blk.k_offset;
            if (c.blk.k_format == Q1_CALIB) {
                copy_bytes(st, kb, 4 * D, lane);
                FmtQ1Calib<D>::stage_rows(st + kScales, kb, c.c0, c.len, lane);
            } else {
                FmtF16<D>::stage_rows(st + kScales, kb, c.c0, c.len, lane);
            }
        }
        if (kParts & kValues) {
            const uint8_t *vb = arena + c.blk.v_offset;
            uint8_t *vrows = st + values_at<kParts>(c);
            if (c.blk.v_format == Q1_CALIB) {
                copy_bytes(st + 4 * D, vb, 4 * D, lane);
                FmtQ1Calib<D>::stage_rows(vrows, vb, c.c0, c.len, lane);
            } else {
                FmtF16<D>::stage_rows(vrows, vb, c.c0, c.len, lane);
            }
        }
    }

    // One warp's chunks of a work item through two stages (the next chunk's copies are in
    // flight while this one is used): start(stage, chunk) where the warp enters a block,
    // tile(stage, chunk, t0) per 16 tokens, end(stage, chunk) where it leaves it.
    template <int kParts, bool kCalibOnly, typename Start, typename Tile, typename End>
    __device__ static void sweep(const kvb_cuda_decode_args &a, const kvb_cuda_work &w, uint8_t *stages,
                                 int stage_sz, const Team &team, int lane, Start &&start, Tile &&tile, End &&end) {
        Chunk cur = first_chunk<kParts, kCalibOnly>(a, w, team, stage_sz);
        if (cur.b >= 0) stage<kParts>(stages, a.arena, cur, lane);
        cp_async_commit();
        int slot = 0, entered = -1;
        while (cur.b >= 0) {
            const Chunk nxt = next_chunk<kParts, kCalibOnly>(a, w, cur, team, stage_sz);
            if (nxt.b >= 0) stage<kParts>(stages + (slot ^ 1) * stage_sz, a.arena, nxt, lane);
            cp_async_commit();
            cp_async_wait<1>();
            __syncwarp();
            const uint8_t *st = stages + slot * stage_sz;
            if (cur.b != entered) start(st, cur), entered = cur.b;
            for (int t0 = 0; t0 < cur.len; t0 += 16) tile(st, cur, t0);
            if (nxt.b != cur.b) end(st, cur);
            __syncwarp();
            cur = nxt;
            slot ^= 1;
        }
        cp_async_wait<0>();
        __syncwarp();
    }

    // The query of head g for the block's key format as B fragments (hi and lo f16 parts,
    // scaled by 2^k so the largest is below 2^14), and per head 2t, 2t+1 the factor and offset
    // that turn the MMA result into a logit.
    struct Query {
        uint32_t hi[kSteps][2], lo[kSteps][2];
        float inv_scale[2], base[2];
    };

    __device__ static void prepare(Query &q, const float *qs, int k_format, const uint8_t *scales, int lane) {
        const int g = lane >> 2, t = lane & 3;
        float qv[kSteps][4], base;
        if (k_format == Q1_CALIB) FmtQ1Calib<D>::mma_query(qs + g * D, scales, t, qv, base);
        else FmtF16<D>::mma_query(qs + g * D, scales, t, qv, base);
        split(q, qv, base, lane);
    }

    // The B fragments of head g's query slots qv (lane 4g + t holds slots of thread t) and
    // its partial base, summed here over the head's four lanes.
    __device__ static void split(Query &q, const float (&qv)[kSteps][4], float base, int lane) {
        const int t = lane & 3;
        float amax = 0.f;
#pragma unroll
        for (int s = 0; s < kSteps; ++s)
#pragma unroll
            for (int i = 0; i < 4; ++i) amax = fmaxf(amax, fabsf(qv[s][i]));
#pragma unroll
        for (int o = 1; o < 4; o <<= 1) {
            amax = fmaxf(amax, __shfl_xor_sync(kAll, amax, o));
            base += __shfl_xor_sync(kAll, base, o);
        }
        int e = 0;
        frexpf(amax, &e);
        const float sq = amax > 0.f ? ldexpf(1.f, 14 - e) : 1.f;
#pragma unroll
        for (int s = 0; s < kSteps; ++s) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                split_half2(qv[s][2 * r] * sq, qv[s][2 * r + 1] * sq, q.hi[s][r], q.lo[s][r]);
            }
        }
        const float inv = 1.f / sq;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            q.inv_scale[hh] = __shfl_sync(kAll, inv, 8 * t + 4 * hh);
            q.base[hh] = __shfl_sync(kAll, base, 8 * t + 4 * hh);
        }
    }

    template <typename KeyTile>
    __device__ static void score_steps(const Query &q, const KeyTile &kt, float (&part)[4][4]) {
        uint32_t a[4];
#pragma unroll
        for (int s = 0; s < kSteps; ++s) {
            kt.frag(s, a);
            mma_16816(part[s & 1], a, q.hi[s][0], q.hi[s][1]);
            mma_16816(part[2 + (s & 1)], a, q.lo[s][0], q.lo[s][1]);
        }
    }

    // S (16 tokens x 8 heads) of one tile. Four accumulators (hi and lo parts, even and odd
    // k-steps) keep the chain of dependent MMAs a quarter as long.
    __device__ static void tile_scores(const Query &q, int k_format, const uint8_t *rows, int lane, float (&c)[4]) {
        float part[4][4] = {};
        if (k_format == Q1_CALIB) score_steps(q, typename FmtQ1Calib<D>::KeyTile(rows, lane), part);
        else score_steps(q, typename FmtF16<D>::KeyTile(rows, lane), part);
#pragma unroll
        for (int e = 0; e < 4; ++e) c[e] = (part[0][e] + part[1][e]) + (part[2][e] + part[3][e]);
    }

    // Reduce over the 8 lanes of one t (the tokens of a tile) with `op`.
    template <typename Op>
    __device__ static float over_tokens(float v, Op op) {
#pragma unroll
        for (int o = 4; o < 32; o <<= 1) v = op(v, __shfl_xor_sync(kAll, v, o));
        return v;
    }
    struct Max { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };
    struct Min { __device__ float operator()(float a, float b) const { return fminf(a, b); } };
    struct Sum { __device__ float operator()(float a, float b) const { return a + b; } };
    __device__ static float max_over_tokens(float v) { return over_tokens(v, Max{}); }
    __device__ static float min_over_tokens(float v) { return over_tokens(v, Min{}); }
    __device__ static float sum_over_tokens(float v) { return over_tokens(v, Sum{}); }
};

// Order-preserving float atomics (min and max over logits).
__device__ inline void atomic_min_f(float *a, float v) {
    if (v >= 0.f) atomicMin(reinterpret_cast<int *>(a), __float_as_int(v));
    else atomicMax(reinterpret_cast<unsigned *>(a), __float_as_uint(v));
}
__device__ inline void atomic_max_f(float *a, float v) {
    if (v >= 0.f) atomicMax(reinterpret_cast<int *>(a), __float_as_int(v));
    else atomicMin(reinterpret_cast<unsigned *>(a), __float_as_uint(v));
}

// Scratch of the decode launch: span ranges, then one partial per work item.
struct Scratch {
    float *span_range;  // [n_seq][n_spans][n_head][2]: min, max of calibrated-span logits
    float *partial;     // [n_work][G][D + 2]: max, sum, acc
};

__host__ __device__ inline Scratch scratch_layout(float *base, int n_seq, int n_spans, int n_head) {
    Scratch s;
    s.span_range = base;
    s.partial = base + (size_t)n_seq * n_spans * n_head * 2;
    return s;
}

// dst[m] += V^T (m-tile m) · P for one tile's values.
template <int D, typename ValueTile>
__device__ __forceinline__ void value_steps(const ValueTile &vt, uint32_t b0, uint32_t b1,
                                            float (&dst)[D / 16][4]) {
    uint32_t af[4];
#pragma unroll
    for (int m = 0; m < D / 16; ++m) {
        vt.frag(m, af);
        mma_16816(dst[m], af, b0, b1);
    }
}

// Online softmax over one more tile of logits v (tokens g, g+8 x heads 2t, 2t+1): the running
// max mx of the two heads, ref the new reference (0 while all is masked, not -inf - -inf),
// corr the factor for earlier sums. True (on every lane) when some sum must be rescaled.
template <int D>
__device__ __forceinline__ bool softmax_advance(const float (&v)[4], float (&mx)[2], float (&ref)[2],
                                                float (&corr)[2]) {
    using M = MmaDecode<D>;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const float m_new = fmaxf(mx[hh], M::max_over_tokens(fmaxf(v[hh], v[hh + 2])));
        ref[hh] = m_new == -INFINITY ? 0.f : m_new;
        corr[hh] = __expf(mx[hh] - ref[hh]);
        mx[hh] = m_new;
    }
    return __any_sync(M::kAll, corr[0] != 1.f || corr[1] != 1.f);
}

// softmax_advance over a 32-token unit's two tiles of logits v, with acc and lsum rescaled
// where the max moved; true (on every lane) when it did, so that the caller rescales its own
// sums by corr too.
template <int D>
__device__ __forceinline__ bool unit_softmax(const float (&v)[2][4], float (&mx)[2], float (&ref)[2],
                                             float (&corr)[2], float (&lsum)[2], float (&acc)[D / 16][4]) {
    float vmax[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) vmax[e] = fmaxf(v[0][e], v[1][e]);
    if (!softmax_advance<D>(vmax, mx, ref, corr)) return false;
#pragma unroll
    for (int m = 0; m < D / 16; ++m)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[m][e] *= corr[e & 1];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) lsum[hh] *= corr[hh];
    return true;
}

// Entry j (0: max, 1: sum, then acc) of n partials (max, sum, acc) of one head, row(k) the
// k-th, rescaled to their common max.
template <class Row>
__device__ float merged_entry(int n, int j, Row row) {
    float mmax = -INFINITY;
    for (int k = 0; k < n; ++k) mmax = fmaxf(mmax, row(k)[0]);
    if (j == 0 || mmax == -INFINITY) return j == 0 ? mmax : 0.f;
    float val = 0.f;
    for (int k = 0; k < n; ++k) {
        const float *r = row(k);
        val += r[0] == -INFINITY ? 0.f : __expf(r[0] - mmax) * r[j];
    }
    return val;
}

// Merge the W warps of a CTA (each its own max, per-lane sums and C fragments of heads
// 2t, 2t+1) through `merge` ([W][8][D + 2] floats of shared memory), then write the work
// item's partial (max, sum, acc per head) to `part`.
template <int D, int W>
__device__ void write_partial(float *merge, const float (&mx)[2], const float (&lsum)[2],
                              const float (&acc)[D / 16][4], float *part, int G) {
    using M = MmaDecode<D, W>;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    __syncthreads();
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const float l = M::sum_over_tokens(lsum[hh]);
        float *row = merge + ((size_t)warp * M::kHeads + 2 * t + hh) * (D + 2);
        if (g == 0) row[0] = mx[hh], row[1] = l;
#pragma unroll
        for (int m = 0; m < D / 16; ++m) {
            row[2 + 16 * m + g] = acc[m][hh];
            row[2 + 16 * m + g + 8] = acc[m][hh + 2];
        }
    }
    __syncthreads();
    // Each warp's weight e^(max_k − max) once per head, in place of its max.
    if (threadIdx.x < G) {
        const int h = threadIdx.x;
        float mmax = -INFINITY;
#pragma unroll
        for (int k = 0; k < W; ++k) mmax = fmaxf(mmax, merge[(k * M::kHeads + h) * (D + 2)]);
#pragma unroll
        for (int k = 0; k < W; ++k) {
            float *m0 = merge + (k * M::kHeads + h) * (D + 2);
            *m0 = *m0 == -INFINITY ? 0.f : __expf(*m0 - mmax);
        }
        part[h * (D + 2)] = mmax;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * (D + 2); i += M::kWarps * 32) {
        const int h = i / (D + 2), j = i % (D + 2);
        if (j == 0) continue;
        float val = 0.f;
#pragma unroll
        for (int k = 0; k < W; ++k) {
            const float *row = merge + (k * M::kHeads + h) * (D + 2);
            val += row[0] * row[j];
        }
        part[i] = val;
    }
}

// P = e^(v − ref) of one tile's logits v, then P·V into acc (f16 values) or vbits and psum
// (q1_calib, folded at the block's end).
template <int D>
__device__ __forceinline__ void tile_values(const float (&v)[4], const float (&ref)[2], int v_format,
                                            const uint8_t *rows, int lane, float (&lsum)[2], float (&psum)[2],
                                            float (&acc)[D / 16][4], float (&vbits)[D / 16][4]) {
    const __half2 p01 = __floats2half2_rn(__expf(v[0] - ref[0]), __expf(v[1] - ref[1]));
    const __half2 p23 = __floats2half2_rn(__expf(v[2] - ref[0]), __expf(v[3] - ref[1]));
    const float ps0 = __low2float(p01) + __low2float(p23), ps1 = __high2float(p01) + __high2float(p23);
    lsum[0] += ps0, lsum[1] += ps1;
    const uint32_t b0 = movmatrix_trans(*reinterpret_cast<const uint32_t *>(&p01));
    const uint32_t b1 = movmatrix_trans(*reinterpret_cast<const uint32_t *>(&p23));
    if (v_format == Q1_CALIB) {
        psum[0] += ps0, psum[1] += ps1;
        value_steps<D>(typename FmtQ1Calib<D>::ValueTile(rows, lane), b0, b1, vbits);
    } else {
        value_steps<D>(typename FmtF16<D>::ValueTile(rows, lane), b0, b1, acc);
    }
}

// Online softmax over one tile's logits v (softmax_advance), then its values (tile_values).
template <int D>
__device__ __forceinline__ void tile_softmax_values(const float (&v)[4], int v_format,
                                                   const uint8_t *rows, int lane, float (&mx)[2],
                                                   float (&lsum)[2], float (&psum)[2],
                                                   float (&acc)[D / 16][4], float (&vbits)[D / 16][4]) {
    float corr[2], ref[2];
    if (softmax_advance<D>(v, mx, ref, corr)) {
#pragma unroll
        for (int m = 0; m < D / 16; ++m) {
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[m][e] *= corr[e & 1], vbits[m][e] *= corr[e & 1];
        }
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) lsum[hh] *= corr[hh], psum[hh] *= corr[hh];
    }
    tile_values<D>(v, ref, v_format, rows, lane, lsum, psum, acc, vbits);
}

// RANGE: the logit range of every calibrated span (atomics into scratch). ATTEND: softmax and
// P·V over the item, spans calibrated from that range. LOCAL: the item is one whole calibrated
// span; its logits stay in shared memory between a key sweep and a value sweep, so keys are
// read and scored once, and the item's largest logit is known before any value is read (no
// running max). LOCAL has eight warps: its CTAs are fewer, one per span.
enum class Pass { kRange, kAttend, kLocal };

template <Pass kPass>
constexpr int kPassWarps = kPass == Pass::kLocal ? 8 : 4;
// Rows a stage holds per token: the keys (RANGE, and each sweep of LOCAL) or keys and values.
template <Pass kPass>
constexpr int kPassParts = kPass == Pass::kAttend ? 2 : 1;

// LOCAL's CTAs run two per multiprocessor (128 registers): one alone leaves its latencies bare.
template <int D, Pass kPass>
__global__ void __launch_bounds__(kPassWarps<kPass> * 32, kPass == Pass::kLocal ? 2 : 1)
    decode_mma_kernel(kvb_cuda_decode_args a) {
    using M = MmaDecode<D, kPassWarps<kPass>>;
    constexpr int kSteps = M::kSteps;
    launch_dependents();
    extern __shared__ __align__(16) uint8_t mma_smem[];
    uint8_t *smem = mma_smem;
    float *qs = reinterpret_cast<float *>(smem);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int stage_sz = M::stage_size((a.formats_used >> F16) & 1, kPassParts<kPass>);
    uint8_t *stages = smem + M::kQBytes + warp * 2 * stage_sz;
    float *logits = reinterpret_cast<float *>(smem + M::kQBytes + M::stages_bytes(stage_sz));
    // LOCAL items may span a cluster of CTAs, its warps one team.
    const int n_ctas = kPass == Pass::kLocal ? ItemCtas::count() : 1;
    const int rank = kPass == Pass::kLocal ? ItemCtas::rank() : 0;
    const typename M::Team team{rank * M::kWarps + warp, n_ctas * M::kWarps};
    const int item = blockIdx.x / n_ctas;
    const kvb_cuda_work w = a.work[item];
    const int G = a.n_head / a.n_head_kv;
    const Scratch scr = scratch_layout(a.scratch, a.n_seq, a.n_spans, a.n_head);
    const float *qsrc = a.q + ((size_t)w.seq * a.n_head + (size_t)w.kv_head * G) * D;
    for (int i = threadIdx.x; i < M::kHeads * D; i += M::kWarps * 32) qs[i] = i < G * D ? qsrc[i] * a.scale : 0.f;
    __syncthreads();

    // Online softmax state of heads 2t, 2t+1; acc[m] is the C fragment of m-tile m.
    float mx[2] = {-INFINITY, -INFINITY}, lsum[2] = {0.f, 0.f};
    float lo_seen[2] = {INFINITY, INFINITY}, hi_seen[2] = {-INFINITY, -INFINITY};
    float acc[kSteps][4] = {}, vbits[kSteps][4] = {}, psum[2] = {0.f, 0.f};
    typename M::Query q;
    float ca[2] = {1.f, 1.f}, cb[2] = {0.f, 0.f};  // logit = ca·mma + cb
    bool f16_prepared = false;

    // A block begins: the query for its keys, and (ATTEND) its span's calibration.
    auto start_keys = [&](const uint8_t *st, const typename M::Chunk &c) {
        const kvb_cuda_block &blk = c.blk;
        if (blk.k_format == Q1_CALIB || !f16_prepared) {
            M::prepare(q, qs, blk.k_format, st, lane);
            f16_prepared = blk.k_format == F16;
        }
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            // CalibQuant: a' = lo + (a - lo)(hi - lo - δ)/(hi - lo) over the span's logits;
            // a span whose range is within δ keeps its scores.
            float lo = 0.f, ratio = 1.f;
            if (kPass == Pass::kAttend && blk.span >= 0 && 2 * t + hh < G) {
                const int h = w.kv_head * G + 2 * t + hh;
                const float *r = scr.span_range + (((size_t)w.seq * a.n_spans + blk.span) * a.n_head + h) * 2;
                const float range = r[1] - r[0];
                if (range > a.calib_delta) lo = r[0], ratio = (range - a.calib_delta) / range;
            }
            ca[hh] = q.inv_scale[hh] * ratio;
            cb[hh] = lo + (q.base[hh] - lo) * ratio;
        }
    };
    auto start_values = [&](const typename M::Chunk &c) {
        if (c.blk.v_format != Q1_CALIB) return;
#pragma unroll
        for (int m = 0; m < kSteps; ++m) vbits[m][0] = vbits[m][1] = vbits[m][2] = vbits[m][3] = 0.f;
        psum[0] = psum[1] = 0.f;
    };
    auto tile_logits = [&](const uint8_t *st, const typename M::Chunk &c, int t0, float (&v)[4]) {
        float s[4];
        M::tile_scores(q, c.blk.k_format, st + M::kScales + t0 * M::row_bytes(c.blk.k_format), lane, s);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int tok = c.c0 + t0 + g + 8 * (e >> 1);
            v[e] = tok < c.blk.n ? ca[e & 1] * s[e] + cb[e & 1] : -INFINITY;
        }
    };
    auto see = [&](const float (&v)[4]) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            if (v[e] != -INFINITY) lo_seen[e & 1] = fminf(lo_seen[e & 1], v[e]);
            hi_seen[e & 1] = fmaxf(hi_seen[e & 1], v[e]);
        }
    };
    auto end_values = [&](const uint8_t *st, const typename M::Chunk &c) {
        if (c.blk.v_format != Q1_CALIB) return;
        const float ps[2] = {M::sum_over_tokens(psum[0]), M::sum_over_tokens(psum[1])};
        FmtQ1Calib<D>::mma_fold(st + 4 * D, g, vbits, ps, acc);
    };

    if constexpr (kPass == Pass::kRange) {
        M::template sweep<M::kKeys, true>(
            a, w, stages, stage_sz, team, lane, start_keys,
            [&](const uint8_t *st, const typename M::Chunk &c, int t0) {
                float v[4];
                tile_logits(st, c, t0, v);
                see(v);
            },
            [&](const uint8_t *, const typename M::Chunk &c) {
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                    const float lo = M::min_over_tokens(lo_seen[hh]), hi = M::max_over_tokens(hi_seen[hh]);
                    if (g == 0 && 2 * t + hh < G) {
                        const int h = w.kv_head * G + 2 * t + hh;
                        float *r = scr.span_range + (((size_t)w.seq * a.n_spans + c.blk.span) * a.n_head + h) * 2;
                        atomic_min_f(r, lo);
                        atomic_max_f(r + 1, hi);
                    }
                    lo_seen[hh] = INFINITY, hi_seen[hh] = -INFINITY;
                }
            });
        return;
    } else if constexpr (kPass == Pass::kAttend) {
        M::template sweep<M::kBoth, false>(
            a, w, stages, stage_sz, team, lane,
            [&](const uint8_t *st, const typename M::Chunk &c) {
                start_keys(st, c);
                start_values(c);
            },
            [&](const uint8_t *st, const typename M::Chunk &c, int t0) {
                float v[4];
                tile_logits(st, c, t0, v);
                tile_softmax_values<D>(v, c.blk.v_format,
                                       st + M::template values_at<M::kBoth>(c) + t0 * M::row_bytes(c.blk.v_format),
                                       lane, mx, lsum, psum, acc, vbits);
            },
            end_values);
    } else {
        // Key sweep: logits of the item's tokens into shared memory, and their range. An item
        // is one calibrated span, or blocks that are not calibrated at all.
        const bool calibrated = a.blocks[w.first_block].span >= 0;
        // Heads 2t, 2t+1 of a token are one float2 (a 2-way bank conflict as single floats).
        auto at = [&](const typename M::Chunk &c, int t0, int r) {
            return reinterpret_cast<float2 *>(logits + (c.tok0 + c.c0 + t0 + g + 8 * r) * M::kHeads + 2 * t);
        };
        M::template sweep<M::kKeys, false>(
            a, w, stages, stage_sz, team, lane, start_keys,
            [&](const uint8_t *st, const typename M::Chunk &c, int t0) {
                float v[4];
                tile_logits(st, c, t0, v);
                see(v);
                // Masked tokens past a block's end would land on the next block's logits.
#pragma unroll
                for (int r = 0; r < 2; ++r)
                    if (c.c0 + t0 + g + 8 * r < c.blk.n) *at(c, t0, r) = make_float2(v[2 * r], v[2 * r + 1]);
            },
            [](const uint8_t *, const typename M::Chunk &) {});
        // The span's range per head, over the warps of every CTA of the item.
        float *range = logits + M::kLocalTokens * M::kHeads;  // [kWarps][8][2]
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const float lo = M::min_over_tokens(lo_seen[hh]), hi = M::max_over_tokens(hi_seen[hh]);
            if (g == 0) range[(warp * M::kHeads + 2 * t + hh) * 2] = lo, range[(warp * M::kHeads + 2 * t + hh) * 2 + 1] = hi;
        }
        ItemCtas::sync();
        float lo_c[2], ratio[2], ref[2];
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            float lo = INFINITY, hi = -INFINITY;
            for (int r = 0; r < n_ctas; ++r) {
                const float *rr = ItemCtas::of(range, r);
#pragma unroll
                for (int k = 0; k < M::kWarps; ++k)
                    lo = fminf(lo, rr[(k * M::kHeads + 2 * t + hh) * 2]), hi = fmaxf(hi, rr[(k * M::kHeads + 2 * t + hh) * 2 + 1]);
            }
            const float r = hi - lo;
            lo_c[hh] = 0.f, ratio[hh] = 1.f;
            if (calibrated && r > a.calib_delta) lo_c[hh] = lo, ratio[hh] = (r - a.calib_delta) / r;
            // The largest calibrated logit, by the same expression as each token's below.
            mx[hh] = lo_c[hh] + (hi - lo_c[hh]) * ratio[hh];
            ref[hh] = mx[hh] == -INFINITY ? 0.f : mx[hh];
        }
        // Value sweep: calibrated logits back from shared memory.
        M::template sweep<M::kValues, false>(
            a, w, stages, stage_sz, team, lane,
            [&](const uint8_t *, const typename M::Chunk &c) { start_values(c); },
            [&](const uint8_t *st, const typename M::Chunk &c, int t0) {
                float v[4];
#pragma unroll
                for (int r = 0; r < 2; ++r) {
                    const bool in = c.c0 + t0 + g + 8 * r < c.blk.n;
                    const float2 l = in ? *at(c, t0, r) : make_float2(-INFINITY, -INFINITY);
                    v[2 * r] = lo_c[0] + (l.x - lo_c[0]) * ratio[0];
                    v[2 * r + 1] = lo_c[1] + (l.y - lo_c[1]) * ratio[1];
                }
                tile_values<D>(v, ref, c.blk.v_format,
                               st + M::template values_at<M::kValues>(c) + t0 * M::row_bytes(c.blk.v_format), lane,
                               lsum, psum, acc, vbits);
            },
            end_values);
    }

    float *part = scr.partial + (size_t)item * G * (D + 2);
    // A cluster's CTAs leave their partials in shared memory (past the logits they are done
    // with); CTA 0 merges them.
    float *cta_part = n_ctas > 1 ? logits : part;
    write_partial<D, M::kWarps>(reinterpret_cast<float *>(smem + M::kQBytes), mx, lsum, acc, cta_part, G);
    if (n_ctas > 1) {
        ItemCtas::sync();
        if (rank == 0) {
            for (int i = threadIdx.x; i < G * (D + 2); i += M::kWarps * 32) {
                const int h = i / (D + 2);
                part[i] = merged_entry(n_ctas, i % (D + 2), [&](int r) { return ItemCtas::of(cta_part, r) + h * (D + 2); });
            }
        }
        ItemCtas::sync();  // the others' shared memory stays until CTA 0 has read it
    }
}

}  // namespace kvb
