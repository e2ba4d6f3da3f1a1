//! One gradient of each model by each engine (native, and burn with `--features burn`), and
//! the cost of moving parameters into burn and gradients out of it. Run single-threaded for
//! the per-core figures: `RAYON_NUM_THREADS=1 cargo bench -p quorum-compute --bench gradient`.

use criterion::{criterion_group, criterion_main, Criterion};
use quorum_compute::{BatchId, Classifier, Dataset, Engine, GradientSource, ModelSpec};
use quorum_core::WorkerId;

fn fake_mnist(n: usize) -> Dataset {
    let images = (0..n * 784).map(|i| ((i * 2654435761) % 1000) as f32 / 1000.0).collect();
    Dataset {
        images,
        labels: (0..n).map(|i| (i % 10) as u8).collect(),
        channels: 1,
        height: 28,
        width: 28,
        classes: 10,
    }
}

fn gradients(c: &mut Criterion) {
    let mut g = c.benchmark_group("gradient");
    g.sample_size(20);
    for (name, spec, batch) in [
        ("mlp_784_512_512_10_b128", ModelSpec::default(), 128),
        ("mnist_cnn_b64", ModelSpec::parse("cnn").unwrap(), 64),
    ] {
        let d = fake_mnist(1024);
        let clf = Classifier::new(spec, d.clone(), d.clone(), d, batch, 1, 0).unwrap();
        let params = clf.init_params(0);
        for engine in [Engine::Native, Engine::Burn] {
            // burn's engine is in builds with the `burn` feature only.
            let Ok(mut clf) = clf.clone().with_engine(engine) else { continue };
            let mut grad = Vec::new();
            let mut step = 0;
            g.bench_function(format!("{name}_{engine:?}").to_lowercase(), |b| {
                b.iter(|| {
                    step += 1;
                    clf.gradient(&params, BatchId { worker: WorkerId(0), step }, &mut grad).unwrap()
                })
            });
        }
        #[cfg(feature = "burn")]
        {
            let mut out = Vec::new();
            g.bench_function(format!("{name}_load_and_extract"), |b| b.iter(|| clf.roundtrip(&params, &mut out)));
        }
    }
    g.finish();
}

criterion_group!(benches, gradients);
criterion_main!(benches);
