// Tensor-core decode attention for caches of one pair of 2-bit token formats (kivi2 K+V,
// q2_had K+V) with f16 blocks beside them (text runs): head dims up to 128, up to 8 query
// heads per KV head. The format files hold the tile code (mma_query, mma_key_logits,
// mma_value_tile); this file the sweep, the online softmax and the merge.
//
// Per work item a CTA of kWarps warps; warp w takes the 32-token units w, w + kWarps, ... of
// the item's blocks (so one block per item still busies every warp), two 16-token tiles per
// unit under one online-softmax step, tokens as MMA rows and the G query heads as the 8
// columns, as decode_mma.cuh.
// A quantized unit's K and V bytes are staged by cp.async in two stages per warp (the next
// unit's copies are in flight while this one is computed); lanes read their tokens' code words
// from there into fragments. f16 blocks (text runs) are staged a tile at a time.
// Values of a rotated format (q2_had) accumulate in the rotated basis; the accumulators turn
// (R is its own inverse) where the item passes between f16 and rotated value blocks, and back
// at its end.
#pragma once

#include "decode_mma.cuh"

namespace kvb {

template <int D, class KF, class VF>
struct TileDecode {
    static constexpr int kWarps = 4, kHeads = 8, kSteps = D / 16;
    static constexpr int kUnit = 32;                       // tokens a warp takes at a time
    static constexpr int kMaxGroups = 4;                   // qsum entries per head
    static constexpr int kWarpFloats = kHeads * (D + 2);   // a warp's scratch, then merge rows
    static constexpr int kF16Tile = 16 * FmtF16<D>::kSmemRow;
    // A stage: the first 16 bytes of the K block at 0 and of the V block at 16 (headers),
    // the unit's K bytes at kKeyStage, its V bytes at kValueStage.
    static constexpr int kKeyStage = 32, kValueStage = kKeyStage + ((KF::kKeyUnitBytes + 15) & ~15);
    static constexpr int kStage = kValueStage + ((VF::kValueUnitBytes + 15) & ~15);
    static constexpr int kCachedBlocks = 64;  // block descriptors of an item kept on chip
    static_assert(KF::kValueGroups <= kMaxGroups && VF::kValueGroups <= kMaxGroups, "group sums fit");

    // Scaled query [8][D], rotated query [8][D], its group sums [8][kMaxGroups], the warps'
    // scratch, the item's first block descriptors, the warps' two unit stages; with f16
    // blocks, each warp's K and V tile of f16 rows.
    static size_t smem_bytes(bool has_f16) {
        return sizeof(float) * (2 * kHeads * D + kHeads * kMaxGroups + kWarps * kWarpFloats) +
               sizeof(kvb_cuda_block) * kCachedBlocks + (size_t)kWarps * 2 * kStage +
               (has_f16 ? (size_t)kWarps * 2 * kF16Tile : 0);
    }

    // Where a warp is in its work item: block b (of the item), unit at token u0; b < 0 past
    // the end.
    struct Unit {
        int b, u0;
    };

    // Descriptor of the item's block b; `cached` holds its first kCachedBlocks.
    __device__ static kvb_cuda_block block(const kvb_cuda_decode_args &a, const kvb_cuda_work &w,
                                           const kvb_cuda_block *cached, int b) {
        return b < kCachedBlocks ? cached[b] : a.blocks[w.first_block + b];
    }

    // The unit `skip` units after (b, u0) in the item's order.
    __device__ static Unit unit_after(const kvb_cuda_decode_args &a, const kvb_cuda_work &w,
                                      const kvb_cuda_block *cached, int b, int u0, int skip) {
        for (; b < w.n_blocks; ++b, u0 = 0) {
            const int left = (block(a, w, cached, b).n - u0 + kUnit - 1) / kUnit;
            if (skip < left) return {b, u0 + skip * kUnit};
            skip -= left;
        }
        return {-1, 0};
    }

    // Start the copies of the quantized K and V bytes of block blk's unit at u0 into stage st
    // (asynchronous; the caller commits); f16 blocks stage per tile instead.
    __device__ static void stage(uint8_t *st, const uint8_t *arena, const kvb_cuda_block &blk, int u0, int lane) {
        auto copy = [&](uint8_t *hdr, uint8_t *dst, const uint8_t *src, int2 span) {
            if (lane == 31) cp_async16(hdr, src, 16);
            for (int p = lane; 16 * p < span.y; p += 32)
                cp_async16(dst + 16 * p, src + span.x + 16 * p, min(16, span.y - 16 * p));
        };
        if (blk.k_format != F16)
            copy(st, st + kKeyStage, arena + blk.k_offset, KF::unit_span(blk.k_format, blk.n, u0, KEY));
        if (blk.v_format != F16)
            copy(st + 16, st + kValueStage, arena + blk.v_offset, VF::unit_span(blk.v_format, blk.n, u0, VALUE));
    }

    // acc (heads 2t, 2t+1 of channels 16m + g, +8) through the rotation, via the warp's
    // scratch ([8][D] floats).
    __device__ static void rotate_acc(float (&acc)[kSteps][4], float *scratch, int lane) {
        const int g = lane >> 2, t = lane & 3;
#pragma unroll
        for (int m = 0; m < kSteps; ++m)
#pragma unroll
            for (int e = 0; e < 4; ++e) scratch[(2 * t + (e & 1)) * D + 16 * m + g + 8 * (e >> 1)] = acc[m][e];
        __syncwarp();
        for (int h = 0; h < kHeads; ++h) {
            float y[VF::kSlots];
#pragma unroll
            for (int j = 0; j < VF::kSlots; ++j) y[j] = VF::valid(j) ? scratch[h * D + 32 * j + lane] : 0.f;
            VF::rotate(y);
#pragma unroll
            for (int j = 0; j < VF::kSlots; ++j)
                if (VF::valid(j)) scratch[h * D + 32 * j + lane] = y[j];
        }
        __syncwarp();
#pragma unroll
        for (int m = 0; m < kSteps; ++m)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[m][e] = scratch[(2 * t + (e & 1)) * D + 16 * m + g + 8 * (e >> 1)];
        __syncwarp();
    }

    // Σ p·lo of each value group (per-lane sums over tokens g, g+8) into its channels.
    __device__ static void flush_lo(float (&lo_acc)[VF::kValueGroups][2], float (&acc)[kSteps][4]) {
#pragma unroll
        for (int grp = 0; grp < VF::kValueGroups; ++grp)
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const float s = MmaDecode<D>::sum_over_tokens(lo_acc[grp][hh]);
                lo_acc[grp][hh] = 0.f;
#pragma unroll
                for (int m = 0; m < kSteps; ++m)
                    if (VF::value_group(m) == grp) acc[m][hh] += s, acc[m][hh + 2] += s;
            }
    }
};

template <int D, class KF, class VF>
__global__ void __launch_bounds__(TileDecode<D, KF, VF>::kWarps * 32, KF::kTileCtasPerSm)
    decode_tiles_kernel(kvb_cuda_decode_args a) {
    using M = MmaDecode<D>;
    using T = TileDecode<D, KF, VF>;
    constexpr int kSteps = T::kSteps, kHeads = T::kHeads, kWarps = T::kWarps;
    launch_dependents();
    extern __shared__ __align__(16) uint8_t tiles_smem[];
    float *qs = reinterpret_cast<float *>(tiles_smem), *qr = qs + kHeads * D, *qsum = qr + kHeads * D;
    float *warp_rows = qsum + kHeads * T::kMaxGroups;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    float *scratch = warp_rows + warp * T::kWarpFloats;
    uint8_t *stages = reinterpret_cast<uint8_t *>(warp_rows + kWarps * T::kWarpFloats) +
                      sizeof(kvb_cuda_block) * T::kCachedBlocks + warp * 2 * T::kStage;
    uint8_t *k_tile = stages + (kWarps - warp) * 2 * T::kStage + warp * 2 * T::kF16Tile;
    uint8_t *v_tile = k_tile + T::kF16Tile;
    const kvb_cuda_work w = a.work[blockIdx.x];
    const int G = a.n_head / a.n_head_kv;
    const Scratch scr = scratch_layout(a.scratch, a.n_seq, a.n_spans, a.n_head);
    const float *qsrc = a.q + ((size_t)w.seq * a.n_head + (size_t)w.kv_head * G) * D;
    for (int i = threadIdx.x; i < kHeads * D; i += kWarps * 32) qs[i] = i < G * D ? qsrc[i] * a.scale : 0.f;
    kvb_cuda_block *cached = reinterpret_cast<kvb_cuda_block *>(warp_rows + kWarps * T::kWarpFloats);
    for (int i = threadIdx.x; i < min(w.n_blocks, T::kCachedBlocks); i += kWarps * 32) cached[i] = a.blocks[w.first_block + i];
    __syncthreads();
    if constexpr (KF::kRotated) {
        // The rotated query and its sums over each of the format's groups of 64 channels
        // (its value groups are the same), a warp per head.
        for (int h = warp; h < kHeads; h += kWarps) {
            float y[KF::kSlots];
#pragma unroll
            for (int j = 0; j < KF::kSlots; ++j) y[j] = KF::valid(j) ? qs[h * D + 32 * j + lane] : 0.f;
            KF::rotate(y);
#pragma unroll
            for (int j = 0; j < KF::kSlots; ++j)
                if (KF::valid(j)) qr[h * D + 32 * j + lane] = y[j];
#pragma unroll
            for (int grp = 0; grp < KF::kValueGroups; ++grp) {
                float s = 0.f;
#pragma unroll
                for (int j = 2 * grp; j < 2 * grp + 2 && j < KF::kSlots; ++j) s += KF::valid(j) ? y[j] : 0.f;
                s = warp_sum(s);
                if (lane == 0) qsum[h * KF::kValueGroups + grp] = s;
            }
        }
        __syncthreads();
    }

    float mx[2] = {-INFINITY, -INFINITY}, lsum[2] = {0.f, 0.f};
    float acc[kSteps][4] = {}, lo_acc[VF::kValueGroups][2] = {};
    bool rotated = false;  // acc holds R·(Σ p·v)
    typename M::Query q;
    enum { kNoQuery, kF16Query, kFmtQuery } prepared = kNoQuery;

    typename T::Unit cur = T::unit_after(a, w, cached, 0, 0, warp);
    if (cur.b >= 0) T::stage(stages, a.arena, T::block(a, w, cached, cur.b), cur.u0, lane);
    cp_async_commit();
    for (int slot = 0; cur.b >= 0; slot ^= 1) {
        const typename T::Unit nxt = T::unit_after(a, w, cached, cur.b, cur.u0, kWarps);
        if (nxt.b >= 0) T::stage(stages + (slot ^ 1) * T::kStage, a.arena, T::block(a, w, cached, nxt.b), nxt.u0, lane);
        cp_async_commit();
        cp_async_wait<1>();
        __syncwarp();
        const kvb_cuda_block blk = T::block(a, w, cached, cur.b);
        const int n = blk.n, u0 = cur.u0;
        const uint8_t *kb = a.arena + blk.k_offset, *vb = a.arena + blk.v_offset;
        // The staged bytes, addressed as their blocks are (kept apart from global pointers, so
        // reads through them compile to shared-memory loads).
        const uint8_t *st = stages + slot * T::kStage, *k_hdr = st, *v_hdr = st + 16;
        const uint8_t *k_rows = st + T::kKeyStage - KF::unit_span(blk.k_format, n, u0, KEY).x;
        const uint8_t *v_rows = st + T::kValueStage - VF::unit_span(blk.v_format, n, u0, VALUE).x;
        float qv[kSteps][4], base;
        if (blk.k_format == F16) {
            if (prepared != kF16Query) {
                FmtF16<D>::mma_query(qs + g * D, nullptr, t, qv, base);
                M::split(q, qv, base, lane);
                prepared = kF16Query;
            }
        } else if (KF::kQueryPerUnit || prepared != kFmtQuery) {
            KF::mma_query(qs + g * D, qr + g * D, k_rows, u0, lane, qv, base);
            M::split(q, qv, base, lane);
            prepared = kFmtQuery;
        }
        if constexpr (VF::kRotated) {
            if ((blk.v_format != F16) != rotated) {
                T::flush_lo(lo_acc, acc);
                T::rotate_acc(acc, scratch, lane);
                rotated = !rotated;
            }
        }
        // Both tiles' logits, one softmax step over the unit, then both tiles' values.
        const int tiles = n - u0 > 16 ? 2 : 1;
        float v[2][4];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int t0 = u0 + 16 * i;
            if (i >= tiles) {
#pragma unroll
                for (int e = 0; e < 4; ++e) v[i][e] = -INFINITY;
                continue;
            }
            if (blk.k_format == F16) {
                FmtF16<D>::stage_rows(k_tile, kb, t0, min(16, n - t0), lane);
                cp_async_commit();
                cp_async_wait<0>();
                __syncwarp();
                float s[4];
                M::tile_scores(q, F16, k_tile, lane, s);
                __syncwarp();
#pragma unroll
                for (int e = 0; e < 4; ++e) v[i][e] = q.inv_scale[e & 1] * s[e] + q.base[e & 1];
            } else {
                KF::mma_key_logits(blk.k_format, q, qs, qsum, kb, k_rows, k_hdr, n, t0, lane, v[i]);
            }
#pragma unroll
            for (int e = 0; e < 4; ++e)
                if (t0 + g + 8 * (e >> 1) >= n) v[i][e] = -INFINITY;
        }
        float ref[2], corr[2];
        if (unit_softmax<D>(v, mx, ref, corr, lsum, acc)) {
#pragma unroll
            for (int grp = 0; grp < VF::kValueGroups; ++grp)
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) lo_acc[grp][hh] *= corr[hh];
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            if (i >= tiles) break;
            const int t0 = u0 + 16 * i;
            float p[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) p[e] = __expf(v[i][e] - ref[e & 1]);
            lsum[0] += p[0] + p[2], lsum[1] += p[1] + p[3];
            if (blk.v_format == F16) {
                FmtF16<D>::stage_rows(v_tile, vb, t0, min(16, n - t0), lane);
                cp_async_commit();
                cp_async_wait<0>();
                __syncwarp();
                value_steps<D>(typename FmtF16<D>::ValueTile(v_tile, lane), movmatrix_trans(half2_bits(p[0], p[1])),
                               movmatrix_trans(half2_bits(p[2], p[3])), acc);
            } else {
                VF::mma_value_tile(blk.v_format, vb, v_rows, v_hdr, n, t0, p, acc, lo_acc, scratch, lane);
            }
            __syncwarp();
        }
        cur = nxt;
    }
    cp_async_wait<0>();
    T::flush_lo(lo_acc, acc);
    if constexpr (VF::kRotated) {
        if (rotated) T::rotate_acc(acc, scratch, lane);
    }
    write_partial<D, kWarps>(warp_rows, mx, lsum, acc, scr.partial + (size_t)blockIdx.x * G * (D + 2), G);
}

}  // namespace kvb
