// A C++ host of kvbits, through the RAII wrappers of kvbits.hpp: the same checks as host.c
// (decode attention against a plain f32 attention computed here, save and load bit for bit),
// with K and V appended as f16, and an error caught as an exception.
//
//     host_cpp MODEL.gguf SNAPSHOT.gguf [PRESET]
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "kvbits.hpp"

namespace {

// IEEE half from float, round to nearest even (normal and subnormal values; no NaN here).
uint16_t to_f16(float x) {
    uint32_t b;
    std::memcpy(&b, &x, 4);
    uint32_t sign = (b >> 16) & 0x8000u, exp = (b >> 23) & 0xFF, man = b & 0x7FFFFFu;
    int e = static_cast<int>(exp) - 127 + 15;
    if (e >= 31) return static_cast<uint16_t>(sign | 0x7C00u);
    if (e <= 0) {
        if (e < -10) return static_cast<uint16_t>(sign);
        man |= 0x800000u;
        uint32_t shift = static_cast<uint32_t>(14 - e);
        uint32_t h = man >> shift, rest = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rest > half || (rest == half && (h & 1))) h++;
        return static_cast<uint16_t>(sign | h);
    }
    uint32_t h = (static_cast<uint32_t>(e) << 10) | (man >> 13), rest = man & 0x1FFF;
    if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) h++;
    return static_cast<uint16_t>(sign | h);
}

float from_f16(uint16_t h) {
    uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FFu;
    float v = exp == 0 ? std::ldexp(static_cast<float>(man), -24)
                       : std::ldexp(static_cast<float>(man | 0x400u), static_cast<int>(exp) - 25);
    return sign ? -v : v;
}

// Plain f32 decode attention: q, out [n_head][d]; k, v [n][n_head_kv][d].
std::vector<float> attention(const std::vector<float> &q, const std::vector<float> &k,
                             const std::vector<float> &v, int n, int n_head, int n_head_kv, int d,
                             float scale) {
    std::vector<float> out(static_cast<size_t>(n_head) * d, 0.0f), w(static_cast<size_t>(n));
    for (int h = 0; h < n_head; h++) {
        int g = h / (n_head / n_head_kv);
        float max = -INFINITY, sum = 0.0f;
        for (int t = 0; t < n; t++) {
            float dot = 0.0f;
            for (int c = 0; c < d; c++) dot += q[h * d + c] * k[(static_cast<size_t>(t) * n_head_kv + g) * d + c];
            w[t] = dot * scale;
            max = std::fmax(max, w[t]);
        }
        for (int t = 0; t < n; t++) sum += (w[t] = std::exp(w[t] - max));
        for (int t = 0; t < n; t++)
            for (int c = 0; c < d; c++) out[h * d + c] += w[t] / sum * v[(static_cast<size_t>(t) * n_head_kv + g) * d + c];
    }
    return out;
}

double rel_err(const std::vector<float> &a, const std::vector<float> &b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); i++) {
        num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
        den += double(b[i]) * b[i];
    }
    return std::sqrt(num / den);
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s MODEL.gguf SNAPSHOT.gguf [PRESET]\n", argv[0]);
        return 2;
    }
    const char *preset = argc > 3 ? argv[3] : "akvq";
    try {
        kvbits::Model model(argv[1]);
        kvb_shape s = model.shape();
        std::printf("%s: %d layers, %d query heads, %d KV heads, head dim %d\n", model.architecture().c_str(),
                    s.n_layer, s.n_head, s.n_head_kv_max, s.head_dim_k);
        kvbits::Cache exact(kvbits::cache_params(nullptr, &model));
        kvbits::Cache cache(kvbits::cache_params(preset, &model));
        kvb_cache_params p = cache.params();
        const int d = p.head_dim, row = p.n_head_kv * d, layer = p.n_layer - 1;

        // A prompt, two video frames of 256 visual tokens each, text after: K and V as f16.
        std::mt19937 gen(7);
        std::normal_distribution<float> normal;
        std::vector<float> k, v;
        int n = 0;
        const int spans[4][2] = {{24, KVB_MODALITY_TEXT}, {256, KVB_MODALITY_VISUAL},
                                 {256, KVB_MODALITY_VISUAL}, {16, KVB_MODALITY_TEXT}};
        for (const auto &span : spans) {
            int len = span[0];
            std::vector<uint16_t> k16(static_cast<size_t>(len) * row), v16(k16.size());
            std::vector<float> saliency(static_cast<size_t>(len));
            for (size_t i = 0; i < k16.size(); i++) {
                k16[i] = to_f16(normal(gen) * ((i % d) % 37 == 3 ? 6.0f : 1.0f));
                v16[i] = to_f16(static_cast<float>((i % row) % 5) - 2.0f + normal(gen));
                k.push_back(from_f16(k16[i]));
                v.push_back(from_f16(v16[i]));
            }
            for (auto &x : saliency) x = std::fabs(normal(gen));
            const float *sal = span[1] == KVB_MODALITY_VISUAL ? saliency.data() : nullptr;
            cache.append_f16(layer, k16.data(), v16.data(), len, span[1], sal);
            exact.append_f16(layer, k16.data(), v16.data(), len, span[1], sal);
            n += len;
        }
        if (cache.n_tokens(layer) != n || cache.n_tokens(0) != 0) throw std::runtime_error("token counts");

        std::vector<float> q(static_cast<size_t>(p.n_head) * d), out(q.size()), out_exact(q.size());
        for (auto &x : q) x = normal(gen);
        const float scale = 1.0f / std::sqrt(static_cast<float>(d));
        std::vector<float> want = attention(q, k, v, n, p.n_head, p.n_head_kv, d, scale);
        exact.attn_decode(layer, q.data(), out_exact.data(), scale);
        cache.attn_decode(layer, q.data(), out.data(), scale);
        double e_exact = rel_err(out_exact, want), e_preset = rel_err(out, want);
        std::printf("decode attention vs f32: f16 cache rel. error %.2e, %s cache %.3f\n", e_exact, preset, e_preset);
        if (e_exact > 1e-3 || e_preset > 0.5) throw std::runtime_error("attention differs too much from f32");

        // The stored tokens as f16, as a host's own attention would read them.
        std::vector<uint16_t> kd(static_cast<size_t>(n) * row), vd(kd.size());
        exact.dequantize(layer, 0, n, kd.data(), vd.data());
        for (size_t i = 0; i < kd.size(); i++)
            if (from_f16(kd[i]) != k[i] || from_f16(vd[i]) != v[i]) throw std::runtime_error("f16 cache changed a value");

        kvb_memory m = cache.memory();
        std::printf("memory: %llu bytes, %.3f bits/K, %.3f bits/V\n", static_cast<unsigned long long>(m.bytes_total),
                    m.bits_k, m.bits_v);

        cache.save(argv[2]);
        kvbits::Cache loaded = kvbits::Cache::load(argv[2]);
        std::vector<float> again(q.size());
        loaded.attn_decode(layer, q.data(), again.data(), scale);
        if (std::memcmp(again.data(), out.data(), out.size() * sizeof(float)) != 0)
            throw std::runtime_error("the loaded cache attends differently");
        std::printf("saved to %s and loaded back: attention identical bit for bit\n", argv[2]);

        try {
            loaded.append(p.n_layer, k.data(), v.data(), 1, KVB_MODALITY_TEXT);
            throw std::runtime_error("a layer out of range was accepted");
        } catch (const kvbits::Error &e) {
            if (e.status() != KVB_ERR_INVALID_ARGUMENT) throw;
            std::printf("layer out of range: \"%s\"\n", e.what());
        }
    } catch (const std::exception &e) {
        std::fprintf(stderr, "host.cpp: FAILED: %s\n", e.what());
        return 1;
    }
    std::printf("host.cpp: all checks passed\n");
    return 0;
}
