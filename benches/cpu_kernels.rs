//! `cargo bench --bench cpu_kernels`: one block's decode kernel on one thread, per format and
//! CPU path: a key block's scores and a value block's weighted sums, 128 tokens of D 128, for
//! the 7 query heads of a Qwen2.5-VL-7B KV head. Kernels compared this way are free of the
//! thread scheduling and cache misses that make whole decode steps swing on a shared machine.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use kvbits::kv::simd::{self, Isa};
use kvbits::kv::{FormatId, QuantParams, Role, Shape};
use kvbits::rng::Rng;

const TOKENS: usize = 128;
const HEAD_DIM: usize = 128;
const GROUP: usize = 7;

fn kernels(c: &mut Criterion) {
    let mut rng = Rng::new(5);
    for f in FormatId::ALL {
        for &role in f.info().applies.roles() {
            let shape = Shape {
                n: TOKENS,
                d: HEAD_DIM,
                role,
            };
            let x = rng.normals(TOKENS * HEAD_DIM);
            let mut block = Vec::new();
            let params = QuantParams::default();
            f.imp()
                .quantize(&x, shape, &[], &params, &mut block)
                .expect("quantize");
            let q = rng.normals(GROUP * HEAD_DIM);
            let p: Vec<f32> = (0..GROUP * TOKENS).map(|_| rng.uniform()).collect();
            let mut out = vec![0f32; GROUP * TOKENS.max(HEAD_DIM)];
            let mut group = c.benchmark_group(format!("kernel_cpu/{}/{role:?}", f.name()));
            for isa in Isa::ALL.into_iter().filter(|i| i.supported()) {
                let k = simd::kernel(f, isa);
                group.bench_function(isa.name(), |b| match role {
                    Role::Key => {
                        b.iter(|| k.scores(&block, shape, black_box(&q), &mut out, TOKENS))
                    }
                    Role::Value => b.iter(|| {
                        let out = &mut out[..GROUP * HEAD_DIM];
                        k.accumulate(&block, shape, black_box(&p), TOKENS, out)
                    }),
                });
            }
            group.finish();
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(200)).measurement_time(Duration::from_secs(1));
    targets = kernels
}
criterion_main!(benches);
