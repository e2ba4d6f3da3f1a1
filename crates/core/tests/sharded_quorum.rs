//! Whole sharded clusters, run in virtual time with every message delivered in a random
//! order: S shards, one coordinator, N + b workers pushing each shard its slice, some of them
//! dying half-way through their pushes. Every shard must apply, at every step, the gradients
//! of exactly the workers the coordinator committed; the shards' parameters put end to end
//! must be what one server applying those commits would hold.

use proptest::prelude::*;
use quorum_core::*;
use std::time::Duration;

/// A small deterministic generator: the message order comes from the test's seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

enum Msg {
    Slice {
        worker: WorkerId,
        step: Step,
        shard: u32,
    },
    /// The next report on its way from `shard` to the coordinator: one stream per shard.
    Report {
        shard: u32,
    },
    /// The next commit on its way to `shard`: one stream per shard, delivered in order.
    Commit {
        shard: u32,
    },
}

/// The gradient worker `w` computes on the parameters of `step`: a function of both, like a
/// real worker's (its mini-batch depends only on the seed, the worker and the step).
fn gradient(w: WorkerId, step: Step, len: usize) -> Vec<f32> {
    (0..len).map(|i| (i as f32 * 0.37 + w.0 as f32 * 1.3 + step as f32 * 0.11).sin()).collect()
}

fn layout() -> ParamLayout {
    ParamLayout::from_shapes([("a", vec![4, 5]), ("b", vec![5]), ("c", vec![3, 4])]).unwrap()
}

struct Outcome {
    /// The coordinator's commits, in order.
    commits: Vec<Commit>,
    /// Each shard's applied steps, in order.
    applied: Vec<Vec<(Step, Vec<WorkerId>)>>,
    /// The shards' parameters put end to end, and what one server would hold.
    params: Vec<f32>,
    reference: Vec<f32>,
    /// (worker, step it died in).
    death: Option<(WorkerId, Step)>,
}

/// Runs a cluster until `steps` steps have closed. `dying`: a worker that, at step `at`,
/// pushes to the shards in `reached` only and then dies.
fn run(cfg: ServerConfig, shards: u32, seed: u64, dying: Option<(u32, Step, Vec<u32>)>) -> Outcome {
    let layout = layout();
    let plan = ShardPlan::new(&layout, shards).unwrap();
    let init: Vec<f32> = (0..layout.len()).map(|i| i as f32 * 0.01).collect();
    let mut shard: Vec<Shard> =
        (0..shards).map(|k| Shard::new(&cfg, &plan, k, init[plan.range(k)].to_vec()).unwrap()).collect();
    let mut coord = Coordinator::new(cfg.clone(), shards).unwrap();
    let workers = cfg.workers;
    let mut rng = Rng(seed | 1);
    let mut queue: Vec<Msg> = Vec::new();
    let mut now = Duration::ZERO;
    // The step each worker last pushed for; `None`: it has parameters to compute on.
    let mut pushed: Vec<Option<Step>> = vec![None; workers as usize];
    let mut dead = vec![false; workers as usize];
    let mut commits = Vec::new();
    let mut applied = vec![Vec::new(); shards as usize];
    let mut streams = vec![std::collections::VecDeque::new(); shards as usize];
    let mut reports = vec![std::collections::VecDeque::new(); shards as usize];
    // Slices each worker has sent that no shard has taken yet: a worker pushes its next
    // gradient once every shard answered its last push.
    let mut unanswered = vec![0u32; workers as usize];
    for w in 0..workers {
        coord.handle(now, WorkerId(w), u64::from(w), ToServer::Join { session: u64::from(w) }).unwrap();
    }
    let mut death = None;
    let mut stopped = false;
    loop {
        // Workers holding parameters of one step on every shard compute on them and push.
        let steps: Vec<Step> = shard.iter().map(Shard::step).collect();
        let same = steps.iter().all(|&s| s == steps[0]);
        for w in 0..workers {
            let i = w as usize;
            if dead[i] || stopped || !same || unanswered[i] > 0 || pushed[i].is_some_and(|p| p >= steps[0]) {
                continue;
            }
            let step = steps[0];
            pushed[i] = Some(step);
            let reached: Vec<u32> = match &dying {
                Some((who, at, reached)) if *who == w && *at == step => {
                    dead[i] = true;
                    death = Some((WorkerId(w), step));
                    reached.clone()
                }
                _ => (0..shards).collect(),
            };
            for k in reached {
                unanswered[i] += 1;
                queue.push(Msg::Slice { worker: WorkerId(w), step, shard: k });
            }
        }
        if queue.is_empty() {
            break;
        }
        now += Duration::from_millis(1);
        let out = coord.tick(now);
        let mut coord_out = vec![out];
        match queue.swap_remove(rng.below(queue.len())) {
            Msg::Slice { worker, step, shard: k } => {
                let g = gradient(worker, step, layout.len());
                let outcome = shard[k as usize].on_slice(worker, step, &g[plan.range(k)]).unwrap();
                unanswered[worker.index()] -= 1;
                if outcome == SliceOutcome::Held {
                    reports[k as usize].push_back((worker, step));
                    queue.push(Msg::Report { shard: k });
                }
            }
            Msg::Report { shard: k } => {
                let (worker, step) = reports[k as usize].pop_front().expect("one message per report sent");
                match coord.slice_held(now, k, worker, step, None) {
                    Ok(out) => coord_out.push(out),
                    Err(ProtocolError::Stopped) => {}
                    Err(e) => panic!("report refused: {e}"),
                }
            }
            Msg::Commit { shard: k } => {
                let commit = streams[k as usize].pop_front().expect("one message per commit sent");
                let out = shard[k as usize].on_commit(now, &commit).unwrap();
                for e in &out.events {
                    if let Event::StepApplied { step, contributors, .. } = e {
                        applied[k as usize].push((*step, contributors.clone()));
                    }
                }
            }
        }
        for out in coord_out {
            stopped |= out.actions.iter().any(|a| matches!(a, Action::Stop { .. }));
            for commit in Coordinator::commits(&out) {
                for k in 0..shards {
                    streams[k as usize].push_back(commit.clone());
                    queue.push(Msg::Commit { shard: k });
                }
                commits.push(commit);
            }
        }
    }
    // One server applying the same commits to the whole model, summing in the same order.
    let mut reference = init;
    let mut opt = Optimizer::new(cfg.optimizer.clone(), layout.len());
    for c in &commits {
        let mut sum = vec![0.0f32; layout.len()];
        for (i, w) in c.contributors.iter().enumerate() {
            let g = gradient(*w, c.read_step(), layout.len());
            if i == 0 {
                sum.copy_from_slice(&g);
            } else {
                sum.iter_mut().zip(&g).for_each(|(s, x)| *s += x);
            }
        }
        opt.apply(&mut reference, &sum, 1.0 / c.contributors.len() as f32, c.lr);
    }
    let params = shard.iter().flat_map(|s| s.params().to_vec()).collect();
    Outcome { commits, applied, params, reference, death }
}

fn sync_cfg(aggregate: u32, backups: u32, steps: Step) -> ServerConfig {
    let mut cfg = ServerConfig::new(aggregate + backups, Policy::Sync { aggregate, backups }, 0.1);
    cfg.optimizer = OptimizerConfig::Momentum { momentum: 0.9, nesterov: false };
    cfg.max_steps = Some(steps);
    cfg
}

fn check(o: &Outcome, steps: Step) {
    assert_eq!(o.commits.len() as Step, steps, "every step up to max_steps closes");
    for (k, a) in o.applied.iter().enumerate() {
        let expected: Vec<(Step, Vec<WorkerId>)> = o.commits.iter().map(|c| (c.step, c.contributors.clone())).collect();
        assert_eq!(a, &expected, "shard {k} applied other contributor sets than the coordinator committed");
    }
    if let Some((w, at)) = o.death {
        for c in o.commits.iter().filter(|c| c.read_step() >= at) {
            assert!(
                !c.contributors.contains(&w),
                "{w} died after pushing to some shards at step {at}, yet counts in {c:?}"
            );
        }
    }
    assert_eq!(o.params, o.reference, "the shards together hold what one server applying the commits would");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn every_shard_averages_the_same_workers_at_every_step(
        aggregate in 1u32..4, backups in 0u32..3, shards in 1u32..5, seed in any::<u64>(),
        dies in any::<bool>(), at in 0u64..4, reached_mask in any::<u8>(),
    ) {
        let steps = 6;
        let cfg = sync_cfg(aggregate, backups, steps);
        // A worker dies only where the others can still close steps.
        let dying = (dies && backups > 0).then(|| {
            let reached: Vec<u32> = (0..shards).filter(|k| reached_mask & (1 << k) != 0).take(shards as usize - 1).collect();
            (aggregate + backups - 1, at, reached)
        });
        let o = run(cfg, shards, seed, dying);
        check(&o, steps);
        for c in &o.commits {
            prop_assert_eq!(c.contributors.len() as u32, aggregate);
        }
    }

    #[test]
    fn async_updates_apply_the_same_gradient_of_the_same_age_on_every_shard(
        workers in 1u32..5, shards in 2u32..5, bound in proptest::option::of(0u64..3), seed in any::<u64>(),
        dies in any::<bool>(), at in 0u64..4, reached_mask in any::<u8>(),
    ) {
        let steps = 8;
        let mut cfg = ServerConfig::new(workers, Policy::Async { max_staleness: bound }, 0.1);
        cfg.optimizer = OptimizerConfig::Momentum { momentum: 0.9, nesterov: false };
        cfg.max_steps = Some(steps);
        let dying = (dies && workers > 1).then(|| {
            let reached: Vec<u32> = (0..shards).filter(|k| reached_mask & (1 << k) != 0).take(shards as usize - 1).collect();
            (workers - 1, at, reached)
        });
        let o = run(cfg, shards, seed, dying);
        check(&o, steps);
        for c in &o.commits {
            prop_assert_eq!(c.contributors.len(), 1, "an async update applies one gradient");
            prop_assert!(bound.is_none_or(|b| c.staleness <= b), "{:?} is staler than the bound {:?}", c, bound);
        }
    }

    #[test]
    fn deadline_steps_are_the_same_on_every_shard(shards in 2u32..5, seed in any::<u64>(), reached_mask in any::<u8>()) {
        let steps = 5;
        let mut cfg = ServerConfig::new(4, Policy::Deadline { min: 2, timeout: Duration::from_millis(3) }, 0.1);
        cfg.max_steps = Some(steps);
        let reached: Vec<u32> = (0..shards).filter(|k| reached_mask & (1 << k) != 0).take(shards as usize - 1).collect();
        let o = run(cfg, shards, seed, Some((3, 1, reached)));
        check(&o, steps);
    }
}

#[test]
fn a_worker_whose_slices_reached_some_shards_only_never_counts_even_when_it_was_first() {
    // w2's slice reaches shard 0 before anyone's, but never shard 1: the step takes w0 and w1.
    let cfg = sync_cfg(2, 1, 10);
    let plan = ShardPlan::new(&layout(), 2).unwrap();
    let mut coord = Coordinator::new(cfg.clone(), 2).unwrap();
    let t = Duration::ZERO;
    for w in 0..3 {
        coord.handle(t, WorkerId(w), u64::from(w), ToServer::Join { session: u64::from(w) }).unwrap();
    }
    let mut s0 = Shard::new(&cfg, &plan, 0, vec![0.0; plan.range(0).len()]).unwrap();
    let slice = vec![1.0; plan.range(0).len()];
    assert_eq!(s0.on_slice(WorkerId(2), 0, &slice).unwrap(), SliceOutcome::Held);
    assert!(coord.slice_held(t, 0, WorkerId(2), 0, None).unwrap().events.is_empty());
    for w in [0, 1] {
        s0.on_slice(WorkerId(w), 0, &slice).unwrap();
        coord.slice_held(t, 0, WorkerId(w), 0, None).unwrap();
    }
    let out = coord.slice_held(t, 1, WorkerId(0), 0, None).unwrap();
    assert_eq!(Coordinator::commits(&out).len(), 0, "w0 complete: one of two");
    let out = coord.slice_held(t, 1, WorkerId(1), 0, None).unwrap();
    let commit = Coordinator::commits(&out).into_iter().next().expect("w0 and w1 complete: the step closes");
    assert_eq!(commit.contributors, vec![WorkerId(0), WorkerId(1)]);
    let out = s0.on_commit(t, &commit).unwrap();
    assert!(
        out.events
            .iter()
            .any(|e| matches!(e, Event::GradientDropped { worker: WorkerId(2), reason: DropReason::Late, .. })),
        "{:?}",
        out.events
    );
}

#[test]
fn a_commit_naming_a_slice_the_shard_lacks_is_refused_and_changes_nothing() {
    let cfg = sync_cfg(2, 0, 10);
    let plan = ShardPlan::new(&layout(), 2).unwrap();
    let mut s = Shard::new(&cfg, &plan, 1, vec![0.5; plan.range(1).len()]).unwrap();
    s.on_slice(WorkerId(0), 0, &vec![1.0; plan.range(1).len()]).unwrap();
    let commit = Commit { step: 0, contributors: vec![WorkerId(0), WorkerId(1)], lr: 0.1, staleness: 0 };
    let e = s.on_commit(Duration::ZERO, &commit).unwrap_err().to_string();
    assert!(e.contains("shard 1 cannot apply the commit of step 0") && e.contains("no slice from w1"), "{e}");
    assert_eq!(s.step(), 0);
    assert!(s.params().iter().all(|&p| p == 0.5));
    let e = s.on_commit(Duration::ZERO, &Commit { step: 3, ..commit }).unwrap_err().to_string();
    assert!(e.contains("this shard is at step 0"), "{e}");
}

#[test]
fn policies_a_sharded_run_cannot_keep_yet_are_refused_with_what_to_do() {
    let mut cfg = ServerConfig::new(2, Policy::Adaptive { min: 1, max: 2 }, 0.1);
    let e = Coordinator::new(cfg.clone(), 2).unwrap_err().to_string();
    assert!(e.contains("the adaptive policy is not supported with 2 shards") && e.contains("shards = 1"), "{e}");
    assert!(Coordinator::new(cfg.clone(), 1).is_ok(), "one shard is today's server: every policy");
    cfg.policy = Policy::Async { max_staleness: None };
    assert!(Coordinator::new(cfg.clone(), 2).is_ok(), "async runs sharded");
    cfg.policy = Policy::Sync { aggregate: 2, backups: 0 };
    cfg.clip_norm = Some(1.0);
    assert!(Coordinator::new(cfg, 3).unwrap_err().to_string().contains("clip_norm"));
}

#[test]
fn a_shard_restored_from_its_snapshot_continues_identically() {
    let mut cfg = sync_cfg(1, 0, 10);
    cfg.optimizer = OptimizerConfig::Adam { beta1: 0.9, beta2: 0.999, epsilon: 1e-8 };
    cfg.ema_decay = Some(0.5);
    let plan = ShardPlan::new(&layout(), 3).unwrap();
    let n = plan.range(2).len();
    let mut a = Shard::new(&cfg, &plan, 2, vec![0.1; n]).unwrap();
    let commit = |step| Commit { step, contributors: vec![WorkerId(0)], lr: 0.01, staleness: 0 };
    let g: Vec<f32> = (0..n).map(|i| i as f32 - 3.0).collect();
    a.on_slice(WorkerId(0), 0, &g).unwrap();
    a.on_commit(Duration::ZERO, &commit(0)).unwrap();
    let mut b = Shard::restore(&cfg, &plan, 2, a.snapshot()).unwrap();
    for s in [&mut a, &mut b] {
        s.on_slice(WorkerId(0), 1, &g).unwrap();
        s.on_commit(Duration::ZERO, &commit(1)).unwrap();
    }
    assert_eq!(a.params(), b.params());
    assert_eq!(a.ema(), b.ema());
    assert_eq!(b.step(), 2);
}

#[test]
fn an_async_shard_holds_older_slices_until_the_coordinator_can_no_longer_apply_them() {
    let cfg = ServerConfig::new(3, Policy::Async { max_staleness: Some(1) }, 0.1);
    let plan = ShardPlan::new(&layout(), 2).unwrap();
    let n = plan.range(0).len();
    let mut s = Shard::new(&cfg, &plan, 0, vec![0.0; n]).unwrap();
    let commit = |step, w, staleness| Commit { step, contributors: vec![WorkerId(w)], lr: 0.1, staleness };
    for w in 0..3 {
        assert_eq!(s.on_slice(WorkerId(w), 0, &vec![1.0; n]).unwrap(), SliceOutcome::Held);
    }
    s.on_commit(Duration::ZERO, &commit(0, 0, 0)).unwrap();
    assert_eq!(s.held_slices(), 2, "w1's and w2's gradients of step 0 may still be applied (staleness 1)");
    let e = s.on_commit(Duration::ZERO, &commit(1, 0, 1)).unwrap_err().to_string();
    assert!(e.contains("no slice computed on step 0 from w0"), "w0's step-0 slice was applied once: {e}");
    let out = s.on_commit(Duration::ZERO, &commit(1, 1, 1)).unwrap();
    assert!(
        out.events.iter().any(|e| matches!(
            e,
            Event::GradientDropped { worker: WorkerId(2), step: 0, reason: DropReason::TooStale { staleness: 2 }, .. }
        )),
        "at step 2, w2's step-0 slice is beyond the bound: {:?}",
        out.events
    );
    assert_eq!(s.held_slices(), 0);
    assert_eq!(s.on_slice(WorkerId(2), 0, &vec![1.0; n]).unwrap(), SliceOutcome::TooStale { staleness: 2 });
    let mut sync = Shard::new(&sync_cfg(1, 0, 10), &plan, 0, vec![0.0; n]).unwrap();
    sync.on_slice(WorkerId(0), 0, &vec![1.0; n]).unwrap();
    let e = sync.on_commit(Duration::ZERO, &commit(0, 0, 1)).unwrap_err().to_string();
    assert!(e.contains("this run is not async"), "{e}");
}
