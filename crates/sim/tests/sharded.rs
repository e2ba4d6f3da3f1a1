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

/// Every update's staleness in a run's record (async: one gradient per update).
fn staleness(events: &[quorum_core::Event]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            quorum_core::Event::GradientAccepted { staleness, .. } => Some(*staleness),
            _ => None,
        })
        .collect()
}

#[test]
fn an_async_sharded_run_applies_each_gradient_once_on_every_shard_in_the_coordinators_order_and_trains() {
    let mut src = LeastSquares::new(64, 16, 0.1, 1);
    let before = src.evaluate(&src.init_params(1)).unwrap().loss;
    let mut losses = Vec::new();
    for shards in [1, 3] {
        let mut cfg = sharded(4, 0, shards, 400, 1);
        cfg.server.policy = Policy::Async { max_staleness: None };
        cfg.server.schedule = quorum_core::LrSchedule::constant(0.05);
        cfg.eval_every = Some(100);
        cfg.record_events = true;
        let r = simulate(&cfg, Some(&mut src)).unwrap();
        assert_eq!(r.summary.steps, 400);
        let ages = staleness(&r.events);
        assert_eq!(ages.len(), 400, "one accepted gradient per update");
        assert!(ages.iter().any(|&s| s > 0), "four workers make stale gradients: {shards} shard(s)");
        if shards > 1 {
            let c = r.summary.shards.clone().expect("a sharded run reports its check");
            assert_eq!(c.steps_agreed, 400);
            // Shards took slices in other orders than the coordinator's: applying each on
            // arrival would have given different parts of the model different updates.
            assert!(c.first_n_would_differ > 10, "{c:?}");
        }
        losses.push(r.summary.final_test_loss.unwrap());
    }
    for (l, shards) in losses.iter().zip([1, 3]) {
        assert!(*l < before / 10.0, "{shards} shard(s): loss {before} -> {l}");
    }
}

#[test]
fn an_async_sharded_run_drops_what_is_staler_than_the_bound_on_every_shard() {
    let mut cfg = sharded(6, 0, 3, 200, 2);
    cfg.server.policy = Policy::Async { max_staleness: Some(2) };
    cfg.record_events = true;
    let r = simulate(&cfg, None).unwrap();
    assert_eq!(r.summary.shards.clone().unwrap().steps_agreed, 200);
    let ages = staleness(&r.events);
    assert!(ages.iter().all(|&s| s <= 2), "{ages:?}");
    let dropped = r
        .events
        .iter()
        .filter(|e| {
            matches!(e, quorum_core::Event::GradientDropped { reason: quorum_core::DropReason::TooStale { .. }, .. })
        })
        .count();
    assert!(dropped > 0, "six workers and a bound of 2: some gradients are too stale");
}

#[test]
fn a_sharded_simulation_of_the_adaptive_policy_is_refused_with_what_to_run_instead() {
    let mut cfg = sharded(3, 0, 2, 10, 1);
    cfg.server.policy = Policy::Adaptive { min: 1, max: 3 };
    let e = simulate(&cfg, None).unwrap_err().to_string();
    assert!(e.contains("adaptive") && e.contains("shards = 1"), "{e}");
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
        asynchronous in proptest::option::of(proptest::option::of(0u64..4)),
        faults in prop::collection::vec((0.0f64..40.0, 0u32..8, 0u8..3, 0.0f64..6.0), 0..10),
    ) {
        let workers = aggregate + backups;
        let mut cfg = sharded(aggregate, backups, shards, 150, seed);
        if lower {
            cfg.server.liveness.on_stall = OnStall::LowerAggregate;
        }
        if let Some(max_staleness) = asynchronous {
            cfg.server.policy = Policy::Async { max_staleness };
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
        if asynchronous.is_none() {
            // (The step rule's invariants; an async update is one gradient of any age.)
            check_invariants(&r.events, aggregate).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        let c = r.summary.shards.clone().unwrap();
        prop_assert_eq!(c.steps_agreed, r.summary.steps);
    }
}
