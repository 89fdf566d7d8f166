/* A C host of kvbits: open a GGUF, make a cache from its shape with a preset, append text and
 * visual tokens, run decode attention and compare it with a plain f32 attention computed here,
 * save the cache, load it back and check the attention is bit for bit the same.
 *
 *     host_c MODEL.gguf SNAPSHOT.gguf [PRESET]        (PRESET: calibquant, vidkv, akvq, kivi2)
 *
 * Exits 0 when every check holds. */

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvbits.h"

#define CHECK(call)                                                                        \
    do {                                                                                   \
        int status_ = (call);                                                              \
        if (status_ != KVB_OK) {                                                           \
            fprintf(stderr, "%s failed (%d): %s\n", #call, status_, kvb_last_error());     \
            goto fail;                                                                     \
        }                                                                                  \
    } while (0)

/* Deterministic pseudo-normal values (xorshift, sum of four uniforms). */
static unsigned long long rng_state = 0x9E3779B97F4A7C15ULL;
static float normal(void) {
    float s = 0.0f;
    int i;
    for (i = 0; i < 4; i++) {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        s += (float)(rng_state >> 40) / (float)(1ULL << 24) - 0.5f;
    }
    return s * 1.7320508f;
}

/* Plain f32 decode attention over every token appended so far: q and out [n_head][d],
 * k and v [n][n_head_kv][d]. */
static void reference_attention(const float *q, const float *k, const float *v, int n, int n_head,
                                int n_head_kv, int d, float scale, float *out) {
    int h, t, c;
    float *w = malloc(sizeof(float) * (size_t)n);
    for (h = 0; h < n_head; h++) {
        int g = h / (n_head / n_head_kv);
        float max = -INFINITY, sum = 0.0f;
        for (t = 0; t < n; t++) {
            const float *kt = k + ((size_t)t * n_head_kv + g) * d;
            float dot = 0.0f;
            for (c = 0; c < d; c++) dot += q[h * d + c] * kt[c];
            w[t] = dot * scale;
            if (w[t] > max) max = w[t];
        }
        for (t = 0; t < n; t++) sum += (w[t] = expf(w[t] - max));
        for (c = 0; c < d; c++) out[h * d + c] = 0.0f;
        for (t = 0; t < n; t++) {
            const float *vt = v + ((size_t)t * n_head_kv + g) * d;
            for (c = 0; c < d; c++) out[h * d + c] += w[t] / sum * vt[c];
        }
    }
    free(w);
}

static double rel_err(const float *a, const float *b, int n) {
    double num = 0.0, den = 0.0;
    int i;
    for (i = 0; i < n; i++) {
        num += (double)(a[i] - b[i]) * (a[i] - b[i]);
        den += (double)b[i] * b[i];
    }
    return sqrt(num / den);
}

int main(int argc, char **argv) {
    const char *preset = argc > 3 ? argv[3] : "vidkv";
    kvb_model *model = NULL;
    kvb_cache *cache = NULL, *exact = NULL, *loaded = NULL;
    float *k = NULL, *v = NULL, *sal = NULL, *q = NULL, *out = NULL, *want = NULL, *again = NULL;
    kvb_shape shape;
    kvb_cache_params p;
    kvb_memory mem;
    int ok = 0, layer, i, t, n = 0, row, hd;
    /* A prompt, an image of 256 visual tokens, then text decoded one token at a time. */
    const int spans[3][2] = {{40, KVB_MODALITY_TEXT}, {256, KVB_MODALITY_VISUAL}, {8, KVB_MODALITY_TEXT}};
    double err_exact, err_preset;
    float scale;

    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf SNAPSHOT.gguf [PRESET]\n", argv[0]);
        return 2;
    }
    printf("kvbits %s\n", kvb_version());
    CHECK(kvb_model_open(argv[1], &model));
    CHECK(kvb_model_shape(model, &shape));
    printf("%s: %d layers, %d query heads, %d KV heads, head dim %d, context %lld\n",
           kvb_model_architecture(model), shape.n_layer, shape.n_head, shape.n_head_kv_max,
           shape.head_dim_k, (long long)shape.context_length);
    for (i = 0; i < shape.n_layer; i++) {
        if (shape.n_head_kv[i] != shape.n_head_kv_max) {
            fprintf(stderr, "layer %d has %d KV heads: one cache per group of layers needed\n", i,
                    shape.n_head_kv[i]);
            goto fail;
        }
    }

    /* The cache from the model's shape and a preset; and an all-f16 one as a tight check. */
    kvb_cache_params_default(&p);
    p.n_layer = shape.n_layer;
    p.n_head = shape.n_head;
    p.n_head_kv = shape.n_head_kv_max;
    p.head_dim = shape.head_dim_k;
    CHECK(kvb_cache_new(&p, &exact));
    CHECK(kvb_cache_preset(preset, &p));
    CHECK(kvb_cache_new(&p, &cache));
    printf("preset %s: K %s/%s, V %s/%s (text/visual)\n", preset, kvb_type_name(p.type_k_text),
           kvb_type_name(p.type_k_visual), kvb_type_name(p.type_v_text),
           kvb_type_name(p.type_v_visual));

    hd = p.head_dim;
    row = p.n_head_kv * hd;
    k = malloc(sizeof(float) * 304 * (size_t)row);
    v = malloc(sizeof(float) * 304 * (size_t)row);
    sal = malloc(sizeof(float) * 304);
    q = malloc(sizeof(float) * (size_t)p.n_head * hd);
    out = malloc(sizeof(float) * (size_t)p.n_head * hd);
    want = malloc(sizeof(float) * (size_t)p.n_head * hd);
    again = malloc(sizeof(float) * (size_t)p.n_head * hd);
    if (!k || !v || !sal || !q || !out || !want || !again) goto fail;
    /* Keys with a few outlier channels, values around a per-channel mean, as real ones are. */
    for (i = 0; i < 304 * row; i++) {
        k[i] = normal() * ((i % hd) % 37 == 3 ? 6.0f : 1.0f);
        v[i] = (float)((i % row) % 7) - 3.0f + normal();
    }
    for (i = 0; i < 304; i++) sal[i] = (float)((i * 7919) % 304);

    /* The first and the last layer get the tokens (the others stay empty). */
    for (i = 0; i < 3; i++) {
        int len = spans[i][0], modality = spans[i][1];
        for (layer = 0; layer < p.n_layer; layer += p.n_layer - 1) {
            const float *s = modality == KVB_MODALITY_VISUAL ? sal + n : NULL;
            if (i == 2) {
                for (t = 0; t < len; t++) {
                    const float *kt = k + (size_t)(n + t) * row, *vt = v + (size_t)(n + t) * row;
                    CHECK(kvb_cache_append(cache, layer, kt, vt, 1, modality, NULL));
                    CHECK(kvb_cache_append(exact, layer, kt, vt, 1, modality, NULL));
                }
            } else {
                const float *kt = k + (size_t)n * row, *vt = v + (size_t)n * row;
                CHECK(kvb_cache_append(cache, layer, kt, vt, len, modality, s));
                CHECK(kvb_cache_append(exact, layer, kt, vt, len, modality, s));
            }
            if (p.n_layer == 1) break;
        }
        n += len;
    }
    if (kvb_cache_n_tokens(cache, 0) != n || kvb_cache_n_tokens(cache, 1 % p.n_layer) != (p.n_layer > 2 ? 0 : n)) {
        fprintf(stderr, "token counts are wrong\n");
        goto fail;
    }

    for (i = 0; i < p.n_head * hd; i++) q[i] = normal();
    scale = 1.0f / sqrtf((float)hd);
    reference_attention(q, k, v, n, p.n_head, p.n_head_kv, hd, scale, want);
    CHECK(kvb_cache_attn_decode(exact, 0, q, out, scale));
    err_exact = rel_err(out, want, p.n_head * hd);
    CHECK(kvb_cache_attn_decode(cache, 0, q, out, scale));
    err_preset = rel_err(out, want, p.n_head * hd);
    printf("decode attention vs f32: f16 cache rel. error %.2e, %s cache %.3f\n", err_exact, preset,
           err_preset);
    /* f16 storage rounds each value by 2^-11: anything larger is a layout or math mismatch. */
    if (err_exact > 1e-3 || err_preset > 0.5) {
        fprintf(stderr, "attention differs too much from the f32 reference\n");
        goto fail;
    }

    CHECK(kvb_cache_memory(cache, &mem));
    printf("memory: %llu bytes (codes %llu, meta %llu, f16 residual %llu), %.3f bits/K, %.3f bits/V\n",
           (unsigned long long)mem.bytes_total, (unsigned long long)mem.bytes_codes,
           (unsigned long long)mem.bytes_meta, (unsigned long long)mem.bytes_residual, mem.bits_k,
           mem.bits_v);

    CHECK(kvb_cache_save(cache, argv[2]));
    CHECK(kvb_cache_load(argv[2], &loaded));
    CHECK(kvb_cache_attn_decode(loaded, 0, q, again, scale));
    if (memcmp(out, again, sizeof(float) * (size_t)p.n_head * hd) != 0) {
        fprintf(stderr, "the loaded cache attends differently\n");
        goto fail;
    }
    printf("saved to %s and loaded back: attention identical bit for bit\n", argv[2]);

    /* Errors are statuses with a message, never a crash. */
    if (kvb_cache_append(cache, p.n_layer, k, v, 1, KVB_MODALITY_TEXT, NULL) != KVB_ERR_INVALID_ARGUMENT) {
        fprintf(stderr, "a layer out of range was accepted\n");
        goto fail;
    }
    printf("layer out of range: \"%s\"\n", kvb_last_error());
    ok = 1;

fail:
    kvb_cache_free(loaded);
    kvb_cache_free(cache);
    kvb_cache_free(exact);
    kvb_model_free(model);
    free(k);
    free(v);
    free(sal);
    free(q);
    free(out);
    free(want);
    free(again);
    printf("%s\n", ok ? "host.c: all checks passed" : "host.c: FAILED");
    return ok ? 0 : 1;
}
