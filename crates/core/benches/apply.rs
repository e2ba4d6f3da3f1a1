//! The server's average-and-apply path on a 10M-parameter model against a plain memcpy of
//! the same buffer, measured side by side. Throughput is parameter bytes per second. And the
//! gradient norm every step's close computes, on the MLP's 670k values (in the caches, as in
//! the 4-worker job, where it is on the path from the last gradient to the next step).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use quorum_core::{Optimizer, OptimizerConfig, ParamLayout, Policy, Server, ServerConfig, ToServer, WorkerId};
use std::time::Duration;

const N: usize = 10_000_000;

fn apply(c: &mut Criterion) {
    let mut g = c.benchmark_group("apply_10M");
    g.sample_size(20);
    g.throughput(Throughput::Bytes((N * 4) as u64));
    let src = vec![0.5f32; N];
    let mut dst = vec![0.0f32; N];
    g.bench_function("memcpy", |b| b.iter(|| dst.copy_from_slice(std::hint::black_box(&src))));

    for (name, cfg) in
        [("sgd", OptimizerConfig::Sgd), ("momentum", OptimizerConfig::Momentum { momentum: 0.9, nesterov: false })]
    {
        let mut opt = Optimizer::new(cfg, N);
        let mut params = vec![0.0f32; N];
        g.bench_function(format!("average_and_apply_{name}"), |b| {
            b.iter(|| opt.apply(&mut params, std::hint::black_box(&src), 0.25, 0.01))
        });
    }

    // The whole server path for one gradient: validation (length, finiteness) + accumulate.
    let layout = ParamLayout::from_shapes([("w", vec![N])]).unwrap();
    let cfg = ServerConfig::new(2, Policy::Sync { aggregate: 2, backups: 0 }, 0.01);
    let mut server = Server::new(cfg, layout, vec![0.0; N]).unwrap();
    server.handle(Duration::ZERO, WorkerId(0), ToServer::Join { session: 0 }).unwrap();
    server.handle(Duration::ZERO, WorkerId(1), ToServer::Join { session: 1 }).unwrap();
    let grad = vec![0.001f32; N];
    let mut step = 0;
    g.bench_function("server_push_pair_and_close", |b| {
        b.iter_batched(
            || (grad.clone(), grad.clone()),
            |(g0, g1)| {
                server.handle(Duration::ZERO, WorkerId(0), ToServer::Push { step, gradient: g0, loss: None }).unwrap();
                server.handle(Duration::ZERO, WorkerId(1), ToServer::Push { step, gradient: g1, loss: None }).unwrap();
                step += 1;
            },
            criterion::BatchSize::PerIteration,
        )
    });
    g.finish();

    let mlp = vec![0.001f32; 669_706];
    let mut g = c.benchmark_group("norm_mlp");
    g.throughput(Throughput::Bytes((mlp.len() * 4) as u64));
    g.bench_function("global_norm", |b| b.iter(|| quorum_core::clip::global_norm(std::hint::black_box(&mlp), 0.5)));
    g.finish();
}

criterion_group!(benches, apply);
criterion_main!(benches);
