// The one dispatch point: every kernel, templated on head dim, switching on format ids through
// the table in formats.cuh. Launchers check their arguments before launching anything.

#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <utility>

#include "block_stage.cuh"
#include "decode_mma.cuh"
#include "decode_prepared.cuh"
#include "decode_tiles.cuh"
#include "formats.cuh"

namespace kvb {

// Call f.template operator()<D>() for a supported head dim; false otherwise.
template <typename F>
bool with_head_dim(int d, F &&f) {
    switch (d) {
        case 64: f.template operator()<64>(); return true;
        case 80: f.template operator()<80>(); return true;
        case 96: f.template operator()<96>(); return true;
        case 112: f.template operator()<112>(); return true;
        case 128: f.template operator()<128>(); return true;
        case 256: f.template operator()<256>(); return true;
        default: return false;
    }
}

// Raise `kernel`'s dynamic shared memory cap to `bytes` on the current device, once:
// cudaFuncSetAttribute costs microseconds, as much as a small kernel runs.
cudaError_t allow_smem(const void *kernel, size_t bytes) {
    static std::mutex lock;
    static std::map<std::pair<const void *, int>, size_t> allowed;
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    std::lock_guard<std::mutex> guard(lock);
    size_t &cap = allowed[{kernel, device}];
    if (bytes <= cap) return cudaSuccess;
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (err == cudaSuccess) cap = bytes;
    return err;
}

// Whether `bytes` of dynamic shared memory fit one CTA on the current device (227 KB on
// sm_80 and sm_90, 99 KB on sm_86 and sm_89).
bool fits_smem(size_t bytes) {
    int device = 0, optin = 0;
    return cudaGetDevice(&device) == cudaSuccess &&
           cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess &&
           bytes <= (size_t)optin;
}

// Whether the current device is sm_90 or newer (thread block clusters, programmatic
// dependent launch).
bool sm90_or_newer() {
    int device = 0, major = 0;
    return cudaGetDevice(&device) == cudaSuccess &&
           cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess && major >= 9;
}

// CTAs per LOCAL work item: on sm_90, a cluster of two where the items alone would leave
// multiprocessors idle (two CTAs of eight warps give each of a 16-block span's warps one
// block; more would make warps share blocks, each preparing the query of every block it
// enters, which measured slower).
int local_ctas(int n_work) {
    int device = 0, sms = 0;
    if (!sm90_or_newer() || cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
        return 1;
    return n_work < sms ? 2 : 1;
}

bool known_format(int f) {
#define KVB_KNOWN(ID, FMT) if (f == ID) return true;
    KVB_FORMATS(KVB_KNOWN)
#undef KVB_KNOWN
    return false;
}

// ---- quantize and dequantize: a block per job -------------------------------------------
// A format may declare its quantizer's CTAs per block, their threads and shared memory, and
// the CTAs per multiprocessor it is built for: the helpers below read each, with a default.

// CTAs per block a format quantizes with: its kQuantParts (each CTA then gets its part), else 1.
template <class F>
constexpr int quant_parts() {
    if constexpr (requires { F::kQuantParts; }) return F::kQuantParts;
    else return 1;
}

// Bytes of shared memory a format's quantizer uses: its kQuantSmem, else none. Per format,
// so that the formats that need none keep every CTA slot of a multiprocessor.
template <class F>
constexpr int quant_smem() {
    if constexpr (requires { F::kQuantSmem; }) return F::kQuantSmem;
    else return 0;
}

// Threads of a format's quantize CTA: its kQuantThreads, else kThreads.
template <class F>
constexpr int quant_threads() {
    if constexpr (requires { F::kQuantThreads; }) return F::kQuantThreads;
    else return kThreads;
}

// Threads to launch a format's quantize CTAs with, for n_jobs blocks: quant_threads, halved
// (down to kThreads) while one CTA per multiprocessor would leave blocks for a second wave; a
// format whose CTA is larger than kThreads strides by blockDim.x.
template <class F>
int quant_cta_threads(int n_jobs) {
    int threads = quant_threads<F>(), device = 0, sms = 0;
    if (threads == kThreads || cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
        return threads;
    while (threads > kThreads && n_jobs > sms * (quant_threads<F>() / threads)) threads /= 2;
    return threads;
}

// CTAs per multiprocessor a format's quantize kernel is built for: its kQuantMinCtas, else 8
// (64 registers: a group's values still fit, and twice the warps of what ptxas picks alone
// wait on memory at once).
template <class F>
constexpr int quant_min_ctas() {
    if constexpr (requires { F::kQuantMinCtas; }) return F::kQuantMinCtas;
    else return 8;
}

// A kernel per (head dim, format): each gets its own register count, which a switch over
// every format would set to the largest.
template <int D, class F>
__global__ void __launch_bounds__(quant_threads<F>(), quant_min_ctas<F>())
    quantize_kernel(int is_f16, const kvb_cuda_quant_job *jobs, QuantParams p, uint8_t *arena) {
    extern __shared__ float smem[];
    const kvb_cuda_quant_job job = jobs[blockIdx.x];
    const Src x{job.x, job.x_stride, is_f16};
    uint8_t *out = arena + job.out_offset;
    if constexpr (requires { F::kQuantParts; }) F::quantize(x, job.n, job.role, job.protect, p, out, smem, blockIdx.y);
    else F::quantize(x, job.n, job.role, job.protect, p, out, smem);
}

template <int D>
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(int format, const kvb_cuda_dequant_job *jobs, const uint8_t *arena) {
    const kvb_cuda_dequant_job job = jobs[blockIdx.x];
    const uint8_t *blk = arena + job.offset;
    __half *out = static_cast<__half *>(job.out);
    switch (format) {
#define KVB_DEQUANT(ID, FMT) \
    case ID: FMT<D>::dequantize(blk, job.n, job.role, out, job.out_stride); break;
        KVB_FORMATS(KVB_DEQUANT)
#undef KVB_DEQUANT
    }
}

// ---- decode attention ------------------------------------------------------------------
// Per work item (a run of blocks of one KV head): all G query heads of that KV head share each
// read of the blocks. Per block: prepare the query for the key format, then per chunk of
// kChunk tokens: scores, scale and calibrate, online-softmax update, accumulate values.
// Partial (max, sum, acc) per item and head go to scratch; combine_kernel merges them. The
// formats' scores and accumulate may use the tensor cores inside a chunk (k1_5_mix and
// v1_58_tern do, for the vidkv caches decode_prepared.cuh does not take).

// The formats a generic instance reads, as calls by format id: every format of the table
// (AnyFormat), or one key and one value format with f16 (FormatPair: the compiler then sizes
// registers for those alone, so more CTAs share a multiprocessor).
template <int D>
struct AnyFormat {
    static constexpr int kMinCtas = 3;  // at most 168 registers, as before FormatPair
    __device__ static void prepare(int fmt, const uint8_t *blk, int n, const float *q, int G, float *qt) {
        switch (fmt) {
#define KVB_PREP(ID, FMT) case ID: FMT<D>::prepare(blk, n, q, G, qt); break;
            KVB_FORMATS(KVB_PREP)
#undef KVB_PREP
        }
    }
    __device__ static void scores(int fmt, const uint8_t *blk, int n, int t0, int t1, const float *q,
                                  const float *qt, int G, float *s) {
        switch (fmt) {
#define KVB_SCORE(ID, FMT) case ID: FMT<D>::scores(blk, n, t0, t1, q, qt, G, s); break;
            KVB_FORMATS(KVB_SCORE)
#undef KVB_SCORE
        }
    }
    __device__ static void accumulate(int fmt, const uint8_t *blk, int n, int t0, int t1, const float *p, int G,
                                      float *acc, float *vt) {
        switch (fmt) {
#define KVB_ACC(ID, FMT) case ID: FMT<D>::accumulate(blk, n, t0, t1, p, G, acc, vt); break;
            KVB_FORMATS(KVB_ACC)
#undef KVB_ACC
        }
    }
    __device__ static void finish(int fmt, const uint8_t *blk, int n, int G, float *acc, float *vt) {
        switch (fmt) {
#define KVB_FIN(ID, FMT) case ID: FMT<D>::finish(blk, n, G, acc, vt); break;
            KVB_FORMATS(KVB_FIN)
#undef KVB_FIN
        }
    }
    __device__ static int64_t stored_bytes(int fmt, const uint8_t *blk, int n, int role) {
        switch (fmt) {
#define KVB_STORED(ID, FMT) case ID: return stored_bytes_of<FMT<D>>(blk, n, role);
            KVB_FORMATS(KVB_STORED)
#undef KVB_STORED
        }
        return 0;
    }
};

// KF keys and VF values, and f16 blocks beside them (a cache's recent tokens).
template <int D, class KF, class VF, int kCtas>
struct FormatPair {
    static constexpr int kMinCtas = kCtas;
    using F16s = FmtF16<D>;
    __device__ static void prepare(int fmt, const uint8_t *blk, int n, const float *q, int G, float *qt) {
        if (fmt == F16) F16s::prepare(blk, n, q, G, qt);
        else KF::prepare(blk, n, q, G, qt);
    }
    __device__ static void scores(int fmt, const uint8_t *blk, int n, int t0, int t1, const float *q,
                                  const float *qt, int G, float *s) {
        if (fmt == F16) F16s::scores(blk, n, t0, t1, q, qt, G, s);
        else KF::scores(blk, n, t0, t1, q, qt, G, s);
    }
    __device__ static void accumulate(int fmt, const uint8_t *blk, int n, int t0, int t1, const float *p, int G,
                                      float *acc, float *vt) {
        if (fmt == F16) F16s::accumulate(blk, n, t0, t1, p, G, acc, vt);
        else VF::accumulate(blk, n, t0, t1, p, G, acc, vt);
    }
    __device__ static void finish(int fmt, const uint8_t *blk, int n, int G, float *acc, float *vt) {
        if (fmt == F16) F16s::finish(blk, n, G, acc, vt);
        else VF::finish(blk, n, G, acc, vt);
    }
    __device__ static int64_t stored_bytes(int fmt, const uint8_t *blk, int n, int role) {
        if (fmt == F16) return stored_bytes_of<F16s>(blk, n, role);
        return role == KEY ? stored_bytes_of<KF>(blk, n, role) : stored_bytes_of<VF>(blk, n, role);
    }
};

__global__ void init_span_range(float *range, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        range[2 * i] = INFINITY, range[2 * i + 1] = -INFINITY;
}

template <int D>
__device__ void load_queries(const kvb_cuda_decode_args &a, const kvb_cuda_work &w, int G, float *q) {
    const float *src = a.q + ((size_t)w.seq * a.n_head + (size_t)w.kv_head * G) * D;
    for (int i = threadIdx.x; i < G * D; i += kThreads) q[i] = src[i];
}

// Pass 1 for calibrated spans: min and max logit of each span per query head.
template <int D>
__global__ void __launch_bounds__(kThreads) span_range_kernel(kvb_cuda_decode_args a) {
    extern __shared__ float sm[];
    const kvb_cuda_work w = a.work[blockIdx.x];
    const int G = a.n_head / a.n_head_kv;
    float *q = sm, *qt = q + G * D, *s = qt + G * kPrepMax<D> + kPrepSharedMax<D>;
    Scratch scr = scratch_layout(a.scratch, a.n_seq, a.n_spans, a.n_head);
    load_queries<D>(a, w, G, q);
    __syncthreads();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int b = 0; b < w.n_blocks; ++b) {
        const kvb_cuda_block blk = a.blocks[w.first_block + b];
        if (blk.span < 0) continue;
        const uint8_t *kb = a.arena + blk.k_offset;
        AnyFormat<D>::prepare(blk.k_format, kb, blk.n, q, G, qt);
        __syncthreads();
        for (int t0 = 0; t0 < blk.n; t0 += kChunk) {
            int t1 = min(blk.n, t0 + kChunk);
            AnyFormat<D>::scores(blk.k_format, kb, blk.n, t0, t1, q, qt, G, s);
            __syncthreads();
            for (int g = warp; g < G; g += kThreads / 32) {
                float mn = INFINITY, mx = -INFINITY;
                for (int t = lane; t < t1 - t0; t += 32) {
                    float v = s[g * kChunk + t] * a.scale;
                    mn = fminf(mn, v), mx = fmaxf(mx, v);
                }
                mn = warp_min(mn), mx = warp_max(mx);
                if (lane == 0) {
                    int h = w.kv_head * G + g;
                    float *r = scr.span_range + (((size_t)w.seq * a.n_spans + blk.span) * a.n_head + h) * 2;
                    atomic_min_f(r, mn);
                    atomic_max_f(r + 1, mx);
                }
            }
            __syncthreads();
        }
    }
}

// The generic kernel's floats (query, prepared query, scores, accumulators, softmax state),
// rounded up to 16 bytes; its two block stages follow.
template <int D>
__host__ __device__ size_t decode_floats_bytes(int G) {
    return (sizeof(float) * ((size_t)G * (D + kPrepMax<D> + kChunk + 2 * D) + kPrepSharedMax<D> + 3 * G) + 15) &
           ~(size_t)15;
}

template <int D>
size_t decode_smem(int G) {
    return decode_floats_bytes<D>(G) + 2 * kBlockStage;
}

template <int D, class Formats>
__global__ void __launch_bounds__(kThreads, Formats::kMinCtas) decode_kernel(kvb_cuda_decode_args a) {
    launch_dependents();
    extern __shared__ float sm[];
    const kvb_cuda_work w = a.work[blockIdx.x];
    const int G = a.n_head / a.n_head_kv;
    float *q = sm, *qt = q + G * D, *s = qt + G * kPrepMax<D> + kPrepSharedMax<D>, *acc = s + G * kChunk;
    float *vt = acc + G * D, *m = vt + G * D, *l = m + G, *corr = l + G;
    Scratch scr = scratch_layout(a.scratch, a.n_seq, a.n_spans, a.n_head);
    load_queries<D>(a, w, G, q);
    for (int i = threadIdx.x; i < G * D; i += kThreads) acc[i] = 0.f, vt[i] = 0.f;
    for (int g = threadIdx.x; g < G; g += kThreads) m[g] = -INFINITY, l[g] = 0.f;
    uint8_t *stages = reinterpret_cast<uint8_t *>(sm) + decode_floats_bytes<D>(G);
    __shared__ int64_t sizes[2][2];  // K and V bytes of the next two blocks, by parity
    size_block<Formats>(a, w, 0, sizes[0]);
    __syncthreads();
    // Where the GPU cannot give a CTA the stages too (sm_86/89 at head dim 256 and many query
    // heads per KV head), the launch has none and every block is read in place.
    const bool staging = dynamic_smem_bytes() >= decode_floats_bytes<D>(G) + 2 * kBlockStage;
    bool staged = stage_block(a, w, 0, sizes[0], stages, staging);
    cp_async_commit();
    size_block<Formats>(a, w, 1, sizes[1]);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int b = 0; b < w.n_blocks; ++b) {
        const kvb_cuda_block blk = a.blocks[w.first_block + b];
        cp_async_wait<0>();
        __syncthreads();
        const uint8_t *kb = a.arena + blk.k_offset, *vb = a.arena + blk.v_offset;
        if (staged) kb = stages + (b & 1) * kBlockStage, vb = kb + ((int64_t)(sizes[b & 1][0] + 15) & ~15LL);
        staged = stage_block(a, w, b + 1, sizes[(b + 1) & 1], stages + ((b + 1) & 1) * kBlockStage, staging);
        cp_async_commit();
        __syncthreads();  // every thread has read sizes[b & 1]
        size_block<Formats>(a, w, b + 2, sizes[b & 1]);
        Formats::prepare(blk.k_format, kb, blk.n, q, G, qt);
        __syncthreads();
        for (int t0 = 0; t0 < blk.n; t0 += kChunk) {
            int t1 = min(blk.n, t0 + kChunk), len = t1 - t0;
            Formats::scores(blk.k_format, kb, blk.n, t0, t1, q, qt, G, s);
            __syncthreads();
            for (int g = warp; g < G; g += kThreads / 32) {
                // Calibration (CalibQuant): a' = lo + (a - lo)(hi - lo - δ)/(hi - lo) over the
                // span's logits; a span whose range is within δ keeps its scores.
                float lo = 0.f, ratio = 1.f;
                if (blk.span >= 0) {
                    int h = w.kv_head * G + g;
                    const float *r = scr.span_range + (((size_t)w.seq * a.n_spans + blk.span) * a.n_head + h) * 2;
                    float range = r[1] - r[0];
                    if (range > a.calib_delta) lo = r[0], ratio = (range - a.calib_delta) / range;
                }
                float mx = -INFINITY;
                for (int t = lane; t < len; t += 32) {
                    float v = s[g * kChunk + t] * a.scale;
                    v = lo + (v - lo) * ratio;
                    s[g * kChunk + t] = v;
                    mx = fmaxf(mx, v);
                }
                mx = warp_max(mx);
                float m_new = fmaxf(m[g], mx), sum = 0.f;
                for (int t = lane; t < len; t += 32) {
                    float p = __expf(s[g * kChunk + t] - m_new);
                    s[g * kChunk + t] = p;
                    sum += p;
                }
                sum = warp_sum(sum);
                if (lane == 0) {
                    float c = __expf(m[g] - m_new);
                    corr[g] = c;
                    l[g] = l[g] * c + sum;
                    m[g] = m_new;
                }
            }
            __syncthreads();
            for (int i = threadIdx.x; i < G * D; i += kThreads) {
                float c = corr[i / D];
                acc[i] *= c;
                vt[i] *= c;
            }
            __syncthreads();
            Formats::accumulate(blk.v_format, vb, blk.n, t0, t1, s, G, acc, vt);
            __syncthreads();
        }
        Formats::finish(blk.v_format, vb, blk.n, G, acc, vt);
        __syncthreads();
    }
    float *part = scr.partial + (size_t)blockIdx.x * G * (D + 2);
    for (int i = threadIdx.x; i < G * (D + 2); i += kThreads) {
        int g = i / (D + 2), j = i % (D + 2);
        part[i] = j == 0 ? m[g] : j == 1 ? l[g] : acc[g * D + j - 2];
    }
}

// Merge the items of each (sequence, query head): out = Σ e^(m_i - M) acc_i / Σ e^(m_i - M) l_i.
// A warp takes kCombineRun items at a time (a lane reads channels lane + 32k of each item, so an
// item is one coalesced read) and keeps its own running max: every load of a run goes out at
// once, with no pass for the max first. The warps then meet in shared memory, each rescaled to
// the largest max. Sized so that one run per warp covers the items a step usually has.
constexpr int kCombineThreads = 512, kCombineRun = 8;

template <int D>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(kvb_cuda_decode_args a) {
    constexpr int kPer = (D + 31) / 32, kWarps = kCombineThreads / 32, kRun = kCombineRun;
    __shared__ float sums[kWarps][D + 2];  // a warp's Σ e·acc per channel, Σ e·l, its max
    const int G = a.n_head / a.n_head_kv;
    const int seq = blockIdx.x / a.n_head, h = blockIdx.x % a.n_head, kv = h / G, g = h % G;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    Scratch scr = scratch_layout(a.scratch, a.n_seq, a.n_spans, a.n_head);
    const int i0 = a.work_begin[seq * a.n_head_kv + kv], i1 = a.work_begin[seq * a.n_head_kv + kv + 1];
    wait_prerequisites();
    auto item = [&](int i) { return scr.partial + ((size_t)i * G + g) * (D + 2); };
    float M = -INFINITY, L = 0.f, v[kPer] = {};
    for (int r0 = i0 + warp * kRun; r0 < i1; r0 += kWarps * kRun) {
        float m[kRun], l[kRun], x[kRun][kPer];
#pragma unroll
        for (int u = 0; u < kRun; ++u) {
            const float *p = item(min(r0 + u, i1 - 1));
            m[u] = r0 + u < i1 ? p[0] : -INFINITY;
            l[u] = p[1];
#pragma unroll
            for (int k = 0; k < kPer; ++k) x[u][k] = lane + 32 * k < D ? p[2 + lane + 32 * k] : 0.f;
        }
        float mr = M;
#pragma unroll
        for (int u = 0; u < kRun; ++u) mr = fmaxf(mr, m[u]);
        if (mr == -INFINITY) continue;  // items without a token so far
        const float keep = __expf(M - mr);
        L *= keep;
#pragma unroll
        for (int k = 0; k < kPer; ++k) v[k] *= keep;
#pragma unroll
        for (int u = 0; u < kRun; ++u) {
            const float e = __expf(m[u] - mr);
            L += l[u] * e;
#pragma unroll
            for (int k = 0; k < kPer; ++k) v[k] += x[u][k] * e;
        }
        M = mr;
    }
#pragma unroll
    for (int k = 0; k < kPer; ++k)
        if (lane + 32 * k < D) sums[warp][lane + 32 * k] = v[k];
    if (lane == 0) sums[warp][D] = L, sums[warp][D + 1] = M;
    __syncthreads();
    float top = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) top = fmaxf(top, sums[w][D + 1]);
    float *out = a.out + ((size_t)seq * a.n_head + h) * D;
    for (int c = threadIdx.x; c < D; c += kCombineThreads) {
        float acc = 0.f, total = 0.f;
        if (top != -INFINITY) {
#pragma unroll
            for (int w = 0; w < kWarps; ++w) {
                const float e = __expf(sums[w][D + 1] - top);
                acc += sums[w][c] * e, total += sums[w][D] * e;
            }
        }
        out[c] = total > 0.f ? acc / total : 0.f;
    }
}

// The step's combine launch; on sm_90 a programmatic dependent of the decode kernel before it
// (see launch_dependents). Returns its error, else the error of an earlier launch.
template <int D>
cudaError_t launch_combine(const kvb_cuda_decode_args &a, cudaStream_t s) {
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(a.n_seq * a.n_head), cfg.blockDim = dim3(kCombineThreads), cfg.stream = s;
    cudaLaunchAttribute pdl{};
    pdl.id = cudaLaunchAttributeProgrammaticStreamSerialization;
    pdl.val.programmaticStreamSerializationAllowed = 1;
    if (sm90_or_newer()) cfg.attrs = &pdl, cfg.numAttrs = 1;
    const cudaError_t err = cudaLaunchKernelEx(&cfg, combine_kernel<D>, a), earlier = cudaGetLastError();
    return err != cudaSuccess ? err : earlier;
}

// ---- the decode dispatch: which kernels a call runs ---------------------------------------

// A kernel of a decode step: all take kvb_cuda_decode_args, a CTA per work item. item_cost is
// what a work item costs its multiprocessor besides its blocks, in block-times, for the
// planner (kvb_cuda_decode_fit_of): the query, the merge of the warps and the partial, about a
// block where a block reads fast; none in decode_prepared.cuh, whose blocks' own preparing
// and tensor-core work dwarf it (more, shorter items measured faster there).
struct DecodeKernel {
    const void *fn = nullptr;
    int threads = 0;
    size_t smem = 0;
    float item_cost = 1.f;
};

// Whether decode_mma.cuh's tensor-core kernels take the call: f16 and q1_calib blocks only,
// at most 8 query heads per KV head, not generic_only. Both its split and one-pass paths ask.
inline bool mma_call(const kvb_cuda_decode_args &a) {
    constexpr uint32_t kMmaFormats = (1u << F16) | (1u << Q1_CALIB);
    return !a.generic_only && a.n_head / a.n_head_kv <= MmaDecode<64>::kHeads && a.formats_used != 0 &&
           (a.formats_used & ~kMmaFormats) == 0;
}

// Shared memory of the one-pass (LOCAL) kernel for the call's formats.
template <int D>
size_t local_smem(const kvb_cuda_decode_args &a) {
    return MmaDecode<D, kPassWarps<Pass::kLocal>>::smem_bytes((a.formats_used >> F16) & 1, kPassParts<Pass::kLocal>,
                                                               true);
}

// The kernels of a split decode (every call but LOCAL's one pass): the range pass of calibrated
// spans where there are any, then the main kernel, then combine. The launcher runs them and the
// planner sizes work items by the main kernel's CTAs per multiprocessor
// (kvb_cuda_decode_fit_of), so both read this one choice. Allows each kernel's shared
// memory.
struct SplitKernels {
    DecodeKernel range, main;
};

template <int D>
cudaError_t split_kernels(const kvb_cuda_decode_args &a, SplitKernels &k) {
    const int G = a.n_head / a.n_head_kv;
    const bool has_f16 = (a.formats_used >> F16) & 1;
    auto pick = [](DecodeKernel &dk, const void *fn, int threads, size_t smem, float item_cost = 1.f) {
        dk = DecodeKernel{fn, threads, smem, item_cost};
        return allow_smem(fn, smem);
    };
    constexpr uint32_t kVidkv = (1u << K1_5_MIX) | (1u << V1_58_TERN);
    if constexpr (D <= 128) {
        // The tiled kernels read kivi2 or the AKVQ formats (q2_had, q4_had, either mixed), f16
        // blocks beside them, and no calibration; decode_prepared.cuh the vidkv caches
        // (k1_5_mix keys, v1_58_tern values, f16 recent tokens).
        const uint32_t quantized = a.formats_used & ~(1u << F16);
        const bool tiles = !a.generic_only && G <= MmaDecode<64>::kHeads && a.n_spans == 0;
        constexpr uint32_t kHad = (1u << Q2_HAD) | (1u << Q4_HAD);
        auto tiled = [&]<class KF, class VF>() {
            using T = TileDecode<D, KF, VF>;
            return pick(k.main, (const void *)decode_tiles_kernel<D, KF, VF>, T::kWarps * 32, T::smem_bytes(has_f16));
        };
        if (tiles && quantized != 0 && (quantized & ~kVidkv) == 0) {
            using P = PreparedDecode<D, FmtK1_5Mix<D>, FmtV1_58Tern<D>>;
            return pick(k.main, (const void *)decode_prepared_kernel<D, FmtK1_5Mix<D>, FmtV1_58Tern<D>>, kThreads,
                        P::smem_bytes(has_f16), 0.f);
        }
        if (tiles && quantized == 1u << KIVI2) return tiled.template operator()<FmtKivi2<D>, FmtKivi2<D>>();
        if (tiles && quantized == 1u << Q2_HAD) return tiled.template operator()<FmtQ2Had<D>, FmtQ2Had<D>>();
        if (tiles && quantized != 0 && (quantized & ~kHad) == 0)
            return tiled.template operator()<FmtHadMix<D>, FmtHadMix<D>>();
        if (mma_call(a)) {
            constexpr int kThreadsMma = kPassWarps<Pass::kAttend> * 32;
            using A = MmaDecode<D, kPassWarps<Pass::kAttend>>;
            if (a.n_spans > 0) {
                const size_t smem_range = A::smem_bytes(has_f16, kPassParts<Pass::kRange>, false);
                const cudaError_t err =
                    pick(k.range, (const void *)decode_mma_kernel<D, Pass::kRange>, kThreadsMma, smem_range);
                if (err != cudaSuccess) return err;
            }
            return pick(k.main, (const void *)decode_mma_kernel<D, Pass::kAttend>, kThreadsMma,
                        A::smem_bytes(has_f16, kPassParts<Pass::kAttend>, false));
        }
    }
    const size_t smem_range = decode_floats_bytes<D>(G);
    const size_t smem = fits_smem(decode_smem<D>(G)) ? decode_smem<D>(G) : smem_range;
    if (a.n_spans > 0) {
        const cudaError_t err = pick(k.range, (const void *)span_range_kernel<D>, kThreads, smem_range);
        if (err != cudaSuccess) return err;
    }
    // VidKV caches the kernels above do not take (head dim 256, more than 8 query heads per KV
    // head, generic_only) have an instance of their own.
    const void *fn = (a.formats_used & ~(1u << F16)) == kVidkv
                         ? (const void *)decode_kernel<D, FormatPair<D, FmtK1_5Mix<D>, FmtV1_58Tern<D>, 4>>
                         : (const void *)decode_kernel<D, AnyFormat<D>>;
    return pick(k.main, fn, kThreads, smem);
}

// Whether a call calibrates its spans in one pass (LOCAL): every item one whole span on the
// tensor-core kernel, whose logits fit shared memory (else the split path's range pass runs
// first).
template <int D>
bool one_pass(const kvb_cuda_decode_args &a) {
    return mma_call(a) && a.local_spans && a.n_spans > 0 && fits_smem(local_smem<D>(a));
}

// LOCAL: the one-pass kernel (a cluster of two CTAs per item where the items are fewer than
// the multiprocessors), then combine.
template <int D>
cudaError_t launch_local(const kvb_cuda_decode_args &a, cudaStream_t s) {
    using L = MmaDecode<D, kPassWarps<Pass::kLocal>>;
    const void *fn = (const void *)decode_mma_kernel<D, Pass::kLocal>;
    const size_t smem = local_smem<D>(a);
    cudaError_t err = allow_smem(fn, smem);
    if (err != cudaSuccess) return err;
    const int ctas = local_ctas(a.n_work);
    cudaLaunchAttribute cluster{};
    cluster.id = cudaLaunchAttributeClusterDimension;
    cluster.val.clusterDim.x = ctas, cluster.val.clusterDim.y = 1, cluster.val.clusterDim.z = 1;
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(a.n_work * ctas), cfg.blockDim = dim3(L::kWarps * 32);
    cfg.dynamicSmemBytes = smem, cfg.stream = s;
    if (ctas > 1) cfg.attrs = &cluster, cfg.numAttrs = 1;
    if ((err = cudaLaunchKernelEx(&cfg, decode_mma_kernel<D, Pass::kLocal>, a)) != cudaSuccess) return err;
    return launch_combine<D>(a, s);
}

}  // namespace kvb

using namespace kvb;

extern "C" int kvb_cuda_format_supported(int32_t format) { return known_format(format); }

extern "C" int kvb_cuda_quantize(int32_t format, int32_t head_dim, int32_t x_is_f16,
                                 const kvb_cuda_quant_job *jobs, int32_t n_jobs,
                                 kvb_cuda_quant_params params, uint8_t *arena,
                                 kvb_cuda_stream stream) {
    if (!known_format(format) || !jobs || !arena || n_jobs < 0) return KVB_CUDA_INVALID_ARGUMENT;
    if (n_jobs == 0) return cudaSuccess;
    cudaError_t err = cudaSuccess;
    bool ok = with_head_dim(head_dim, [&]<int D>() {
        auto launch = [&]<class F>() {
            const void *kernel = (const void *)quantize_kernel<D, F>;
            if (quant_smem<F>() > 0 && (err = allow_smem(kernel, quant_smem<F>())) != cudaSuccess) return;
            const dim3 grid(n_jobs, quant_parts<F>());
            quantize_kernel<D, F><<<grid, quant_cta_threads<F>(n_jobs), quant_smem<F>(),
                                    static_cast<cudaStream_t>(stream)>>>(
                x_is_f16, jobs, params, arena);
            err = cudaGetLastError();
        };
        switch (format) {
#define KVB_QUANT(ID, FMT) \
    case ID: launch.template operator()<FMT<D>>(); break;
            KVB_FORMATS(KVB_QUANT)
#undef KVB_QUANT
        }
    });
    return ok ? (int)err : (int)KVB_CUDA_INVALID_ARGUMENT;
}

extern "C" int kvb_cuda_dequantize(int32_t format, int32_t head_dim,
                                   const kvb_cuda_dequant_job *jobs, int32_t n_jobs,
                                   const uint8_t *arena, kvb_cuda_stream stream) {
    if (!known_format(format) || !jobs || !arena || n_jobs < 0) return KVB_CUDA_INVALID_ARGUMENT;
    if (n_jobs == 0) return cudaSuccess;
    cudaError_t err = cudaSuccess;
    bool ok = with_head_dim(head_dim, [&]<int D>() {
        dequantize_kernel<D><<<n_jobs, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(format, jobs, arena);
        err = cudaGetLastError();
    });
    return ok ? (int)err : (int)KVB_CUDA_INVALID_ARGUMENT;
}

extern "C" int kvb_cuda_local_ctas(int32_t n_work) { return local_ctas(n_work); }

extern "C" size_t kvb_cuda_decode_scratch_bytes(int32_t n_work, int32_t n_seq, int32_t n_head,
                                                int32_t head_dim, int32_t n_spans) {
    return sizeof(float) * ((size_t)n_seq * n_spans * n_head * 2 + (size_t)n_work * n_head * (head_dim + 2));
}

extern "C" int kvb_cuda_attention_decode(const kvb_cuda_decode_args *args, kvb_cuda_stream stream) {
    if (!args) return KVB_CUDA_INVALID_ARGUMENT;
    const kvb_cuda_decode_args a = *args;
    if (!a.arena || !a.blocks || !a.work || !a.work_begin || !a.q || !a.out || !a.scratch ||
        a.n_seq < 1 || a.n_head_kv < 1 || a.n_head % a.n_head_kv != 0 ||
        a.n_head / a.n_head_kv > kMaxG || a.n_work < 1 || a.n_spans < 0)
        return KVB_CUDA_INVALID_ARGUMENT;
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    cudaError_t err = cudaSuccess;
    bool ok = with_head_dim(a.head_dim, [&]<int D>() {
        if constexpr (D <= 128) {
            if (one_pass<D>(a)) {
                err = launch_local<D>(a, s);
                return;
            }
        }
        SplitKernels k;
        if ((err = split_kernels<D>(a, k)) != cudaSuccess) return;
        void *params[] = {const_cast<kvb_cuda_decode_args *>(&a)};
        if (k.range.fn) {
            const int n = a.n_seq * a.n_spans * a.n_head;
            init_span_range<<<(n + 255) / 256, 256, 0, s>>>(a.scratch, n);
            if ((err = cudaLaunchKernel(k.range.fn, a.n_work, k.range.threads, params, k.range.smem, s)) != cudaSuccess)
                return;
        }
        if ((err = cudaLaunchKernel(k.main.fn, a.n_work, k.main.threads, params, k.main.smem, s)) != cudaSuccess)
            return;
        err = launch_combine<D>(a, s);
    });
    return ok ? (int)err : (int)KVB_CUDA_INVALID_ARGUMENT;
}

extern "C" int kvb_cuda_decode_fit_of(uint32_t formats_used, int32_t head_dim, int32_t n_head,
                                      int32_t n_head_kv, int32_t n_spans, kvb_cuda_decode_fit *fit) {
    if (!fit || n_head_kv < 1 || n_head % n_head_kv != 0 || n_head / n_head_kv > kMaxG || n_spans < 0)
        return KVB_CUDA_INVALID_ARGUMENT;
    kvb_cuda_decode_args a{};
    a.formats_used = formats_used, a.head_dim = head_dim, a.n_head = n_head, a.n_head_kv = n_head_kv;
    a.n_spans = n_spans;
    cudaError_t err = cudaSuccess;
    const bool ok = with_head_dim(head_dim, [&]<int D>() {
        SplitKernels k;
        int ctas = 0;
        if ((err = split_kernels<D>(a, k)) != cudaSuccess ||
            (err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, k.main.fn, k.main.threads, k.main.smem)) !=
                cudaSuccess)
            return;
        fit->ctas_per_sm = ctas, fit->item_cost_blocks = k.main.item_cost;
    });
    return ok ? (int)err : (int)KVB_CUDA_INVALID_ARGUMENT;
}
