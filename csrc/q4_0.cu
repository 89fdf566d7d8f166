// `q4_0` (src/kv/formats/q4_0.rs): ggml's q4_0 per token row, groups of 32 channels (16 for
// the last at d = 80, 112), each an f16 scale then L/2 bytes: channel j in the low nibble of
// byte j, channel j + L/2 in the high one. Codes match the CPU bit for bit: the signed value
// of largest magnitude (first on ties), IEEE divisions, and x·inv + 8.5 unfused (__fmul_rn,
// __fadd_rn), truncated as Rust's `as i8`.
#pragma once

#include "token_groups.cuh"

namespace kvb {

struct Q4Codec {
    static constexpr int kHead = 2, kBits = 4;

    __device__ static void encode(uint8_t *grp, const float (&v)[32], int L) {
        // The value of largest magnitude, sign kept; the first on ties. The CPU starts from
        // +0 and replaces it only on a strictly larger magnitude.
        float amax = 0.f, vmax = 0.f;
#pragma unroll
        for (int j = 0; j < 32; ++j)
            if (j < L && amax < fabsf(v[j])) amax = fabsf(v[j]), vmax = v[j];
        const float s = vmax / -8.f;
        const float inv = s != 0.f ? 1.f / s : 0.f;
        auto code = [&](int j) { return (unsigned)min(15, (int)__fadd_rn(__fmul_rn(v[j], inv), 8.5f)); };
        // Rows and groups are 2-byte aligned: the scale, then byte j = code j | code j + L/2 << 4
        // (L is 32 or 16: each a constant, so that v stays in registers).
        uint16_t *at = reinterpret_cast<uint16_t *>(grp);
        at[0] = __half_as_ushort(__float2half_rn(s));
        auto pack = [&]<int H>() {
            auto byte = [&](int j) { return code(j) | code(j + H) << 4; };
#pragma unroll
            for (int j = 0; j < H; j += 2) at[1 + j / 2] = (uint16_t)(byte(j) | byte(j + 1) << 8);
        };
        if (L == 32) pack.template operator()<16>();
        else pack.template operator()<8>();
    }

    __device__ static float decode(const uint8_t *grp, int L, int j) {
        const int h = L / 2;
        const int nib = j < h ? grp[2 + j] & 15 : grp[2 + j - h] >> 4;
        return (float)(nib - 8) * ld_f16_at(grp, 0);
    }
};

template <int D>
using FmtQ4_0 = TokenGroups<D, Q4Codec>;

}  // namespace kvb
