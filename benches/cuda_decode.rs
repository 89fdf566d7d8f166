//! `cargo bench --features cuda --bench cuda_decode`: one decode step of one layer per preset,
//! GPU time from CUDA events. Prints a skip message where there is no GPU.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};

#[cfg(feature = "cuda")]
fn decode(c: &mut Criterion) {
    use criterion::Throughput;
    use kvbits::cuda::bench::{DecodeBench, PRESETS, SHAPES};
    use kvbits::cuda::kernels::supports;
    use kvbits::cuda::{Event, Stream, device_count, device_info};
    if device_count() == 0 {
        eprintln!("no CUDA device: skipping the CUDA benchmarks");
        return;
    }
    let stream = Stream::new().expect("stream");
    let (_, sms, _) = device_info(0).expect("device 0");
    for shape in SHAPES {
        for batch in [1usize, 8] {
            for tokens in [4096usize, 16384, 65536, 131072] {
                let mut group =
                    c.benchmark_group(format!("decode/{}/b{batch}/{tokens}", shape.name));
                for preset in PRESETS.iter().filter(|p| supports(p.k) && supports(p.v)) {
                    let bench = DecodeBench::new(shape, tokens, batch, *preset, sms, &stream)
                        .expect("cache");
                    group.throughput(Throughput::Bytes(bench.bytes as u64));
                    group.bench_function(preset.name, |b| {
                        b.iter_custom(|iters| {
                            let (start, end) = (Event::new().unwrap(), Event::new().unwrap());
                            start.record(&stream).unwrap();
                            for r in 0..iters as usize {
                                bench.launch(r, &stream).unwrap();
                            }
                            end.record(&stream).unwrap();
                            Duration::from_secs_f64(start.elapsed_ms(&end).unwrap() as f64 * 1e-3)
                        })
                    });
                }
                group.finish();
            }
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn decode(_: &mut Criterion) {
    eprintln!("built without the cuda feature: `cargo bench --features cuda --bench cuda_decode`");
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(1));
    targets = decode
}
criterion_main!(benches);
