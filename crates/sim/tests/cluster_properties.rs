//! Whole-cluster simulations checked against the protocol's invariants over many seeds.

use proptest::prelude::*;
use quorum_compute::LeastSquares;
use quorum_core::{Event, Policy};
use quorum_sim::{simulate, DelayModel, SimConfig, SimReport};

fn delay_models() -> impl Strategy<Value = DelayModel> {
    prop_oneof![
        (0.1f64..2.0).prop_map(DelayModel::Exponential),
        (0.5f64..2.0, 0.05f64..0.8).prop_map(|(m, s)| DelayModel::LogNormal(m, s)),
        (0.1f64..1.0, 0.1f64..1.0, 1.1f64..3.0).prop_map(|(b, x, a)| DelayModel::Pareto(b, x, a)),
        Just(DelayModel::Paper),
        (1u32..3, 2.0f64..6.0).prop_map(|(k, f)| DelayModel::SlowWorkers(k, f, Box::new(DelayModel::Exponential(0.5)))),
    ]
}

fn check_sync_invariants(r: &SimReport, aggregate: usize) {
    let mut expected_step = 0;
    let mut current = 0u64;
    for e in &r.events {
        match e {
            Event::StepApplied { step, contributors, .. } => {
                assert_eq!(*step, expected_step, "steps advance by exactly one");
                expected_step += 1;
                current = step + 1;
                assert_eq!(contributors.len(), aggregate, "every applied step has exactly N contributors");
                assert!(contributors.windows(2).all(|w| w[0] < w[1]), "contributors are distinct: {contributors:?}");
            }
            Event::GradientAccepted { step, .. } => {
                assert_eq!(*step, current, "no late gradient is ever accepted")
            }
            _ => {}
        }
    }
    assert_eq!(expected_step, r.summary.steps);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn sync_steps_have_exactly_n_distinct_current_contributors(
        seed in 0u64..1_000_000,
        aggregate in 1u32..12,
        backups in 0u32..5,
        delay in delay_models(),
        latency in 0.0f64..0.05,
    ) {
        let mut cfg = SimConfig::new(aggregate + backups, Policy::Sync { aggregate, backups }, 60, delay, seed);
        cfg.network.latency = latency;
        let r = simulate(&cfg, None).unwrap();
        prop_assert_eq!(r.summary.steps, 60);
        check_sync_invariants(&r, aggregate as usize);
    }

    #[test]
    fn the_same_seed_gives_the_same_trace(seed in 0u64..1_000_000, delay in delay_models()) {
        let cfg = SimConfig::new(6, Policy::Sync { aggregate: 4, backups: 2 }, 40, delay, seed);
        let a = simulate(&cfg, None).unwrap();
        let b = simulate(&cfg, None).unwrap();
        prop_assert_eq!(&a.events, &b.events);
        prop_assert_eq!(a.summary, b.summary);
    }
}

#[test]
fn a_different_seed_gives_a_different_trace() {
    let cfg =
        |seed| SimConfig::new(6, Policy::Sync { aggregate: 4, backups: 2 }, 40, DelayModel::Exponential(1.0), seed);
    assert_ne!(simulate(&cfg(1), None).unwrap().events, simulate(&cfg(2), None).unwrap().events);
}

#[test]
fn real_gradients_are_reproducible_bit_for_bit() {
    let run = || {
        let mut src = LeastSquares::new(16, 8, 0.1, 3);
        let cfg = SimConfig::new(5, Policy::Sync { aggregate: 4, backups: 1 }, 50, DelayModel::Paper, 9);
        simulate(&cfg, Some(&mut src)).unwrap().final_params
    };
    assert_eq!(run(), run());
}

#[test]
fn async_staleness_of_k_equal_speed_workers_averages_k_minus_one() {
    for k in [2u32, 4, 8] {
        let cfg = SimConfig::new(k, Policy::Async { max_staleness: None }, 4000, DelayModel::LogNormal(1.0, 0.1), 5);
        let r = simulate(&cfg, None).unwrap();
        let expected = (k - 1) as f64;
        assert!(
            (r.summary.mean_staleness - expected).abs() < 0.3,
            "k={k}: mean staleness {}",
            r.summary.mean_staleness
        );
    }
}

#[test]
fn async_staleness_bound_drops_old_gradients() {
    let mut cfg = SimConfig::new(8, Policy::Async { max_staleness: Some(3) }, 500, DelayModel::Exponential(1.0), 2);
    cfg.record_events = true;
    let r = simulate(&cfg, None).unwrap();
    assert!(r.summary.dropped > 0);
    for e in &r.events {
        if let Event::GradientAccepted { staleness, .. } = e {
            assert!(*staleness <= 3);
        }
    }
}

#[test]
fn paper_delay_model_matches_the_papers_figure_3() {
    // 100 workers, b = 0: about 80% of steps get their 98th gradient within 2 s, about 30% their 100th.
    let cfg = SimConfig::new(100, Policy::Sync { aggregate: 100, backups: 0 }, 3000, DelayModel::Paper, 11);
    let r = simulate(&cfg, None).unwrap();
    let frac = |k: u32| {
        let v: Vec<f64> = r.arrivals.iter().filter(|a| a.k == k).map(|a| a.seconds).collect();
        v.iter().filter(|&&s| s <= 2.0).count() as f64 / v.len() as f64
    };
    let (p98, p100) = (frac(98), frac(100));
    assert!((0.75..=0.90).contains(&p98), "98th within 2 s in {p98:.3} of steps");
    assert!((0.22..=0.38).contains(&p100), "100th within 2 s in {p100:.3} of steps");
    let means = r.mean_time_to_kth();
    assert!(
        means[99] - means[97] > 5.0 * (means[97] - means[89]),
        "the last few gradients take disproportionately long: {means:?}"
    );
}

#[test]
fn backups_shorten_steps_under_a_heavy_tail() {
    let step_time = |aggregate, backups| {
        let cfg = SimConfig::new(100, Policy::Sync { aggregate, backups }, 500, DelayModel::Paper, 4);
        simulate(&cfg, None).unwrap().summary.mean_step_seconds
    };
    let (plain, backed) = (step_time(100, 0), step_time(96, 4));
    assert!(backed < 0.8 * plain, "96+4: {backed:.3}s per step vs 100+0: {plain:.3}s");
}

#[test]
fn sync_training_on_least_squares_reaches_the_optimum() {
    let mut src = LeastSquares::new(16, 16, 0.1, 1);
    let mut cfg = SimConfig::new(5, Policy::Sync { aggregate: 4, backups: 1 }, 300, DelayModel::Exponential(1.0), 1);
    cfg.server.schedule = quorum_core::LrSchedule::constant(0.2);
    let r = simulate(&cfg, Some(&mut src)).unwrap();
    let d = src.distance(&r.final_params);
    assert!(d < 0.05, "distance to optimum {d}");
    assert_eq!(r.metrics.len(), 300);
    assert!(r.summary.final_test_loss.unwrap() < 0.01);
}

#[test]
fn slow_worker_is_the_one_whose_gradients_are_dropped() {
    let cfg = SimConfig::new(
        4,
        Policy::Sync { aggregate: 3, backups: 1 },
        200,
        "slow:1,5,lognormal:1,0.1".parse().unwrap(),
        3,
    );
    let r = simulate(&cfg, None).unwrap();
    let slow = &r.workers[0];
    assert!(slow.accepted < 5, "slow worker w0 contributed {} times", slow.accepted);
    assert!(r.workers[1..].iter().all(|w| w.accepted > 190));
}

#[test]
fn constant_time_async_workers_give_exactly_workers_minus_one_staleness() {
    let mut cfg = SimConfig::new(11, Policy::Async { max_staleness: None }, 500, DelayModel::Constant(1.0), 1);
    cfg.record_events = true;
    let r = simulate(&cfg, None).unwrap();
    let late: Vec<u64> = r
        .events
        .iter()
        .filter_map(|e| match e {
            Event::GradientAccepted { staleness, step, .. } if *step >= 20 => Some(*staleness),
            _ => None,
        })
        .collect();
    assert!(!late.is_empty());
    assert!(late.iter().all(|s| *s == 10), "staleness after warm-up: {:?}", &late[..10]);
}

#[test]
fn join_ramp_raises_the_staleness_gradually() {
    let mut cfg = SimConfig::new(11, Policy::Async { max_staleness: None }, 400, DelayModel::Constant(1.0), 1);
    cfg.record_events = true;
    cfg.join_ramp = 20.0;
    let r = simulate(&cfg, None).unwrap();
    let staleness_at = |t0: f64, t1: f64| -> Vec<u64> {
        r.events
            .iter()
            .filter_map(|e| match e {
                Event::GradientAccepted { staleness, time, .. } if *time >= t0 && *time < t1 => Some(*staleness),
                _ => None,
            })
            .collect()
    };
    let early = staleness_at(0.0, 5.0);
    let late = staleness_at(25.0, 30.0);
    assert!(early.iter().all(|s| *s <= 3), "early staleness {early:?}");
    assert!(late.iter().all(|s| *s == 10), "late staleness {late:?}");
}

#[test]
fn watched_divergence_ends_the_run_instead_of_failing_it() {
    let mut src = LeastSquares::new(16, 16, 0.1, 1);
    let mut cfg = SimConfig::new(2, Policy::Sync { aggregate: 2, backups: 0 }, 300, DelayModel::Exponential(1.0), 1);
    // A learning rate far above 2/L: the iterates blow up.
    cfg.server.schedule = quorum_core::LrSchedule::constant(50.0);
    cfg.divergence_loss = Some(1e6);
    let r = simulate(&cfg, Some(&mut src)).unwrap();
    assert!(r.summary.diverged);
    assert!(r.summary.steps < 300);

    let mut cfg = cfg.clone();
    cfg.server.schedule = quorum_core::LrSchedule::constant(0.1);
    let r = simulate(&cfg, Some(&mut src)).unwrap();
    assert!(!r.summary.diverged);
    assert_eq!(r.summary.steps, 300);
}
