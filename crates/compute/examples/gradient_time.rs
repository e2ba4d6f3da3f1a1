//! Times one gradient of the built-in models, for `experiments/gradient_limit.sh`: the MLP
//! (784-512-512-10, batch 128) and the paper's CNN (32-32-64-64, batch 64) on MNIST-shaped
//! data, by the native engine and by burn, in this process's rayon pool (set
//! `RAYON_NUM_THREADS=1` for one core). Prints one CSV row per model and engine with the
//! median and the minimum over the repeats.
//!
//! Run: `RAYON_NUM_THREADS=1 cargo run --release -p quorum-compute --example gradient_time -- [REPEATS [MODEL [ENGINE]]]`
//! (MODEL `mlp` or `cnn`, ENGINE `native`, `burn` or `wgpu`: only those, e.g. for a profiler;
//! burn's engines need `--features burn` / `--features wgpu`, and are skipped without).

use quorum_compute::{BatchId, Classifier, Dataset, Engine, GradientSource, ModelSpec};
use quorum_core::WorkerId;
use std::time::Instant;

fn mnist_shaped(n: usize) -> Dataset {
    let images = (0..n * 784).map(|i| ((i * 2654435761) % 1000) as f32 / 1000.0).collect();
    let labels = (0..n).map(|i| (i % 10) as u8).collect();
    Dataset { images, labels, channels: 1, height: 28, width: 28, classes: 10 }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let repeats: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let wanted = |i: usize, what: &str| args.get(i).is_none_or(|a| a.eq_ignore_ascii_case(what));
    println!("model,engine,threads,median_ms,min_ms");
    for (name, spec, batch, scale) in
        [("mlp", ModelSpec::default(), 128, 1), ("cnn", ModelSpec::Cnn { channels: [32, 32, 64, 64] }, 64, 10)]
    {
        if !wanted(2, name) {
            continue;
        }
        let d = mnist_shaped(2048);
        let base = Classifier::new(spec, d.clone(), d.clone(), d, batch, 1, 0).expect("a classifier");
        let params = base.init_params(0);
        for engine in [Engine::Native, Engine::Burn, Engine::Wgpu] {
            if !wanted(3, engine.name()) {
                continue;
            }
            // burn's engines are in builds with the `burn` / `wgpu` features only.
            let mut clf = match base.clone().with_engine(engine) {
                Ok(clf) => clf,
                Err(e) => {
                    eprintln!("{name}: skipped: {e}");
                    continue;
                }
            };
            let mut grad = Vec::new();
            let mut times = Vec::new();
            // A few untimed steps warm the buffers and caches; the CNN is timed fewer times.
            for step in 0..(3 + repeats.div_ceil(scale)) as u64 {
                let t = Instant::now();
                clf.gradient(&params, BatchId { worker: WorkerId(0), step }, &mut grad).expect("a gradient");
                if step >= 3 {
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            times.sort_by(f64::total_cmp);
            let median = times[times.len() / 2];
            println!("{name},{engine:?},{},{median:.3},{:.3}", rayon::current_num_threads(), times[0]);
        }
    }
}
