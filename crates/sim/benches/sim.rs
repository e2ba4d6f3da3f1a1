//! Simulator throughput: simulated events per second in timing-only mode.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use quorum_core::Policy;
use quorum_sim::{simulate, DelayModel, SimConfig};

fn timing_only(c: &mut Criterion) {
    let mut g = c.benchmark_group("sim_timing_only");
    g.sample_size(10);
    let (workers, steps) = (1000u32, 200u64);
    let mut cfg = SimConfig::new(workers, Policy::Sync { aggregate: 960, backups: 40 }, steps, DelayModel::Paper, 1);
    cfg.record_events = false;
    cfg.record_arrivals = false;
    // Each step moves about 3 events per worker (params, compute done, push).
    g.throughput(Throughput::Elements(3 * workers as u64 * steps));
    g.bench_function("1000_workers_200_steps", |b| b.iter(|| simulate(&cfg, None).unwrap()));
    g.finish();
}

criterion_group!(benches, timing_only);
criterion_main!(benches);
