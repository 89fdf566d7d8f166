// Staging of whole blocks for the decode kernels that prepare the query per block (the generic
// kernel, decode_prepared.cuh): a CTA copies the next block's K and V bytes into shared memory
// with cp.async while it computes this one, so that the formats' many small reads of codes wait
// on shared memory, not on DRAM.
#pragma once

#include "common.cuh"
#include "mma.cuh"

namespace kvb {

// Bytes a block holds, from its descriptor and (where its layout depends on it) its header:
// a format's stored_bytes, else its size with no protected tokens and default parameters.
template <class F>
__device__ int64_t stored_bytes_of(const uint8_t *blk, int n, int role) {
    if constexpr (requires { F::stored_bytes(blk, n, role); }) return F::stored_bytes(blk, n, role);
    else return F::bytes(n, role, 0, QuantParams{});
}

// Bytes of one stage.
constexpr int kBlockStage = 8 * 1024;

// Thread 0 sizes block b of the item (0, 0 past its end) into sizes[0..1].
template <class Formats>
__device__ void size_block(const kvb_cuda_decode_args &a, const kvb_cuda_work &w, int b, int64_t *sizes) {
    if (threadIdx.x != 0) return;
    sizes[0] = sizes[1] = 0;
    if (b >= w.n_blocks) return;
    const kvb_cuda_block blk = a.blocks[w.first_block + b];
    sizes[0] = Formats::stored_bytes(blk.k_format, a.arena + blk.k_offset, blk.n, KEY);
    sizes[1] = Formats::stored_bytes(blk.v_format, a.arena + blk.v_offset, blk.n, VALUE);
}

// Bytes of dynamic shared memory this launch has.
__device__ uint32_t dynamic_smem_bytes() {
    uint32_t bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
    return bytes;
}

// Start copying block b's K and V bytes (sizes[0], sizes[1]) into `stage` where the launch has
// stages (`staging`) and they fit one; whether they do.
__device__ bool stage_block(const kvb_cuda_decode_args &a, const kvb_cuda_work &w, int b, const int64_t *sizes,
                            uint8_t *stage, bool staging) {
    const int64_t kb = (sizes[0] + 15) & ~15LL, vb = sizes[1];
    if (!staging || b >= w.n_blocks || kb + vb > kBlockStage) return false;
    const kvb_cuda_block blk = a.blocks[w.first_block + b];
    for (int64_t p = 16 * threadIdx.x; p < kb + vb; p += 16 * kThreads) {
        const bool key = p < kb;
        const int64_t at = key ? p : p - kb, len = key ? sizes[0] : vb;
        const uint8_t *src = a.arena + (key ? blk.k_offset : blk.v_offset) + at;
        const int64_t left = len - at;
        cp_async16(stage + p, src, left >= 16 ? 16 : left > 0 ? (int)left : 0);
    }
    return true;
}

}  // namespace kvb
