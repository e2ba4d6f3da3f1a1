//! The most steps/s an N-of-(N+b) step can reach on this machine's cores, with none of
//! quorum's machinery: `workers` threads in one process compute MLP gradients (784-512-512-10,
//! batch 128, one thread each, stopped half-way once their step closes, as quorum's workers
//! do); the thread whose gradient is the N-th of its step closes it at once, under a lock (the
//! sum, its norm and an SGD update written straight into the next step's parameters), and
//! wakes the others. No server, no gRPC, no async runtime, no copies: only the gradients, the
//! close, and the operating system's scheduling of `workers` threads on the cores.
//!
//! Prints `gradient_ms,steps_per_s,floor,ratio`: one gradient timed alone on this thread first
//! (median of 50), then the job's steps/s after its first 20 steps, the compute-bound floor
//! `cores / (workers x gradient)` and the ratio of the two. The data are MNIST-shaped
//! numbers, as `gradient_time` uses, or MNIST itself from `MNIST_DIR` (e.g. `data/mnist`), as
//! quorum's job uses. `experiments/step_ceiling.sh` interleaves it with quorum's own job.
//!
//! Run: `cargo run --release -p quorum-compute --example step_ceiling -- [STEPS [WORKERS [N]]]`

use quorum_compute::{BatchId, Classifier, Dataset, DatasetName, GradientSource, ModelSpec};
use quorum_core::WorkerId;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, RwLock};
use std::time::Instant;

/// Parameter slots: step `s` lies in slot `s % SLOTS`; a close writes the next slot while
/// gradients of the closing step still read theirs.
const SLOTS: usize = 4;

fn mnist_shaped(n: usize) -> Dataset {
    let images = (0..n * 784).map(|i| ((i * 2654435761) % 1000) as f32 / 1000.0).collect();
    let labels = (0..n).map(|i| (i % 10) as u8).collect();
    Dataset { images, labels, channels: 1, height: 28, width: 28, classes: 10 }
}

/// The open step's gradients so far.
struct Open {
    step: u64,
    count: usize,
    sum: Vec<f32>,
    opened: Vec<Instant>,
}

fn main() {
    let arg = |i: usize, default: usize| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (steps, workers, n) = (arg(1, 300) as u64, arg(2, 4), arg(3, 3));
    let d = match std::env::var_os("MNIST_DIR") {
        Some(dir) => quorum_compute::data::load(DatasetName::Mnist, dir.as_ref()).expect("MNIST").0,
        None => mnist_shaped(2048),
    };
    let base = Classifier::new(ModelSpec::default(), d.clone(), d.clone(), d, 128, 1, 0).expect("a classifier");
    let init = base.init_params(0);
    let len = init.len();

    // One gradient alone on this thread (a few untimed first), as `gradient_time` times it.
    let mut alone = base.clone();
    let mut grad = vec![0.0; len];
    let mut times = Vec::new();
    for step in 0..53 {
        let t = Instant::now();
        alone.gradient_into(&init, BatchId { worker: WorkerId(0), step }, &mut grad).expect("a gradient");
        if step >= 3 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let gradient = times[times.len() / 2];

    let slots: Vec<RwLock<Vec<f32>>> = (0..SLOTS).map(|_| RwLock::new(init.clone())).collect();
    let newest = AtomicU64::new(0);
    let open = Mutex::new(Open { step: 0, count: 0, sum: vec![0.0; len], opened: vec![Instant::now()] });
    let opened = Condvar::new();
    std::thread::scope(|scope| {
        for w in 0..workers {
            let (slots, newest, open, opened) = (&slots, &newest, &open, &opened);
            let mut clf = base.clone();
            scope.spawn(move || {
                let mut grad = vec![0.0; len];
                let mut next = 0;
                loop {
                    let step = {
                        let mut o = open.lock().unwrap();
                        while o.step < next {
                            o = opened.wait(o).unwrap();
                        }
                        o.step
                    };
                    if step >= steps {
                        return;
                    }
                    next = step + 1;
                    let params = slots[step as usize % SLOTS].read().unwrap();
                    let batch = BatchId { worker: WorkerId(w as u32), step };
                    let closed = || newest.load(Ordering::Relaxed) > step;
                    let done = clf.gradient_into_unless(&params, batch, &mut grad, &closed);
                    if done.is_err() {
                        continue; // Its step closed without it.
                    }
                    let mut o = open.lock().unwrap();
                    if o.step != step {
                        continue; // Late: dropped.
                    }
                    if o.count == 0 {
                        o.sum.copy_from_slice(&grad);
                    } else {
                        o.sum.iter_mut().zip(&grad).for_each(|(s, g)| *s += g);
                    }
                    o.count += 1;
                    if o.count < n {
                        continue;
                    }
                    // The close: norm (as quorum's server computes it for every step), then
                    // the SGD update from this step's slot into the next one's.
                    let k = 0.1 / n as f32;
                    std::hint::black_box(quorum_core::clip::global_norm(&o.sum, 1.0 / n as f32));
                    let mut out = slots[next as usize % SLOTS].write().unwrap();
                    out.iter_mut().zip(params.iter().zip(&o.sum)).for_each(|(p, (&q, g))| *p = q - k * g);
                    drop(out);
                    o.step = next;
                    o.count = 0;
                    o.opened.push(Instant::now());
                    newest.store(next, Ordering::Relaxed);
                    opened.notify_all();
                }
            });
        }
    });
    let o = open.into_inner().unwrap();
    let at = |s: u64| o.opened[s as usize];
    let rate = (steps - 20) as f64 / at(steps).duration_since(at(20)).as_secs_f64();
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let floor = cores as f64 / (workers as f64 * gradient);
    println!("gradient_ms,steps_per_s,floor,ratio");
    println!("{:.3},{rate:.1},{floor:.1},{:.3}", gradient * 1e3, rate / floor);
}
