// kvbits for C++17: small RAII owners of the C handles in kvbits.h, and an exception that
// carries the status and kvb_last_error()'s message. Header-only; link the kvbits library.
#ifndef KVBITS_HPP
#define KVBITS_HPP

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "kvbits.h"

namespace kvbits {

// A failed call: `status()` is the KVB_ERR_* code, `what()` the library's message.
class Error : public std::runtime_error {
public:
    Error(int status, const char *message) : std::runtime_error(message), status_(status) {}
    int status() const noexcept { return status_; }

private:
    int status_;
};

// Throws Error for any status but KVB_OK.
inline void check(int status) {
    if (status != KVB_OK) throw Error(status, kvb_last_error());
}

// A model's KV shape, from its GGUF file.
class Model {
public:
    explicit Model(const std::string &gguf_path) {
        kvb_model *m = nullptr;
        check(kvb_model_open(gguf_path.c_str(), &m));
        model_.reset(m);
    }
    kvb_shape shape() const {
        kvb_shape s;
        check(kvb_model_shape(model_.get(), &s));
        return s;
    }
    std::string architecture() const { return kvb_model_architecture(model_.get()); }
    const kvb_model *get() const noexcept { return model_.get(); }

private:
    struct Free {
        void operator()(kvb_model *m) const noexcept { kvb_model_free(m); }
    };
    std::unique_ptr<kvb_model, Free> model_;
};

// Cache parameters: defaults, then a preset (when given), then a model's shape (when given).
inline kvb_cache_params cache_params(const char *preset = nullptr, const Model *model = nullptr) {
    kvb_cache_params p;
    kvb_cache_params_default(&p);
    if (preset) check(kvb_cache_preset(preset, &p));
    if (model) check(kvb_cache_params_for_model(model->get(), &p));
    return p;
}

// One sequence's KV cache. Movable, not copyable.
class Cache {
public:
    explicit Cache(const kvb_cache_params &p) {
        kvb_cache *c = nullptr;
        check(kvb_cache_new(&p, &c));
        cache_.reset(c);
    }
    static Cache load(const std::string &path) {
        kvb_cache *c = nullptr;
        check(kvb_cache_load(path.c_str(), &c));
        return Cache(c);
    }
    // Load onto KVB_DEVICE_CPU or KVB_DEVICE_CUDA (GPU device_id).
    static Cache load_on(const std::string &path, int32_t device, int32_t device_id = 0) {
        kvb_cache *c = nullptr;
        check(kvb_cache_load_on(path.c_str(), device, device_id, &c));
        return Cache(c);
    }

    // Rows [n_tokens][n_head_kv][head_dim]; saliency one per token or nullptr.
    void append(int32_t layer, const float *k, const float *v, int32_t n_tokens, int32_t modality,
                const float *saliency = nullptr) {
        check(kvb_cache_append(get(), layer, k, v, n_tokens, modality, saliency));
    }
    void append_f16(int32_t layer, const uint16_t *k, const uint16_t *v, int32_t n_tokens,
                    int32_t modality, const float *saliency = nullptr) {
        check(kvb_cache_append_f16(get(), layer, k, v, n_tokens, modality, saliency));
    }
    // q and out [n_head][head_dim].
    void attn_decode(int32_t layer, const float *q, float *out, float scale) {
        check(kvb_cache_attn_decode(get(), layer, q, out, scale));
    }
    void dequantize(int32_t layer, int64_t first, int64_t n, uint16_t *k_f16, uint16_t *v_f16) {
        check(kvb_cache_dequantize(get(), layer, first, n, k_f16, v_f16));
    }
    int64_t n_tokens(int32_t layer) const {
        int64_t n = kvb_cache_n_tokens(cache_.get(), layer);
        if (n < 0) throw Error(KVB_ERR_INVALID_ARGUMENT, kvb_last_error());
        return n;
    }
    kvb_memory memory() const {
        kvb_memory m;
        check(kvb_cache_memory(cache_.get(), &m));
        return m;
    }
    kvb_cache_params params() const {
        kvb_cache_params p;
        check(kvb_cache_get_params(cache_.get(), &p));
        return p;
    }
    void save(const std::string &path) const { check(kvb_cache_save(cache_.get(), path.c_str())); }
    kvb_cache *get() noexcept { return cache_.get(); }

private:
    explicit Cache(kvb_cache *c) : cache_(c) {}
    struct Free {
        void operator()(kvb_cache *c) const noexcept { kvb_cache_free(c); }
    };
    std::unique_ptr<kvb_cache, Free> cache_;
};

}  // namespace kvbits

#endif  // KVBITS_HPP
