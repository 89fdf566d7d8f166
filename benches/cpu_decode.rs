//! `cargo bench --bench cpu_decode`: one decode step of one Qwen2.5-VL-7B layer (28 query /
//! 4 KV heads, D 128, batch 1) at 4096, 16384 and 65536 cached tokens, our f16 and every
//! preset in the same group, on every thread rayon has and the path `KVBITS_CPU` picks.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvbits::kv::simd::bench;

fn decode(c: &mut Criterion) {
    let (n_head, _, d) = bench::SHAPE;
    for tokens in bench::TOKENS {
        let mut group = c.benchmark_group(format!("decode_cpu/{tokens}"));
        for name in bench::CONFIGS {
            let (cache, q) = bench::decode_cache(name, tokens, 11).expect("cache");
            let mut out = vec![0f32; n_head * d];
            group.throughput(Throughput::Bytes(cache.memory().total));
            group.bench_function(name, |b| {
                b.iter(|| {
                    cache
                        .attention_decode(0, &q, n_head, &mut out, bench::scale())
                        .unwrap()
                })
            });
        }
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    targets = decode
}
criterion_main!(benches);
