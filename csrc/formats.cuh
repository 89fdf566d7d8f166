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

// Prepared-query floats per head: the most any format needs.
template <int D>
constexpr int prep_max() {
    int most = 0;
#define KVB_PREP(ID, FMT) most = FMT<D>::kPrep > most ? FMT<D>::kPrep : most;
    KVB_FORMATS(KVB_PREP)
#undef KVB_PREP
    return most;
}
template <int D>
constexpr int kPrepMax = prep_max<D>();

// Prepared-query floats per block beside the heads' (a format's kPrepShared, at
// qt + G·kPrep): the most any format needs.
template <class F>
constexpr int prep_shared() {
    if constexpr (requires { F::kPrepShared; }) return F::kPrepShared;
    else return 0;
}
template <int D>
constexpr int prep_shared_max() {
    int most = 0;
#define KVB_PREP_SHARED(ID, FMT) most = prep_shared<FMT<D>>() > most ? prep_shared<FMT<D>>() : most;
    KVB_FORMATS(KVB_PREP_SHARED)
#undef KVB_PREP_SHARED
    return most;
}
template <int D>
constexpr int kPrepSharedMax = prep_shared_max<D>();

}  // namespace kvb
