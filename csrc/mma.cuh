// Warp-level tensor-core and async-copy primitives (sm_80+), as thin PTX wrappers.
//
// Fragment layouts of mma.m16n8k16 (f16 in, f32 accumulate), lane = 4·g + t:
//   A (16x16): a0 = (row g, cols 2t, 2t+1), a1 = (row g+8, cols 2t, 2t+1),
//              a2 = (row g, cols 2t+8, 2t+9), a3 = (row g+8, cols 2t+8, 2t+9)
//   B (16x8):  b0 = (rows 2t, 2t+1, col g), b1 = (rows 2t+8, 2t+9, col g)
//   C (16x8):  c0, c1 = (row g, cols 2t, 2t+1), c2, c3 = (row g+8, cols 2t, 2t+1)
// Each f16x2 register holds its lower-indexed element in the low half.
#pragma once

#include <cuda_fp16.h>
#include <stdint.h>

namespace kvb {

__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// Four 8x8 f16 matrices; lanes 8j..8j+7 give the row addresses of matrix j.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void *row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(row)));
}

// Transpose an 8x8 f16 matrix held one f16x2 per lane (row g, cols 2t, 2t+1).
__device__ __forceinline__ uint32_t movmatrix_trans(uint32_t x) {
    uint32_t y;
    asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
    return y;
}

// 16 bytes global -> shared, bypassing L1; bytes past `src_bytes` (0..16) are zero-filled. A
// short copy (a block's tail, which may end its allocation) takes plain byte loads instead:
// compute-sanitizer's memcheck counts a cp.async of a smaller source size as a 16-byte read.
__device__ __forceinline__ void cp_async16(void *dst, const void *src, int src_bytes) {
    if (src_bytes == 16) {
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(smem_addr(dst)), "l"(src));
        return;
    }
    uint32_t w[4] = {};
#pragma unroll
    for (int i = 0; i < 16; ++i)
        if (i < src_bytes) w[i / 4] |= (uint32_t)static_cast<const uint8_t *>(src)[i] << (8 * (i % 4));
    *static_cast<uint4 *>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }

// Programmatic dependent launch (sm_90): a decode kernel lets the step's combine kernel launch
// once all its CTAs have started, and the combine waits for the decode kernel's writes before
// it reads them, so the combine's launch overlaps the decode kernel's last wave.
__device__ __forceinline__ void launch_dependents() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;");
#endif
}
__device__ __forceinline__ void wait_prerequisites() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(PENDING));
}

__device__ __forceinline__ uint32_t half2_bits(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&h);
}

// (a, b) as two f16x2 operands: rounded (hi), and what the rounding left (lo). Multiplied by
// the same A, hi + lo keep about 22 bits of each value.
__device__ __forceinline__ void split_half2(float a, float b, uint32_t &hi, uint32_t &lo) {
    const __half2 h = __floats2half2_rn(a, b);
    hi = *reinterpret_cast<const uint32_t *>(&h);
    lo = half2_bits(a - __low2float(h), b - __high2float(h));
}

// Key slots of a k-step: thread t's value i (i < 4) of a B fragment is the query of channel
// (or bit) 16s + t + key_slot(i), so that each A register of a token's codes is one mask of
// its 16-channel word (slots 2t, 2t+1 are t, t+8; slots 2t+8, 2t+9 are t+4, t+12).
__host__ __device__ constexpr int key_slot(int i) { return 8 * (i & 1) + 4 * (i >> 1); }

// f16x2 of two 0/1 bits: the bits of `w` selected by 0x00010001 << s, s <= 10, times
// 0x3C00 >> s (1.0 in f16 is 0x3C00 = 15 << 10, so the product is exact and never carries).
__device__ __forceinline__ uint32_t bits_to_half2(uint32_t w, int s) {
    return (w & (0x00010001u << s)) * (0x3C00u >> s);
}

// f16x2 of two 2-bit codes, exact: bits [s, s+2) of `w` low, bits [s+16, s+18) high. A code
// under the mantissa of 0x6400 (1024.0, ulp 1) reads as 1024 + code; one subtraction leaves it.
__device__ __forceinline__ uint32_t codes2_to_half2(uint32_t w, int s) {
    const uint32_t x = ((w >> s) & 0x00030003u) | 0x64006400u;
    const __half2 h = __hsub2(*reinterpret_cast<const __half2 *>(&x), __half2half2(__ushort_as_half(0x6400)));
    return *reinterpret_cast<const uint32_t *>(&h);
}

// f16x2 of two 4-bit codes, exact: bits [s, s+4) of `w` low, bits [s+16, s+20) high, as
// codes2_to_half2.
__device__ __forceinline__ uint32_t codes4_to_half2(uint32_t w, int s) {
    const uint32_t x = ((w >> s) & 0x000F000Fu) | 0x64006400u;
    const __half2 h = __hsub2(*reinterpret_cast<const __half2 *>(&x), __half2half2(__ushort_as_half(0x6400)));
    return *reinterpret_cast<const uint32_t *>(&h);
}

}  // namespace kvb
