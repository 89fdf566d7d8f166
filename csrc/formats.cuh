// The one table of device formats: X(format id, struct template). Each format's device code is
// csrc/<name>.cu, the twin of src/kv/formats/<name>.rs; kernels.cu includes them all, so the
// compiler inlines every format into the fused kernels.
#pragma once

#include "f16.cu"
#include "k1_5_mix.cu"
#include "kivi2.cu"
#include "q1_calib.cu"
#include "q2_had.cu"
#include "q4_0.cu"
#include "q8_0.cu"
#include "v1_58_tern.cu"

#define KVB_FORMATS(X) \
    X(kvb::F16, kvb::FmtF16) \
    X(kvb::Q8_0, kvb::FmtQ8_0) \
    X(kvb::Q4_0, kvb::FmtQ4_0) \
    X(kvb::KIVI2, kvb::FmtKivi2) \
    X(kvb::Q1_CALIB, kvb::FmtQ1Calib) \
    X(kvb::K1_5_MIX, kvb::FmtK1_5Mix) \
    X(kvb::V1_58_TERN, kvb::FmtV1_58Tern) \
    X(kvb::Q2_HAD, kvb::FmtQ2Had) \
    X(kvb::Q4_HAD, kvb::FmtQ4Had)

namespace kvb {

// Prepared-query floats per head that any format may need.
template <int D>
constexpr int kPrepMax = 2 * D + 2;

// Every format's prepared query fits, at every head dim.
#define KVB_PREP_FITS(ID, FMT)                                                                 \
    static_assert(FMT<64>::kPrep <= kPrepMax<64> && FMT<80>::kPrep <= kPrepMax<80> &&          \
                      FMT<96>::kPrep <= kPrepMax<96> && FMT<112>::kPrep <= kPrepMax<112> &&    \
                      FMT<128>::kPrep <= kPrepMax<128> && FMT<256>::kPrep <= kPrepMax<256>,    \
                  "kPrepMax too small for " #FMT);
KVB_FORMATS(KVB_PREP_FITS)
#undef KVB_PREP_FITS

}  // namespace kvb
