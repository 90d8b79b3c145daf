//! Criterion benches over the reference layer set (DESIGN.md): every layer A–E, variant and
//! pass, on 2 threads with the best instruction set. `cargo bench -- 'C/ds'` narrows it down.
//! `sepconv bench` reports the same workloads as one table with GMAC/s and speedups.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use sepconv::Exec;
use sepconv::bench::{Pass, REFERENCE_LAYERS, VARIANTS, Workload};

fn layers(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("thread pool");
    let exec = Exec::new(2);
    for layer in &REFERENCE_LAYERS {
        let mut group = c.benchmark_group(layer.id.to_string());
        group.sample_size(10);
        for variant in VARIANTS {
            let mut w = Workload::new(layer, variant).expect("reference layer");
            for pass in [Pass::Forward, Pass::Train] {
                let macs = match pass {
                    Pass::Forward => w.cost().forward_macs_nominal,
                    Pass::Train => w.cost().train_macs_nominal(),
                };
                // Elements = MACs, so criterion's throughput reads as MAC/s.
                group.throughput(Throughput::Elements(macs));
                group.bench_function(format!("{variant}/{pass}"), |b| {
                    pool.install(|| b.iter(|| w.run(exec, pass).expect("run")))
                });
            }
        }
        group.finish();
    }
}

criterion_group!(benches, layers);
criterion_main!(benches);
