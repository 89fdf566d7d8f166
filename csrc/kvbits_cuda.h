/* kvbits CUDA launchers and a thin runtime API: the only header the Rust side binds
 * (bindgen) and the host-facing C ABI builds on. No CUDA header is needed to include it:
 * streams and events travel as opaque pointers (a cudaStream_t is one).
 *
 * Every function returns 0 on success or the cudaError_t it met; kvb_cuda_error_string names
 * it. Launchers check their arguments and return KVB_CUDA_INVALID_ARGUMENT (an error code
 * cudaError_t never uses) before launching anything. */
#ifndef KVBITS_CUDA_H
#define KVBITS_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef void *kvb_cuda_stream; /* cudaStream_t; NULL is the legacy default stream */
typedef void *kvb_cuda_event;  /* cudaEvent_t */

enum { KVB_CUDA_INVALID_ARGUMENT = 100000 };

const char *kvb_cuda_error_string(int err);
int kvb_cuda_device_count(int *count);
int kvb_cuda_set_device(int device);
int kvb_cuda_get_device(int *device);
/* Name, SM count and L2 size of `device`; `name` gets at most `len` bytes, NUL included. */
int kvb_cuda_device_info(int device, char *name, size_t len, int *sm_count, int *l2_bytes);

int kvb_cuda_malloc(void **ptr, size_t bytes);
int kvb_cuda_free(void *ptr);
int kvb_cuda_memcpy_htod(void *dst, const void *src, size_t bytes, kvb_cuda_stream stream);
int kvb_cuda_memcpy_dtoh(void *dst, const void *src, size_t bytes, kvb_cuda_stream stream);
int kvb_cuda_memcpy_dtod(void *dst, const void *src, size_t bytes, kvb_cuda_stream stream);
int kvb_cuda_memset(void *dst, int value, size_t bytes, kvb_cuda_stream stream);

int kvb_cuda_stream_create(kvb_cuda_stream *stream);
int kvb_cuda_stream_destroy(kvb_cuda_stream stream);
int kvb_cuda_stream_synchronize(kvb_cuda_stream stream);
int kvb_cuda_event_create(kvb_cuda_event *event);
int kvb_cuda_event_destroy(kvb_cuda_event event);
int kvb_cuda_event_record(kvb_cuda_event event, kvb_cuda_stream stream);
/* Milliseconds between two recorded events; waits for `end`. */
int kvb_cuda_event_elapsed_ms(float *ms, kvb_cuda_event start, kvb_cuda_event end);

/* Copy `bytes` from `src` to `dst` with a plain kernel: the bandwidth every other kernel's
 * figure is compared with (bytes read + written per second). */
int kvb_cuda_copy_kernel(void *dst, const void *src, size_t bytes, kvb_cuda_stream stream);

/* Fill n f16 values with deterministic pseudo-random normals (scaled per channel: every
 * `channels`-th value group gets `outlier` times the scale on channels c % 17 == 3), for
 * benchmarks that need gigabytes of KV without a host round trip. */
int kvb_cuda_fill_kv(void *dst, size_t n, int32_t channels, float outlier, uint64_t seed,
                     kvb_cuda_stream stream);

/* The device `ptr` lies on (-1 for host memory or a pointer CUDA does not know). */
int kvb_cuda_pointer_device(const void *ptr, int *device);

/* ---- KV blocks in device memory ------------------------------------------------------
 * A cache keeps its blocks in one device arena; each block is the byte string of
 * docs/FORMATS.md, starting at a 16-byte aligned offset. Format ids are those of FormatId. */

typedef struct {
    float calib_alpha_k, calib_alpha_v, mix_fraction, had_clip;
} kvb_cuda_quant_params;

/* 1 when the kernels know format id `format`, else 0. */
int kvb_cuda_format_supported(int32_t format);

/* Quantize `n` tokens of one KV head: token t, channel c at x[t * x_stride + c] (f32, or f16
 * when x_is_f16), into arena + out_offset. `protect` is NULL or n flags (device memory). */
typedef struct {
    const void *x;
    int64_t x_stride;
    const uint8_t *protect;
    uint64_t out_offset;
    int32_t n;
    int32_t role; /* 0 = keys, 1 = values */
} kvb_cuda_quant_job;

/* Quantize every job (device array) with one CTA each, into `arena`. */
int kvb_cuda_quantize(int32_t format, int32_t head_dim, int32_t x_is_f16,
                      const kvb_cuda_quant_job *jobs, int32_t n_jobs,
                      kvb_cuda_quant_params params, uint8_t *arena, kvb_cuda_stream stream);

/* Decode `n` tokens of a block at arena + offset into f16 rows out[t * out_stride + c]. */
typedef struct {
    uint64_t offset;
    void *out;
    int64_t out_stride;
    int32_t n;
    int32_t role;
} kvb_cuda_dequant_job;

int kvb_cuda_dequantize(int32_t format, int32_t head_dim, const kvb_cuda_dequant_job *jobs,
                        int32_t n_jobs, const uint8_t *arena, kvb_cuda_stream stream);

/* ---- Decode attention -----------------------------------------------------------------
 * One block of K and V of one KV head. `span` >= 0 names a calibrated span (CalibQuant):
 * the scores of all its blocks are calibrated together; -1 for none. */
typedef struct {
    uint64_t k_offset, v_offset;
    int32_t n;
    int32_t k_format, v_format;
    int32_t span;
} kvb_cuda_block;

/* A unit of work: blocks [first_block, first_block + n_blocks) of one KV head of one sequence.
 * Items of one (sequence, KV head) are contiguous; work_begin[s * n_head_kv + h] is the first. */
typedef struct {
    int32_t seq, kv_head, first_block, n_blocks;
} kvb_cuda_work;

typedef struct {
    const uint8_t *arena;
    const kvb_cuda_block *blocks;
    const kvb_cuda_work *work;
    const int32_t *work_begin; /* n_seq * n_head_kv + 1 entries */
    const float *q;            /* [n_seq][n_head][head_dim] */
    float *out;                /* [n_seq][n_head][head_dim] */
    float *scratch;            /* kvb_cuda_decode_scratch_bytes() bytes */
    int32_t n_work, n_seq, n_head, n_head_kv, head_dim;
    int32_t n_spans; /* calibrated span ids are 0..n_spans, per sequence */
    float scale, calib_delta;
    uint32_t formats_used; /* bit f set when some block holds format id f: picks the kernels */
    int32_t generic_only;  /* 1: skip the tensor-core path (tests compare the two) */
    int32_t local_spans;   /* 1: every work item is one whole calibrated span, or blocks that are
                              not calibrated, of at most KVB_CUDA_LOCAL_SPAN_TOKENS tokens:
                              spans are calibrated in one pass */
} kvb_cuda_decode_args;

/* Tokens a work item may hold for one-pass calibration (its logits stay in shared memory). */
enum { KVB_CUDA_LOCAL_SPAN_TOKENS = 2048 };

/* CTAs that work on each of n_work one-pass items on the current device: 2 (a thread block
 * cluster) on sm_90 when the items are fewer than the multiprocessors, else 1. Planners use it to judge whether one-pass items fill
 * the GPU. */
int kvb_cuda_local_ctas(int32_t n_work);

/* How the main kernel of a split decode (not a one-pass one) of these formats and shapes runs
 * on the current device, for planners that size its work items: its CTAs per multiprocessor,
 * and what a work item costs its multiprocessor besides its blocks, in block-times. */
typedef struct {
    int32_t ctas_per_sm;
    float item_cost_blocks;
} kvb_cuda_decode_fit;

int kvb_cuda_decode_fit_of(uint32_t formats_used, int32_t head_dim, int32_t n_head,
                           int32_t n_head_kv, int32_t n_spans, kvb_cuda_decode_fit *fit);

/* Scratch the decode launcher needs for these sizes. */
size_t kvb_cuda_decode_scratch_bytes(int32_t n_work, int32_t n_seq, int32_t n_head,
                                     int32_t head_dim, int32_t n_spans);

/* Softmax attention of one query token per sequence over its blocks, f32 accumulation,
 * split over work items (flash-decoding) and combined. */
int kvb_cuda_attention_decode(const kvb_cuda_decode_args *args, kvb_cuda_stream stream);

/* ---- The device-resident cache (csrc/cache.cu) ------------------------------------------
 * Rows x[t][g][c] of n tokens and n_head_kv KV heads (f32, or f16 when x_is_f16) to f16 at
 * dst[g * head_stride + t * head_dim + c] (elements); *bad |= 1 where a value is NaN,
 * infinite or beyond the f16 range. */
int kvb_cuda_scatter_rows(const void *x, int32_t x_is_f16, int32_t n, int32_t n_head_kv,
                          int32_t head_dim, void *dst, int64_t head_stride, uint32_t *bad,
                          kvb_cuda_stream stream);

/* Norms of n f16 key rows per KV head (row t of head g at x + g * head_stride + t * head_dim)
 * into out[g * n + t], summed channel by channel as the CPU does. */
int kvb_cuda_key_norms(const void *x, int64_t head_stride, int32_t n, int32_t n_head_kv,
                       int32_t head_dim, float *out, kvb_cuda_stream stream);

#ifdef __cplusplus
}
#endif

#endif
