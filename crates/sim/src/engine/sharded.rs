//! A sharded run in virtual time: the core's [`Coordinator`] and one [`Shard`] per server,
//! driven as the networked servers drive them. Each worker's gradient travels to every shard
//! as a slice over that shard's own link (so shards see workers in different orders); a shard
//! holding a slice tells the coordinator (one latency away, except shard 0 where it runs);
//! each step the coordinator commits crosses to every shard, which applies it and sends its
//! part of the new parameters to every worker; a worker computes once it has every shard's
//! part of one step. A worker that crashes while its slices are on the way loses those not yet
//! through (a cut stream), so it can die having reached some shards only.
//!
//! Async runs pull as the networked worker does: after its push, a worker asks every shard for
//! parameters newer than the step it computed on (its request reaches a shard with its slice,
//! or with the coordinator's answer); a shard answers once it has applied that step; parts of
//! different steps are matched by asking the lagging shards for the newest.
//!
//! At the end every shard's applied commits (step, contributors, staleness) must equal the
//! coordinator's: the one-quorum invariant, checked on every sharded simulation
//! ([`SimError::ShardsDisagree`]).

use super::{at, Engine, SimError, SimEvent};
use crate::network::ServerLink;
use crate::report::ShardCheck;
use quorum_core::{
    Commit, ConfigError, Coordinator, DropReason, Event, Outputs, ParamLayout, ProtocolError, Server, ServerConfig,
    Shard, ShardPlan, SliceOutcome, Step, ToServer, WorkerId,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// A shard's part of the parameters of a step, as a worker received it, and its transfer time.
type Part = (Step, Arc<Vec<f32>>, f64);

/// What the engine drives: the one server, or a coordinator and its shards.
pub(super) enum Rule {
    One(Box<Server>),
    Sharded(Box<Sharded>),
}

/// A sharded run's state machines, links and what each applied.
pub(super) struct Sharded {
    coordinator: Coordinator,
    shards: Vec<Shard>,
    plan: ShardPlan,
    /// Each shard's links to the workers: its slices of parameters out, gradient slices in.
    down: Vec<ServerLink>,
    up: Vec<ServerLink>,
    /// Each shard's newest slice of parameters, shared by the messages that carry it.
    published: Vec<Option<(Step, Arc<Vec<f32>>)>>,
    /// For each worker, the newest slice of parameters from each shard, and its transfer time.
    parts: Vec<Vec<Option<Part>>>,
    /// Async: the step each worker asked each shard for, until that part arrives; and the
    /// requests each shard has not answered yet (it is behind).
    asked: Vec<Vec<Option<Step>>>,
    parked: Vec<Vec<Option<Step>>>,
    /// When each worker's latest slice reaches each shard: a link delivers in order (one
    /// HTTP/2 connection), so a later push's slice never overtakes an earlier one's.
    slice_at: Vec<Vec<Duration>>,
    /// The coordinator's commits, and each shard's applied commits.
    committed: Vec<Commit>,
    applied: Vec<Vec<Commit>>,
    /// Each shard's slices in the order it took them, per step; and (async) in arrival order.
    held: Vec<BTreeMap<Step, Vec<WorkerId>>>,
    arrivals: Vec<Vec<(Step, WorkerId)>>,
    /// A timing-only run's gradient: zeros, one value per shard.
    zeros: Arc<Vec<f32>>,
}

impl Rule {
    /// The one server, or (`shards` > 1) a coordinator and `shards` shards over `layout`
    /// (a timing-only run: one value per shard, the messages charged by the engine).
    pub(super) fn new(
        cfg: ServerConfig,
        shards: u32,
        workers: u32,
        layout: ParamLayout,
        init: Vec<f32>,
    ) -> Result<Rule, ConfigError> {
        if shards <= 1 {
            return Ok(Rule::One(Box::new(Server::new(cfg, layout, init)?)));
        }
        let timing_only = layout.is_empty();
        let (layout, init) = if timing_only {
            (ParamLayout::from_shapes([("virtual", vec![shards as usize])])?, vec![0.0; shards as usize])
        } else {
            (layout, init)
        };
        let plan = ShardPlan::new(&layout, shards)?;
        let shard = |k: u32| Shard::new(&cfg, &plan, k, init[plan.range(k)].to_vec());
        let shard_list = (0..shards).map(shard).collect::<Result<Vec<_>, _>>()?;
        let s = shards as usize;
        let w = workers as usize;
        Ok(Rule::Sharded(Box::new(Sharded {
            coordinator: Coordinator::new(cfg, shards)?,
            shards: shard_list,
            down: vec![ServerLink::default(); s],
            up: vec![ServerLink::default(); s],
            published: vec![None; s],
            parts: vec![vec![None; s]; w],
            asked: vec![vec![None; s]; w],
            slice_at: vec![vec![Duration::ZERO; s]; w],
            parked: vec![vec![None; w]; s],
            committed: Vec::new(),
            applied: vec![Vec::new(); s],
            held: vec![BTreeMap::new(); s],
            arrivals: vec![Vec::new(); s],
            zeros: Arc::new(vec![0.0; if timing_only { s } else { 0 }]),
            plan,
        })))
    }

    pub(super) fn step(&self) -> Step {
        match self {
            Rule::One(s) => s.step(),
            Rule::Sharded(x) => x.coordinator.step(),
        }
    }

    pub(super) fn is_stopped(&self) -> bool {
        match self {
            Rule::One(s) => s.is_stopped(),
            Rule::Sharded(x) => x.coordinator.is_stopped(),
        }
    }

    pub(super) fn next_wakeup(&self) -> Option<Duration> {
        match self {
            Rule::One(s) => s.next_wakeup(),
            Rule::Sharded(x) => x.coordinator.next_wakeup(),
        }
    }

    pub(super) fn live_workers(&self) -> Vec<WorkerId> {
        match self {
            Rule::One(s) => s.live_workers(),
            Rule::Sharded(x) => x.coordinator.live_workers(),
        }
    }

    pub(super) fn tick(&mut self, now: Duration) -> Outputs {
        match self {
            Rule::One(s) => s.tick(now),
            Rule::Sharded(x) => x.coordinator.tick(now),
        }
    }

    /// A join, heartbeat or leave (and, unsharded, a push): the coordinator keeps liveness.
    pub(super) fn handle_from(
        &mut self,
        now: Duration,
        from: WorkerId,
        session: u64,
        msg: ToServer,
    ) -> Result<Outputs, ProtocolError> {
        match self {
            Rule::One(s) => s.handle_from(now, from, session, msg),
            Rule::Sharded(x) => x.coordinator.handle(now, from, session, msg),
        }
    }

    /// The whole model's parameters (the shards' put end to end).
    pub(super) fn params(&self) -> Vec<f32> {
        match self {
            Rule::One(s) => s.params().to_vec(),
            Rule::Sharded(x) => x.shards.iter().flat_map(|s| s.params().iter().copied()).collect(),
        }
    }

    /// The whole model's EMA, if kept.
    pub(super) fn ema(&self) -> Option<Vec<f32>> {
        match self {
            Rule::One(s) => s.ema().map(<[f32]>::to_vec),
            Rule::Sharded(x) => {
                x.shards.iter().map(|s| s.ema().map(<[f32]>::to_vec)).collect::<Option<Vec<_>>>().map(|v| v.concat())
            }
        }
    }

    /// Whether the whole model's parameters can be read for `step`: at once on one server
    /// (as before sharding), sharded once every shard has applied `step` - 1.
    pub(super) fn whole_at(&self, step: Step) -> bool {
        match self {
            Rule::One(_) => true,
            Rule::Sharded(x) => x.shards.iter().all(|s| s.step() == step),
        }
    }

    pub(super) fn sharded(&mut self) -> Option<&mut Sharded> {
        match self {
            Rule::One(_) => None,
            Rule::Sharded(x) => Some(x),
        }
    }

    /// Forgets what `w` had received of each shard's parameters (a new process).
    pub(super) fn forget_parts(&mut self, w: WorkerId) {
        if let Some(x) = self.sharded() {
            x.parts[w.index()].iter_mut().for_each(|p| *p = None);
            x.asked[w.index()].iter_mut().for_each(|p| *p = None);
            x.parked.iter_mut().for_each(|p| p[w.index()] = None);
        }
    }

    /// Checks the one-quorum invariant: every shard applied exactly the coordinator's
    /// commits. Also counts the steps where some shard's own choice would have differed from
    /// them: its first N slices (sync), its arrival order (async).
    pub(super) fn check_one_quorum(&self) -> Result<Option<ShardCheck>, SimError> {
        let Rule::Sharded(x) = self else { return Ok(None) };
        for (k, applied) in x.applied.iter().enumerate() {
            if applied != &x.committed {
                let at = applied.iter().zip(&x.committed).position(|(a, c)| a != c).unwrap_or(applied.len());
                return Err(SimError::ShardsDisagree {
                    shard: k as u32,
                    step: at as u64,
                    why: format!(
                        "shard {k} applied {:?}, the coordinator committed {:?}",
                        applied.get(at),
                        x.committed.get(at)
                    ),
                });
            }
        }
        let asynchronous = matches!(x.coordinator.config().policy, quorum_core::Policy::Async { .. });
        let differs = |(i, c): (usize, &Commit)| {
            if asynchronous {
                let own = |order: &Vec<(Step, WorkerId)>| order.get(i).copied();
                return x.arrivals.iter().any(|order| own(order) != Some((c.read_step(), c.contributors[0])));
            }
            x.held.iter().any(|h| {
                let mut first: Vec<WorkerId> =
                    h.get(&c.step).map_or(&[][..], |v| v).iter().take(c.contributors.len()).copied().collect();
                first.sort();
                first != c.contributors
            })
        };
        let mut reached: BTreeMap<(Step, WorkerId), usize> = BTreeMap::new();
        for h in &x.held {
            for (step, ws) in h {
                ws.iter().for_each(|w| *reached.entry((*step, *w)).or_default() += 1);
            }
        }
        Ok(Some(ShardCheck {
            partial: reached.values().filter(|&&n| n < x.shards.len()).count() as u64,
            shards: x.shards.len() as u32,
            steps_agreed: x.committed.len() as u64,
            first_n_would_differ: x.committed.iter().enumerate().filter(|&c| differs(c)).count() as u64,
        }))
    }
}

impl Engine<'_> {
    /// The coordinator's outputs in a sharded run: its commits cross to every shard (at once
    /// to shard 0, where it runs); a worker it (re)admits gets every shard's parameters (async:
    /// also a worker whose gradient it applied or dropped, of the coordinator's step).
    pub(super) fn sharded_actions(&mut self, now: Duration, out: &Outputs) {
        let latency = self.cfg.network.latency;
        let asynchronous = self.asynchronous();
        let Some(x) = self.rule.sharded() else { return };
        let commits = Commit::from_events(&out.events);
        x.committed.extend(commits.iter().cloned());
        let step = x.coordinator.step();
        for c in commits {
            for k in 0..x.shards.len() as u32 {
                let when = if k == 0 { now } else { at(now, latency) };
                self.queue.push(when, SimEvent::CommitAt { shard: k, commit: c.clone() });
            }
        }
        for a in &out.actions {
            if let quorum_core::Action::SendParams { to, .. } = a {
                for k in 0..self.shard_count() {
                    if asynchronous {
                        self.ask(now, *to, k, step);
                    } else {
                        self.send_part(now, *to, k);
                    }
                }
            }
        }
    }

    fn asynchronous(&self) -> bool {
        matches!(self.cfg.server.policy, quorum_core::Policy::Async { .. })
    }

    /// Async: worker `w` asks shard `k` for its parameters of `step` or newer; a shard that
    /// has not applied the step yet answers once it has.
    fn ask(&mut self, now: Duration, w: WorkerId, k: u32, step: Step) {
        let Some(x) = self.rule.sharded() else { return };
        let asked = &mut x.asked[w.index()][k as usize];
        if asked.is_some_and(|a| a >= step) {
            return;
        }
        *asked = Some(step);
        if x.shards[k as usize].step() >= step {
            self.send_part(now, w, k);
        } else {
            x.parked[k as usize][w.index()] = Some(step);
        }
    }

    fn shard_count(&self) -> u32 {
        match &self.rule {
            Rule::One(_) => 1,
            Rule::Sharded(x) => x.shards.len() as u32,
        }
    }

    /// Shard `k` sends its newest parameters to worker `to` over its link.
    fn send_part(&mut self, now: Duration, to: WorkerId, k: u32) {
        let own = self.link_delay(now, to, self.bytes);
        let (bytes, total) = (self.bytes, self.cfg.network.server_bandwidth);
        let Some(x) = self.rule.sharded() else { return };
        let shard = &x.shards[k as usize];
        let step = shard.step();
        let params = match &x.published[k as usize] {
            Some((s, p)) if *s == step => p.clone(),
            _ => {
                let p = Arc::new(shard.params().to_vec());
                x.published[k as usize] = Some((step, p.clone()));
                p
            }
        };
        let part = part_bytes(bytes, &x.plan, k);
        let t = now.as_secs_f64();
        let transfer = match total {
            Some(bw) => own.max(x.down[k as usize].through(t, part as f64 / bw, self.cfg.network.latency)),
            None => own,
        };
        let transfer = transfer + self.jitter();
        let life = self.workers[to.index()].life;
        self.queue.push(at(now, transfer), SimEvent::ParamPart { to, life, shard: k, step, params, transfer });
    }

    /// A worker got shard `k`'s parameters of `step`: once it has every shard's part of one
    /// step newer than what it has, it reads them as the parameters of that step.
    pub(super) fn on_part(
        &mut self,
        now: Duration,
        to: WorkerId,
        shard: u32,
        step: Step,
        params: Arc<Vec<f32>>,
        transfer: f64,
    ) -> Result<(), SimError> {
        let have = self.workers[to.index()].latest.as_ref().map(|l| l.0);
        let asynchronous = self.asynchronous();
        let Some(x) = self.rule.sharded() else { return Ok(()) };
        let asked = &mut x.asked[to.index()];
        if asked[shard as usize].is_some_and(|a| step >= a) {
            asked[shard as usize] = None;
        }
        let parts = &mut x.parts[to.index()];
        if parts[shard as usize].as_ref().is_some_and(|p| p.0 > step) {
            return Ok(());
        }
        parts[shard as usize] = Some((step, params, transfer));
        if asynchronous && asked.iter().all(Option::is_none) {
            // Every part asked for is in: parts of different steps are matched by asking the
            // lagging shards for the newest one's step, as the networked worker does.
            let steps: Vec<Option<Step>> = parts.iter().map(|p| p.as_ref().map(|p| p.0)).collect();
            let newest = steps.iter().flatten().copied().max().unwrap_or(step);
            for (k, s) in steps.iter().enumerate() {
                if s.is_some_and(|s| s < newest) {
                    self.ask(now, to, k as u32, newest);
                }
            }
            return self.take_parts(now, to, newest, have);
        }
        self.take_parts(now, to, step, have)
    }

    /// A worker that holds every shard's part of `step`, newer than what it has, reads them
    /// as the parameters of that step.
    fn take_parts(&mut self, now: Duration, to: WorkerId, step: Step, have: Option<Step>) -> Result<(), SimError> {
        let Some(x) = self.rule.sharded() else { return Ok(()) };
        let parts = &x.parts[to.index()];
        if !parts.iter().all(|p| p.as_ref().is_some_and(|p| p.0 == step)) || have.is_some_and(|h| h >= step) {
            return Ok(());
        }
        let whole: Vec<f32> = parts.iter().flatten().flat_map(|p| p.1.iter().copied()).collect();
        let transfer = parts.iter().flatten().map(|p| p.2).fold(0.0, f64::max);
        let w = &mut self.workers[to.index()];
        w.latest = Some((step, Arc::new(whole), transfer));
        let acts = w.sm.on_params(step);
        self.worker_actions(now, to, acts)
    }

    /// A worker's push in a sharded run: its gradient's slice to every shard, each over that
    /// shard's link.
    pub(super) fn push_slices(
        &mut self,
        now: Duration,
        from: WorkerId,
        step: Step,
        grad: Arc<Vec<f32>>,
        loss: Option<f32>,
    ) {
        let own = self.link_delay(now, from, self.bytes);
        let (bytes, bw, latency) = (self.bytes, self.cfg.network.server_bandwidth, self.cfg.network.latency);
        let life = self.workers[from.index()].life;
        let Some(x) = self.rule.sharded() else { return };
        let grad = if grad.is_empty() { x.zeros.clone() } else { grad };
        let t = now.as_secs_f64();
        let mut arrivals = Vec::new();
        for k in 0..x.shards.len() {
            let arrive = match bw {
                Some(bw) => own.max(x.up[k].through(t, part_bytes(bytes, &x.plan, k as u32) as f64 / bw, latency)),
                None => own,
            };
            arrivals.push(arrive);
        }
        let arrivals: Vec<Duration> = arrivals.into_iter().map(|a| at(now, a + self.jitter())).collect();
        let Some(x) = self.rule.sharded() else { return };
        let mut events = Vec::new();
        for (k, arrive) in arrivals.into_iter().enumerate() {
            let when = arrive.max(x.slice_at[from.index()][k]);
            x.slice_at[from.index()][k] = when;
            events.push((when, SimEvent::Slice { shard: k as u32, from, life, step, grad: grad.clone(), loss }));
        }
        for (when, ev) in events {
            self.queue.push(when, ev);
        }
    }

    /// A slice reached shard `k`. One from a process that has crashed since is lost: the
    /// stream was cut before its end.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_slice(
        &mut self,
        now: Duration,
        k: u32,
        from: WorkerId,
        life: u32,
        step: Step,
        grad: &[f32],
        loss: Option<f32>,
    ) -> Result<super::Flow, SimError> {
        if self.workers[from.index()].life != life {
            return Ok(super::Flow::Next);
        }
        let latency = self.cfg.network.latency;
        let diverge = self.cfg.divergence_loss.is_some();
        let Some(x) = self.rule.sharded() else { return Ok(super::Flow::Next) };
        let range = x.plan.range(k);
        let outcome = match x.shards[k as usize].on_slice(from, step, &grad[range]) {
            Err(ProtocolError::NonFinite { .. }) if diverge => {
                self.report.summary.diverged = true;
                return Ok(super::Flow::End);
            }
            other => other?,
        };
        if outcome == SliceOutcome::Held {
            x.held[k as usize].entry(step).or_default().push(from);
        }
        if matches!(outcome, SliceOutcome::Held | SliceOutcome::TooStale { .. }) {
            x.arrivals[k as usize].push((step, from));
        }
        match outcome {
            SliceOutcome::Held if k == 0 => {
                let out = x.coordinator.slice_held(now, 0, from, step, loss)?;
                self.carry_out(now, out)?;
            }
            SliceOutcome::Held => {
                self.queue.push(at(now, latency), SimEvent::Report { shard: k, from, step, loss });
            }
            // Shard 0's record, as the networked shard 0 keeps it.
            SliceOutcome::Late if k == 0 => self.record_drop(now, from, step, DropReason::Late),
            SliceOutcome::Late | SliceOutcome::AlreadyHeld => {}
            SliceOutcome::TooStale { staleness } => {
                if k == 0 {
                    self.record_drop(now, from, step, DropReason::TooStale { staleness });
                }
                // The worker, told "too stale", asks every shard for newer parameters.
                for k in 0..self.shard_count() {
                    self.ask(now, from, k, step + 1);
                }
            }
        }
        Ok(super::Flow::Next)
    }

    /// Shard 0's record of a gradient it dropped on arrival (a slice after its step closed, a
    /// late notice, a slice beyond the staleness bound), as the networked shard 0 records it.
    pub(super) fn record_drop(&mut self, now: Duration, worker: WorkerId, step: Step, reason: DropReason) {
        let time = now.as_secs_f64();
        let e = Event::GradientDropped { worker, step, reason, since_open: f64::NAN, time };
        self.record.observe(&e);
        if self.cfg.record_events {
            self.report.events.push(e);
        }
    }

    /// Shard `k`'s report of a slice it holds reached the coordinator.
    pub(super) fn on_report(
        &mut self,
        now: Duration,
        k: u32,
        from: WorkerId,
        step: Step,
        loss: Option<f32>,
    ) -> Result<(), SimError> {
        let Some(x) = self.rule.sharded() else { return Ok(()) };
        let out = x.coordinator.slice_held(now, k, from, step, loss)?;
        self.carry_out(now, out)
    }

    /// A commit reached shard `k`: it applies it and sends its new parameters to every live
    /// worker (async: to the workers waiting for this step); once every shard has, an
    /// evaluation due at that step runs.
    pub(super) fn on_commit_at(&mut self, now: Duration, k: u32, commit: &Commit) -> Result<(), SimError> {
        let asynchronous = self.asynchronous();
        let Some(x) = self.rule.sharded() else { return Ok(()) };
        let out = x.shards[k as usize].on_commit(now, commit)?;
        x.applied[k as usize].push(commit.clone());
        let step = x.shards[k as usize].step();
        let waiting: Vec<WorkerId> = x.parked[k as usize]
            .iter_mut()
            .enumerate()
            .filter_map(|(w, p)| p.take_if(|p| *p <= step).map(|_| WorkerId(w as u32)))
            .collect();
        if out.actions.iter().any(|a| matches!(a, quorum_core::Action::BroadcastParams { .. })) && !self.done {
            let to = if asynchronous { waiting } else { self.rule.live_workers() };
            for w in to {
                self.send_part(now, w, k);
            }
        }
        self.evaluate_when_whole()
    }
}

/// Bytes of shard `k`'s part of a message of `bytes` for the whole model.
fn part_bytes(bytes: usize, plan: &ShardPlan, k: u32) -> usize {
    (bytes as f64 * plan.range(k).len() as f64 / plan.len().max(1) as f64).round() as usize
}
