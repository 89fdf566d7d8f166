//! `cargo bench --bench cpu_quantize`: quantize throughput of every format and role on one
//! thread (GB/s of f32 input), blocks of 128 tokens at D 128, as the cache quantizes them.

use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvbits::kv::simd::bench;

fn quantize(c: &mut Criterion) {
    let mut group = c.benchmark_group("quantize_cpu");
    let mut out = Vec::new();
    for (f, role, x) in bench::quantize_inputs(12) {
        group.throughput(Throughput::Bytes((x.len() * 4) as u64));
        group.bench_function(format!("{f}/{role:?}"), |b| {
            b.iter(|| bench::quantize_blocks(f, role, &x, &mut out).unwrap())
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    targets = quantize
}
criterion_main!(benches);
