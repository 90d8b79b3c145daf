//! Criterion benches of the reference network (DESIGN.md's `mnist-ref`, std, ds and sp blocks):
//! one training step (forward, loss gradient, backward) and one inference pass on a fixed batch
//! of 64, 2 threads. `cargo bench --bench network -- ds` narrows it down; `sepconv train
//! --profile` shows where a step's time goes, layer by layer, over a real epoch.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sepconv::Exec;
use sepconv::nn::{ModelSpec, Network};
use sepconv::rng::Rng;
use sepconv::train::loss::softmax_cross_entropy;

const BATCH: usize = 64;

fn network(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("thread pool");
    let exec = Exec::new(2);
    for variant in ["std", "ds", "sp"] {
        let spec = ModelSpec::load(&format!("mnist-ref-{variant}")).expect("preset");
        let mut net = Network::new(&spec, 0).expect("network");
        let mut data = Rng::new(1);
        let x: Vec<f32> = (0..BATCH * net.input_len())
            .map(|_| data.uniform(-1.0, 1.0))
            .collect();
        let labels: Vec<u8> = (0..BATCH).map(|i| (i % 10) as u8).collect();
        let classes = net.output_len();
        let mut grad = vec![0.0; BATCH * classes];
        let mut rng = Rng::new(2);
        let mut group = c.benchmark_group(format!("mnist-ref-{variant}"));
        group.sample_size(20);
        // Elements = images, so criterion's throughput reads as images/s.
        group.throughput(Throughput::Elements(BATCH as u64));
        group.bench_function("train step", |b| {
            pool.install(|| {
                b.iter(|| {
                    let logits = net
                        .forward(exec, &x, BATCH, true, &mut rng)
                        .expect("forward");
                    softmax_cross_entropy(logits, &labels, classes, &mut grad);
                    net.backward(exec, &grad, BATCH, &mut rng)
                        .expect("backward");
                })
            })
        });
        group.bench_function("inference", |b| {
            pool.install(|| {
                b.iter(|| {
                    net.forward(exec, &x, BATCH, false, &mut rng)
                        .expect("forward");
                })
            })
        });
        group.finish();
    }
}

criterion_group!(benches, network);
criterion_main!(benches);
