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

    __device__ static void encode(uint8_t *grp, float v, int L, int lane) {
        // Largest |v|, lowest lane on ties; padding lanes never win.
        float a = lane < L ? fabsf(v) : -1.f;
        int at = lane;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float a2 = __shfl_xor_sync(0xffffffffu, a, o);
            const int at2 = __shfl_xor_sync(0xffffffffu, at, o);
            if (a2 > a || (a2 == a && at2 < at)) a = a2, at = at2;
        }
        const float vmax = __shfl_sync(0xffffffffu, v, at);
        // The CPU starts from max = +0 and replaces it only on a strictly larger magnitude.
        const float s = (a > 0.f ? vmax : 0.f) / -8.f;
        const float inv = s != 0.f ? 1.f / s : 0.f;
        if (lane == 0) *reinterpret_cast<__half *>(grp) = __float2half_rn(s);  // rows, groups even
        const int code = min(15, (int)__fadd_rn(__fmul_rn(v, inv), 8.5f));
        const int high = __shfl_down_sync(0xffffffffu, code, L / 2);
        if (lane < L / 2) grp[2 + lane] = (uint8_t)(code | high << 4);
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
