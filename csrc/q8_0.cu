// `q8_0` (src/kv/formats/q8_0.rs): ggml's q8_0 per token row, groups of 32 channels, each an
// f16 scale then one int8 per channel. Codes match the CPU bit for bit: amax/127 and 1/s are
// IEEE f32 divisions (nvcc's default -prec-div), x·inv a single rounded product, roundf half
// away from zero as Rust's round.
#pragma once

#include "token_groups.cuh"

namespace kvb {

struct Q8Codec {
    static constexpr int kHead = 2, kBits = 8;

    __device__ static void encode(uint8_t *grp, float v, int L, int lane) {
        const float amax = warp_max(lane < L ? fabsf(v) : 0.f);
        const float s = amax / 127.f;
        // ggml takes the inverse of the f32 scale, then stores the scale as f16.
        const float inv = s != 0.f ? 1.f / s : 0.f;
        if (lane == 0) *reinterpret_cast<__half *>(grp) = __float2half_rn(s);  // rows, groups even
        // Clamped as Rust's saturating `as i8`.
        if (lane < L) grp[2 + lane] = (uint8_t)(int8_t)max(-128, min(127, (int)roundf(v * inv)));
    }

    __device__ static float decode(const uint8_t *grp, int, int j) {
        return (float)(int8_t)grp[2 + j] * ld_f16_at(grp, 0);
    }
};

template <int D>
using FmtQ8_0 = TokenGroups<D, Q8Codec>;

}  // namespace kvb
