// The thin runtime layer of kvbits_cuda.h: every call returns the cudaError_t it met.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "kvbits_cuda.h"

extern "C" {

const char *kvb_cuda_error_string(int err) {
    if (err == KVB_CUDA_INVALID_ARGUMENT) return "invalid argument to a kvbits CUDA launcher";
    return cudaGetErrorString(static_cast<cudaError_t>(err));
}

int kvb_cuda_device_count(int *count) { return cudaGetDeviceCount(count); }

int kvb_cuda_set_device(int device) { return cudaSetDevice(device); }

int kvb_cuda_get_device(int *device) { return cudaGetDevice(device); }

int kvb_cuda_device_info(int device, char *name, size_t len, int *sm_count, int *l2_bytes) {
    cudaDeviceProp prop;
    cudaError_t err = cudaGetDeviceProperties(&prop, device);
    if (err != cudaSuccess) return err;
    if (name && len > 0) {
        size_t i = 0;
        for (; i + 1 < len && prop.name[i]; ++i) name[i] = prop.name[i];
        name[i] = '\0';
    }
    if (sm_count) *sm_count = prop.multiProcessorCount;
    if (l2_bytes) *l2_bytes = prop.l2CacheSize;
    return cudaSuccess;
}

int kvb_cuda_pointer_device(const void *ptr, int *device) {
    cudaPointerAttributes attr;
    cudaError_t err = cudaPointerGetAttributes(&attr, ptr);
    if (err != cudaSuccess) return err;
    const bool on_device = attr.type == cudaMemoryTypeDevice || attr.type == cudaMemoryTypeManaged;
    *device = on_device ? attr.device : -1;
    return cudaSuccess;
}

int kvb_cuda_malloc(void **ptr, size_t bytes) { return cudaMalloc(ptr, bytes); }

int kvb_cuda_free(void *ptr) { return cudaFree(ptr); }

static cudaStream_t as_stream(kvb_cuda_stream s) { return static_cast<cudaStream_t>(s); }

int kvb_cuda_memcpy_htod(void *dst, const void *src, size_t bytes, kvb_cuda_stream stream) {
    return cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, as_stream(stream));
}

int kvb_cuda_memcpy_dtoh(void *dst, const void *src, size_t bytes, kvb_cuda_stream stream) {
    return cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, as_stream(stream));
}

int kvb_cuda_memcpy_dtod(void *dst, const void *src, size_t bytes, kvb_cuda_stream stream) {
    return cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, as_stream(stream));
}

int kvb_cuda_memset(void *dst, int value, size_t bytes, kvb_cuda_stream stream) {
    return cudaMemsetAsync(dst, value, bytes, as_stream(stream));
}

int kvb_cuda_stream_create(kvb_cuda_stream *stream) {
    cudaStream_t s;
    cudaError_t err = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    if (err == cudaSuccess) *stream = s;
    return err;
}

int kvb_cuda_stream_destroy(kvb_cuda_stream stream) { return cudaStreamDestroy(as_stream(stream)); }

int kvb_cuda_stream_synchronize(kvb_cuda_stream stream) {
    return cudaStreamSynchronize(as_stream(stream));
}

int kvb_cuda_event_create(kvb_cuda_event *event) {
    cudaEvent_t e;
    cudaError_t err = cudaEventCreate(&e);
    if (err == cudaSuccess) *event = e;
    return err;
}

int kvb_cuda_event_destroy(kvb_cuda_event event) {
    return cudaEventDestroy(static_cast<cudaEvent_t>(event));
}

int kvb_cuda_event_record(kvb_cuda_event event, kvb_cuda_stream stream) {
    return cudaEventRecord(static_cast<cudaEvent_t>(event), as_stream(stream));
}

int kvb_cuda_event_elapsed_ms(float *ms, kvb_cuda_event start, kvb_cuda_event end) {
    cudaError_t err = cudaEventSynchronize(static_cast<cudaEvent_t>(end));
    if (err != cudaSuccess) return err;
    return cudaEventElapsedTime(ms, static_cast<cudaEvent_t>(start), static_cast<cudaEvent_t>(end));
}

}  // extern "C"

// 16-byte loads and stores, grid-stride: what a memory-bound kernel can reach.
__global__ void copy_kernel(uint4 *__restrict__ dst, const uint4 *__restrict__ src, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        dst[i] = src[i];
    }
}

__global__ void copy_tail_kernel(uint8_t *dst, const uint8_t *src, size_t n) {
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    if (i < n) dst[i] = src[i];
}

extern "C" int kvb_cuda_copy_kernel(void *dst, const void *src, size_t bytes,
                                    kvb_cuda_stream stream) {
    if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % 16 != 0)
        return KVB_CUDA_INVALID_ARGUMENT;
    size_t vecs = bytes / 16, tail = bytes % 16;
    int sms = 0, dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
    if (vecs > 0) {
        size_t blocks = (vecs + 255) / 256;
        size_t cap = (size_t)(sms > 0 ? sms : 80) * 8;
        copy_kernel<<<(unsigned)(blocks < cap ? blocks : cap), 256, 0, as_stream(stream)>>>(
            static_cast<uint4 *>(dst), static_cast<const uint4 *>(src), vecs);
    }
    if (tail > 0) {
        copy_tail_kernel<<<1, 16, 0, as_stream(stream)>>>(
            static_cast<uint8_t *>(dst) + vecs * 16, static_cast<const uint8_t *>(src) + vecs * 16,
            tail);
    }
    return cudaGetLastError();
}

// SplitMix64 of the element index: reproducible, independent of the launch shape.
__device__ inline uint64_t mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

__global__ void fill_kv_kernel(__half *dst, size_t n, int channels, float outlier, uint64_t seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        uint64_t r = mix64(seed ^ mix64(i));
        // Box-Muller from two 24-bit uniforms.
        float u1 = ((r >> 40) + 1.0f) / 16777217.0f, u2 = ((r >> 8) & 0xFFFFFF) / 16777216.0f;
        float z = sqrtf(-2.f * logf(u1)) * cospif(2.f * u2);
        int c = (int)(i % (size_t)channels);
        dst[i] = __float2half_rn(c % 17 == 3 ? z * outlier : z);
    }
}

extern "C" int kvb_cuda_fill_kv(void *dst, size_t n, int32_t channels, float outlier, uint64_t seed,
                                kvb_cuda_stream stream) {
    if (!dst || channels < 1) return KVB_CUDA_INVALID_ARGUMENT;
    if (n == 0) return cudaSuccess;
    size_t blocks = (n + 255) / 256;
    fill_kv_kernel<<<(unsigned)(blocks < 65536 ? blocks : 65536), 256, 0, as_stream(stream)>>>(
        static_cast<__half *>(dst), n, channels, outlier, seed);
    return cudaGetLastError();
}
