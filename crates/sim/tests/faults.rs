//! Whole-cluster runs under seeded fault schedules (crashes, restarts, freezes, slow links, lags):
//! every run ends, and whatever the faults, every step is applied once, in order, with N
//! distinct accepted contributors (or the lowered N the events announce).

use proptest::prelude::*;
use quorum_core::{Event, OnStall, Policy};
use quorum_sim::{check_invariants, simulate, DelayModel, Fault, FaultKind, SimConfig, SimError};
use std::time::Duration;

fn cluster(aggregate: u32, backups: u32, steps: u64, seed: u64, faults: Vec<Fault>) -> SimConfig {
    let mut cfg = SimConfig::new(
        aggregate + backups,
        Policy::Sync { aggregate, backups },
        steps,
        DelayModel::Exponential(0.5),
        seed,
    );
    cfg.network.latency = 0.01;
    cfg.server.liveness.worker_timeout = Some(Duration::from_secs(2));
    cfg.server.liveness.stall_timeout = Some(Duration::from_secs(5));
    cfg.faults = faults;
    cfg
}

fn fault_kinds() -> impl Strategy<Value = FaultKind> {
    prop_oneof![
        prop::option::of(0.0f64..6.0).prop_map(|restart_after| FaultKind::Crash { restart_after }),
        (0.0f64..6.0).prop_map(|seconds| FaultKind::Freeze { seconds }),
        (1.0f64..20.0, 0.0f64..6.0).prop_map(|(factor, seconds)| FaultKind::SlowLink { factor, seconds }),
        (1.0f64..20.0, 0.0f64..6.0).prop_map(|(factor, seconds)| FaultKind::Lag { factor, seconds }),
    ]
}

fn schedules(workers: u32) -> impl Strategy<Value = Vec<Fault>> {
    prop::collection::vec(
        (0.0f64..40.0, 0..workers, fault_kinds()).prop_map(|(at, worker, kind)| Fault { at, worker, kind }),
        0..12,
    )
}

#[test]
fn a_crashed_worker_that_restarts_gets_back_in_after_its_old_session_times_out() {
    let crash = Fault { at: 3.0, worker: 0, kind: FaultKind::Crash { restart_after: Some(0.1) } };
    let r = simulate(&cluster(3, 0, 60, 7, vec![crash]), None).unwrap();
    assert_eq!(r.summary.steps, 60);
    // Its new process was refused while the old one still looked alive, then got in.
    let refused = r.events.iter().any(|e| matches!(e, Event::Rejected { worker, reason, .. } if worker.0 == 0 && reason.contains("held by another live process")));
    assert!(refused, "the restarted worker was never refused");
    let rejoined = r
        .events
        .iter()
        .filter(|e| matches!(e, Event::WorkerJoined { worker, time } if worker.0 == 0 && *time > 3.0))
        .count();
    assert_eq!(rejoined, 1);
    check_invariants(&r.events, 3).unwrap();
}

#[test]
fn a_lagging_worker_computes_slower_for_the_window_and_then_recovers() {
    // Two workers, N = 2, one second per gradient; worker 1 computes 3× slower for the 10
    // virtual seconds after t = 5: steps that start in the window take 3 s, the rest 1 s.
    let mut cfg = SimConfig::new(2, Policy::Sync { aggregate: 2, backups: 0 }, 20, DelayModel::Constant(1.0), 1);
    cfg.faults = vec![Fault { at: 5.0, worker: 1, kind: FaultKind::Lag { factor: 3.0, seconds: 10.0 } }];
    let r = simulate(&cfg, None).unwrap();
    let steps: Vec<f64> = r.step_seconds.iter().map(|s| (s * 1e6).round() / 1e6).collect();
    let want = [vec![1.0; 5], vec![3.0; 4], vec![1.0; 11]].concat();
    assert_eq!(steps, want);
}

#[test]
fn a_frozen_worker_is_declared_gone_and_comes_back_when_it_thaws() {
    let freeze = Fault { at: 2.0, worker: 1, kind: FaultKind::Freeze { seconds: 4.0 } };
    let r = simulate(&cluster(2, 1, 80, 3, vec![freeze]), None).unwrap();
    assert_eq!(r.summary.steps, 80);
    let left = r
        .events
        .iter()
        .position(|e| matches!(e, Event::WorkerLeft { worker, .. } if worker.0 == 1))
        .expect("declared gone");
    let back = r.events[left..]
        .iter()
        .any(|e| matches!(e, Event::WorkerJoined { worker, time } if worker.0 == 1 && *time >= 6.0));
    assert!(back, "the thawed worker came back");
    check_invariants(&r.events, 2).unwrap();
}

#[test]
fn a_cluster_with_too_few_live_workers_stops_instead_of_waiting_forever() {
    // N = 3 with no backups, and worker 2 dies for good: the stall time-out ends the run.
    let crash = Fault { at: 1.0, worker: 2, kind: FaultKind::Crash { restart_after: None } };
    let r = simulate(&cluster(3, 0, 1000, 1, vec![crash.clone()]), None).unwrap();
    assert!(r.summary.steps < 1000);
    check_invariants(&r.events, 3).unwrap();
    // Without a stall time-out a real server would wait forever: the simulator says so.
    let mut cfg = cluster(3, 0, 1000, 1, vec![crash]);
    cfg.server.liveness.stall_timeout = None;
    let e = simulate(&cfg, None).unwrap_err();
    assert!(matches!(e, SimError::Hang { .. }), "{e}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn under_any_fault_schedule_the_run_ends_and_every_step_is_applied_once_with_n_distinct_workers(
        seed in 0u64..1_000_000,
        aggregate in 1u32..6,
        backups in 0u32..3,
        lower in any::<bool>(),
        adaptive in any::<bool>(),
        faults in schedules(8),
    ) {
        let workers = aggregate + backups;
        let faults: Vec<Fault> = faults.into_iter().map(|f| Fault { worker: f.worker % workers, ..f }).collect();
        let mut cfg = cluster(aggregate, backups, 150, seed, faults);
        if lower {
            cfg.server.liveness.on_stall = OnStall::LowerAggregate;
        }
        // The adaptive policy between N = aggregate and every worker: whatever it chooses,
        // each step has exactly the N its events announce.
        let start = if adaptive {
            cfg.server.policy = Policy::Adaptive { min: aggregate, max: workers };
            workers
        } else {
            aggregate
        };
        let r = simulate(&cfg, None).map_err(|e| TestCaseError::fail(e.to_string()))?;
        check_invariants(&r.events, start).map_err(|e| TestCaseError::fail(e.to_string()))?;
        // It ended (no `Hang`, no `Stuck`): all its steps, or a stop for too few workers.
        prop_assert!(r.summary.steps <= 150);
    }
}
