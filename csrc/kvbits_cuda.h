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

#ifdef __cplusplus
}
#endif

#endif
