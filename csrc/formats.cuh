// The one table of device formats: X(format id, struct template). Each format's device code is
// csrc/<name>.cu, the twin of src/kv/formats/<name>.rs; kernels.cu includes them all, so the
// compiler inlines every format into the fused kernels.
#pragma once

#include "f16.cu"
#include "q1_calib.cu"
#include "q2_had.cu"

#define KVB_FORMATS(X) \
    X(kvb::F16, kvb::FmtF16) \
    X(kvb::Q1_CALIB, kvb::FmtQ1Calib) \
    X(kvb::Q2_HAD, kvb::FmtQ2Had) \
    X(kvb::Q4_HAD, kvb::FmtQ4Had)

namespace kvb {

// Prepared-query floats per head that any format may need.
template <int D>
constexpr int kPrepMax = 2 * D + 2;

}  // namespace kvb
