//! The servers' links in the simulator: pulls and pushes queue on them, and splitting the
//! model over more servers shortens the queue.

use quorum_core::Policy;
use quorum_sim::{simulate, DelayModel, NetworkModel, SimConfig};

/// Four workers, N = 4, one second of compute, a 100 MB model, each server link 1 GB/s.
fn step_seconds(shards: u32) -> f64 {
    let mut cfg = SimConfig::new(4, Policy::Sync { aggregate: 4, backups: 0 }, 20, DelayModel::Constant(1.0), 1);
    cfg.virtual_params = 25_000_000;
    cfg.network = NetworkModel { server_bandwidth: Some(1e9), shards, ..NetworkModel::default() };
    let r = simulate(&cfg, None).unwrap();
    r.summary.p50_step_seconds
}

#[test]
fn pulls_and_pushes_queue_on_the_server_link_and_shards_split_the_queue() {
    // One server: the four pulls leave at 0.1 s intervals, so the last worker starts 0.4 s in,
    // finishes at 1.4 s and its push, behind none, is through at 1.5 s.
    let one = step_seconds(1);
    assert!((one - 1.5).abs() < 1e-6, "{one}");
    // Four servers, each with a quarter of every message: 0.025 s per message.
    let four = step_seconds(4);
    assert!((four - 1.125).abs() < 1e-6, "{four}");
}

#[test]
fn without_a_server_bandwidth_the_servers_cost_nothing() {
    let mut cfg = SimConfig::new(4, Policy::Sync { aggregate: 4, backups: 0 }, 20, DelayModel::Constant(1.0), 1);
    cfg.virtual_params = 25_000_000;
    let r = simulate(&cfg, None).unwrap();
    assert!((r.summary.p50_step_seconds - 1.0).abs() < 1e-9);
}
