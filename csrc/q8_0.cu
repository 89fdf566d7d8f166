// `q8_0` (src/kv/formats/q8_0.rs): ggml's q8_0 per token row, groups of 32 channels, each an
// f16 scale then one int8 per channel. Codes match the CPU bit for bit: amax/127 and 1/s are
// IEEE f32 divisions (nvcc's default -prec-div), x·inv a single rounded product, roundf half
// away from zero as Rust's round.
#pragma once

#include "token_groups.cuh"

namespace kvb {

struct Q8Codec {
    static constexpr int kHead = 2, kBits = 8;

    __device__ static void encode(uint8_t *grp, const float (&v)[32], int L) {
        float amax = 0.f;
#pragma unroll
        for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(v[j]));  // v is 0 past L
        const float s = amax / 127.f;
        // ggml takes the inverse of the f32 scale, then stores the scale as f16.
        const float inv = s != 0.f ? 1.f / s : 0.f;
        // Rows and groups are 2-byte aligned: the scale, then the codes two by two.
        uint16_t *at = reinterpret_cast<uint16_t *>(grp);
        at[0] = __half_as_ushort(__float2half_rn(s));
        // Clamped as Rust's saturating `as i8`.
        auto code = [&](int j) { return (unsigned)(uint8_t)(int8_t)max(-128, min(127, (int)roundf(v[j] * inv))); };
#pragma unroll
        for (int j = 0; j < 32; j += 2)
            if (j < L) at[1 + j / 2] = (uint16_t)(code(j) | code(j + 1) << 8);
    }

    __device__ static float decode(const uint8_t *grp, int, int j) {
        return (float)(int8_t)grp[2 + j] * ld_f16_at(grp, 0);
    }
};

template <int D>
using FmtQ8_0 = TokenGroups<D, Q8Codec>;

}  // namespace kvb
