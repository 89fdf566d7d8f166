// Tensor-core decode attention for a key format that prepares the query per block (k1_5_mix:
// the query's rfft over the block's low-range channels, folded with the block's scales) with
// its value format (v1_58_tern) and f16 blocks beside them (a cache's recent tokens): head dims
// up to 128, up to 8 query heads per KV head.
//
// Per work item a CTA of kThreads threads. Per block the CTA stages the next block's bytes
// (block_stage.cuh) and prepares the query once, with the format's own `prepare`; then warp w
// takes the 32-token units w, w + kWarps, ... of the block on its own: two 16-token tiles of
// logits (tokens as MMA rows, the G query heads as the 8 columns), one online-softmax step in
// registers, both tiles' values, as decode_tiles.cuh does. The generic kernel instead meets
// at CTA barriers around every chunk's softmax, about a dozen per block; here there are the
// prepare's own and two more.
#pragma once

#include "block_stage.cuh"
#include "decode_mma.cuh"
#include "f16.cu"
#include "formats.cuh"

namespace kvb {

template <int D, class KF, class VF>
struct PreparedDecode {
    static constexpr int kWarps = kThreads / 32, kHeads = 8, kSteps = D / 16, kUnit = 32;
    static constexpr int kPrepFloats = kHeads * KF::kPrep + prep_shared<KF>();
    static constexpr int kWarpScratch = kUnit * kHeads + kUnit;  // a unit's P, then an order
    static constexpr int kF16Tile = 16 * FmtF16<D>::kSmemRow;
    // CTAs per multiprocessor the kernel is built for (128 registers): the planner gives about
    // four work items per multiprocessor, so at three a third of them waited for a second wave.
    static constexpr int kCtasPerSm = 4;

    // The scaled query [8][D], the prepared query, the warps' scratch (16-byte multiples), the
    // two block stages; with f16 blocks, each warp's tile of f16 rows (keys, then values: one
    // tile each would cost a fourth CTA per multiprocessor). write_partial's merge reuses the
    // start.
    static constexpr size_t kFloatBytes = (sizeof(float) * (kHeads * D + kPrepFloats + kWarps * kWarpScratch) + 15) & ~15;
    static size_t smem_bytes(bool has_f16) {
        const size_t used = kFloatBytes + 2 * kBlockStage + (has_f16 ? (size_t)kWarps * kF16Tile : 0);
        const size_t merge = sizeof(float) * kWarps * kHeads * (D + 2);
        return used > merge ? used : merge;
    }

    // Logits of the unit at u0 of an f16 key block (a cache's recent tokens), as decode_tiles.cuh
    // computes them. The query's fragments are made per unit: held across the block's loop,
    // they spilled the quantized blocks' registers.
    __device__ static void f16_unit_logits(const float *qs, const uint8_t *blk, int n, int u0, uint8_t *tile,
                                           int lane, float (&v)[2][4]) {
        using M = MmaDecode<D>;
        const int g = lane >> 2, t = lane & 3;
        typename M::Query q;
        float qv[kSteps][4], base;
        FmtF16<D>::mma_query(qs + g * D, nullptr, t, qv, base);
        M::split(q, qv, base, lane);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int t0 = u0 + 16 * i;
            float s[4] = {};
            if (t0 < n) {
                FmtF16<D>::stage_rows(tile, blk, t0, min(16, n - t0), lane);
                cp_async_commit();
                cp_async_wait<0>();
                __syncwarp();
                M::tile_scores(q, F16, tile, lane, s);
                __syncwarp();
            }
#pragma unroll
            for (int e = 0; e < 4; ++e)
                v[i][e] = t0 + g + 8 * (e >> 1) < n ? q.inv_scale[e & 1] * s[e] + q.base[e & 1] : -INFINITY;
        }
    }

    __device__ static int64_t stored_bytes(int fmt, const uint8_t *blk, int n, int role) {
        if (fmt == F16) return stored_bytes_of<FmtF16<D>>(blk, n, role);
        return role == KEY ? stored_bytes_of<KF>(blk, n, role) : stored_bytes_of<VF>(blk, n, role);
    }
};

template <int D, class KF, class VF>
__global__ void __launch_bounds__(kThreads, PreparedDecode<D, KF, VF>::kCtasPerSm)
    decode_prepared_kernel(kvb_cuda_decode_args a) {
    using M = MmaDecode<D>;
    using P = PreparedDecode<D, KF, VF>;
    constexpr int kSteps = P::kSteps, kHeads = P::kHeads, kWarps = P::kWarps, kUnit = P::kUnit;
    launch_dependents();
    extern __shared__ __align__(16) uint8_t prepared_smem[];
    float *qs = reinterpret_cast<float *>(prepared_smem), *qt = qs + kHeads * D;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float *scratch = qt + P::kPrepFloats + warp * P::kWarpScratch;
    uint8_t *stages = prepared_smem + P::kFloatBytes;
    uint8_t *f16_tile = stages + 2 * kBlockStage + warp * P::kF16Tile;
    __shared__ int64_t sizes[2][2];  // K and V bytes of the next two blocks, by parity
    const kvb_cuda_work w = a.work[blockIdx.x];
    const int G = a.n_head / a.n_head_kv;
    const Scratch scr = scratch_layout(a.scratch, a.n_seq, a.n_spans, a.n_head);
    const float *qsrc = a.q + ((size_t)w.seq * a.n_head + (size_t)w.kv_head * G) * D;
    // The softmax scale goes into the query: prepare is linear in it, so logits come scaled.
    for (int i = threadIdx.x; i < kHeads * D; i += kThreads) qs[i] = i < G * D ? qsrc[i] * a.scale : 0.f;
    size_block<P>(a, w, 0, sizes[0]);
    __syncthreads();
    bool staged = stage_block(a, w, 0, sizes[0], stages, true);
    cp_async_commit();
    size_block<P>(a, w, 1, sizes[1]);

    float mx[2] = {-INFINITY, -INFINITY}, lsum[2] = {0.f, 0.f}, acc[kSteps][4] = {};
    for (int b = 0; b < w.n_blocks; ++b) {
        const kvb_cuda_block blk = a.blocks[w.first_block + b];
        cp_async_wait<0>();
        __syncthreads();  // block b staged; every warp done with block b - 1 and the prepared query
        const uint8_t *k_src = a.arena + blk.k_offset, *v_src = a.arena + blk.v_offset;
        const uint8_t *kb = k_src, *vb = v_src;
        if (staged) kb = stages + (b & 1) * kBlockStage, vb = kb + ((sizes[b & 1][0] + 15) & ~15LL);
        staged = stage_block(a, w, b + 1, sizes[(b + 1) & 1], stages + ((b + 1) & 1) * kBlockStage, true);
        cp_async_commit();
        const int n = blk.n;
        if (blk.k_format != F16) KF::prepare(kb, n, qs, G, qt);
        __syncthreads();  // the prepared query; every thread has read sizes[b & 1]
        size_block<P>(a, w, b + 2, sizes[b & 1]);
        for (int u0 = kUnit * warp; u0 < n; u0 += kUnit * kWarps) {
            float v[2][4];
            if (blk.k_format == F16) P::f16_unit_logits(qs, k_src, n, u0, f16_tile, lane, v);
            else KF::mma_unit_logits(kb, n, u0, qt, G, lane, v);
            float ref[2], corr[2];
            unit_softmax<D>(v, mx, ref, corr, lsum, acc);
            float p[2][4];
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int e = 0; e < 4; ++e) p[i][e] = __expf(v[i][e] - ref[e & 1]);
#pragma unroll
            for (int i = 0; i < 2; ++i) lsum[0] += p[i][0] + p[i][2], lsum[1] += p[i][1] + p[i][3];
            if (blk.v_format == F16) {
                for (int i = 0; i < 2 && u0 + 16 * i < n; ++i) {
                    const int t0 = u0 + 16 * i;
                    FmtF16<D>::stage_rows(f16_tile, v_src, t0, min(16, n - t0), lane);
                    cp_async_commit();
                    cp_async_wait<0>();
                    __syncwarp();
                    value_steps<D>(typename FmtF16<D>::ValueTile(f16_tile, lane),
                                   movmatrix_trans(half2_bits(p[i][0], p[i][1])),
                                   movmatrix_trans(half2_bits(p[i][2], p[i][3])), acc);
                    __syncwarp();
                }
            } else {
                VF::mma_unit_values(vb, n, u0, p, acc, scratch, lane);
            }
        }
    }
    cp_async_wait<0>();
    write_partial<D, kWarps>(reinterpret_cast<float *>(prepared_smem), mx, lsum, acc,
                             scr.partial + (size_t)blockIdx.x * G * (D + 2), G);
}

}  // namespace kvb
