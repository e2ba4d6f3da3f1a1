//! Sharded runs in the simulator: the core's coordinator and shards driven in virtual time,
//! each worker's slices crossing each shard's own link with jitter, so shards see workers in
//! different orders. Every run checks that every shard applied the coordinator's
//! contributors at every step (`simulate` fails with `ShardsDisagree` otherwise).

use proptest::prelude::*;
use quorum_compute::{GradientSource, LeastSquares};
use quorum_core::{OnStall, Policy};
use quorum_sim::{check_invariants, simulate, DelayModel, Fault, FaultKind, NetworkModel, SimConfig};
use std::time::Duration;

fn sharded(aggregate: u32, backups: u32, shards: u32, steps: u64, seed: u64) -> SimConfig {
    let workers = aggregate + backups;
    let policy = Policy::Sync { aggregate, backups };
    let mut cfg = SimConfig::new(workers, policy, steps, DelayModel::Exponential(0.5), seed);
    cfg.network =
        NetworkModel { latency: 0.005, jitter: 0.05, server_bandwidth: Some(1e9), shards, ..NetworkModel::default() };
    cfg.virtual_params = 10_000_000;
    cfg.server.liveness.worker_timeout = Some(Duration::from_secs(2));
    cfg.server.liveness.stall_timeout = Some(Duration::from_secs(5));
    cfg
}

#[test]
fn every_shard_applies_the_coordinators_workers_even_where_its_own_first_n_were_others_and_it_trains() {
    let mut src = LeastSquares::new(64, 16, 0.1, 1);
    let mut cfg = sharded(3, 2, 3, 300, 1);
    cfg.server.schedule = quorum_core::LrSchedule::constant(0.2);
    cfg.eval_every = Some(100);
    let before = src.evaluate(&src.init_params(1)).unwrap().loss;
    let r = simulate(&cfg, Some(&mut src)).unwrap();
    let c = r.summary.shards.clone().expect("a sharded run reports its check");
    assert_eq!((c.shards, c.steps_agreed), (3, 300));
    // The jitter made shards see workers in different orders: a per-shard "first N" rule
    // would have averaged different workers in different parts of the model at these steps.
    assert!(c.first_n_would_differ > 10, "{c:?}");
    let after = r.summary.final_test_loss.unwrap();
    assert!(after < before / 10.0, "loss {before} -> {after}");
    // The model evaluated is the shards' parts put end to end.
    assert_eq!(r.final_params.len(), 64);
}

#[test]
fn a_worker_that_dies_with_its_slices_on_the_way_reaches_some_shards_only_and_never_counts() {
    // N = 3 of 3, no backups: a slice can reach a shard after its step closed only when its
    // sender died (the step then waits for the stall time-out, which lowers N to the two left).
    // Slow server links and a wide jitter keep a push on its way for a while, its slices
    // arriving at the shards at different times; the crash time sweeps across a push.
    let mut cut = 0;
    for i in 0..40 {
        let mut cfg = sharded(3, 0, 4, 60, 3);
        cfg.network.server_bandwidth = Some(2e7);
        cfg.network.jitter = 0.3;
        cfg.server.liveness.on_stall = OnStall::LowerAggregate;
        let at = 4.0 + 0.2 * f64::from(i);
        cfg.faults = vec![Fault { at, worker: 0, kind: FaultKind::Crash { restart_after: None } }];
        // Had the coordinator counted a half-pushed worker, a shard without its slice could not
        // apply the commit and the run would fail here.
        let r = simulate(&cfg, None).unwrap();
        let c = r.summary.shards.clone().unwrap();
        assert_eq!(c.steps_agreed, 60);
        check_invariants(&r.events, 3).unwrap();
        cut += u32::from(c.partial > 0);
    }
    assert!(cut > 0, "no crash time cut a push half-way");
}

#[test]
fn a_sharded_simulation_of_the_async_policy_is_refused_with_what_to_run_instead() {
    let mut cfg = sharded(3, 0, 2, 10, 1);
    cfg.server.policy = Policy::Async { max_staleness: None };
    let e = simulate(&cfg, None).unwrap_err().to_string();
    assert!(e.contains("async"), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    #[test]
    fn under_any_fault_schedule_every_shard_applies_the_same_workers_at_every_step(
        seed in 0u64..1_000_000,
        aggregate in 1u32..5,
        backups in 0u32..3,
        shards in 2u32..5,
        lower in any::<bool>(),
        faults in prop::collection::vec((0.0f64..40.0, 0u32..8, 0u8..3, 0.0f64..6.0), 0..10),
    ) {
        let workers = aggregate + backups;
        let mut cfg = sharded(aggregate, backups, shards, 150, seed);
        if lower {
            cfg.server.liveness.on_stall = OnStall::LowerAggregate;
        }
        cfg.faults = faults
            .into_iter()
            .map(|(at, w, kind, secs)| Fault {
                at,
                worker: w % workers,
                kind: match kind {
                    0 => FaultKind::Crash { restart_after: Some(secs) },
                    1 => FaultKind::Freeze { seconds: secs },
                    _ => FaultKind::SlowLink { factor: 10.0, seconds: secs },
                },
            })
            .collect();
        let r = simulate(&cfg, None).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check_invariants(&r.events, aggregate).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let c = r.summary.shards.clone().unwrap();
        prop_assert_eq!(c.steps_agreed, r.summary.steps);
    }
}
