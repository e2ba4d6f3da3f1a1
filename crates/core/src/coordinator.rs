//! The one quorum of a sharded run: which workers each step takes, for the whole model.
//!
//! The coordinator runs the step rule itself — a [`Server`] over no parameters — and feeds
//! it a worker's gradient only once **every** shard holds that worker's slice for the step.
//! So the policy (N of N + b, the deadline, stalls, liveness, late notices) means exactly
//! what it means on one server; each [`Event::StepApplied`] it emits is the [`Commit`] every
//! shard applies. A worker that dies after pushing to some shards only is never complete,
//! so it never counts.
//!
//! Workers join, beat and leave at the coordinator (shard 0 hosts it); shards report the
//! slices they hold with [`Coordinator::slice_held`].
//!
//! Async runs too: a worker's gradient is applied once every shard holds its slice, as one
//! update of its own, with its staleness counted here (updates committed since the step it
//! was computed on) and dropped beyond `max_staleness` exactly as one server drops it.

use crate::error::{ConfigError, ProtocolError};
use crate::event::Event;
use crate::ids::{Step, WorkerId};
use crate::layout::ParamLayout;
use crate::message::ToServer;
use crate::policy::Policy;
use crate::server::{Outputs, Server, ServerConfig, ServerSnapshot};
use crate::shard::{check_shardable, Commit};
use std::collections::BTreeMap;
use std::time::Duration;

/// The coordinator's state machine.
#[derive(Debug, Clone)]
pub struct Coordinator {
    rule: Server,
    shards: u32,
    /// For each (step, worker) some shard reported: which shards hold its slice, and the
    /// mini-batch loss it reported.
    reports: BTreeMap<(Step, WorkerId), (Vec<bool>, Option<f32>)>,
}

impl Coordinator {
    /// A coordinator for `shards` shards at step 0.
    pub fn new(cfg: ServerConfig, shards: u32) -> Result<Self, ConfigError> {
        check_shardable(&cfg, shards)?;
        Ok(Coordinator { rule: Server::new(cfg, ParamLayout::new(), Vec::new())?, shards, reports: BTreeMap::new() })
    }

    /// A coordinator continuing at `step` with N = `aggregate` (from shard 0's checkpoint).
    pub fn restore(cfg: ServerConfig, shards: u32, step: Step, aggregate: u32) -> Result<Self, ConfigError> {
        check_shardable(&cfg, shards)?;
        let snap = ServerSnapshot {
            step,
            params: Vec::new(),
            ema: None,
            optimizer_slots: Vec::new(),
            optimizer_updates: step,
            aggregate,
        };
        Ok(Coordinator { rule: Server::restore(cfg, ParamLayout::new(), snap)?, shards, reports: BTreeMap::new() })
    }

    /// How many shards it coordinates.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The open step.
    pub fn step(&self) -> Step {
        self.rule.step()
    }

    /// Gradients the open step needs.
    pub fn aggregate(&self) -> u32 {
        self.rule.aggregate()
    }

    /// Whether the run has stopped.
    pub fn is_stopped(&self) -> bool {
        self.rule.is_stopped()
    }

    /// Workers alive, sorted.
    pub fn live_workers(&self) -> Vec<WorkerId> {
        self.rule.live_workers()
    }

    /// The step rule's configuration.
    pub fn config(&self) -> &ServerConfig {
        self.rule.config()
    }

    /// When [`Coordinator::tick`] may next have something to do.
    pub fn next_wakeup(&self) -> Option<Duration> {
        self.rule.next_wakeup()
    }

    /// A worker's join, heartbeat or leave (from the process `session`). A push is not a
    /// message to the coordinator: shards report slices with [`Coordinator::slice_held`].
    pub fn handle(
        &mut self,
        now: Duration,
        from: WorkerId,
        session: u64,
        msg: ToServer,
    ) -> Result<Outputs, ProtocolError> {
        if let ToServer::Push { .. } = msg {
            return Err(ProtocolError::MisroutedPush { worker: from });
        }
        let out = self.rule.handle_from(now, from, session, msg)?;
        Ok(self.after(out))
    }

    /// The session of the process that holds worker `w`'s index, if one joined: the only
    /// process the other shards may serve as `w`.
    pub fn session(&self, w: WorkerId) -> Option<u64> {
        self.rule.session(w)
    }

    /// Checks that `session` holds worker `w`'s index (see [`Server::check_session`]).
    pub fn check_session(&self, w: WorkerId, session: u64) -> Result<(), ProtocolError> {
        self.rule.check_session(w, session)
    }

    /// Shard `shard` holds worker `from`'s slice of the gradient of `step` (its loss
    /// `loss`). Once every shard holds it, it counts as one gradient in the step rule: the
    /// outputs then carry its events, and a [`Event::StepApplied`] when the step closes.
    pub fn slice_held(
        &mut self,
        now: Duration,
        shard: u32,
        from: WorkerId,
        step: Step,
        loss: Option<f32>,
    ) -> Result<Outputs, ProtocolError> {
        if shard >= self.shards {
            return Err(ProtocolError::UnknownShard { shard, shards: self.shards });
        }
        if from.index() >= self.rule.config().workers as usize {
            return Err(ProtocolError::UnknownWorker { worker: from, workers: self.rule.config().workers });
        }
        let shards = self.shards as usize;
        let entry = self.reports.entry((step, from)).or_insert_with(|| (vec![false; shards], None));
        entry.0[shard as usize] = true;
        entry.1 = entry.1.or(loss);
        if !entry.0.iter().all(|&h| h) {
            return Ok(Outputs::default());
        }
        let (_, loss) = self.reports.remove(&(step, from)).unwrap_or_default();
        // A worker's gradients complete in the order it pushed them: an older one still
        // reported by some shards only never will be (its process died half-way).
        self.reports.retain(|(s, w), _| *w != from || *s > step);
        let out = self.rule.push(now, from, step, &[], loss)?;
        Ok(self.after(out))
    }

    /// Lets time pass: liveness, deadlines, stalls.
    pub fn tick(&mut self, now: Duration) -> Outputs {
        let out = self.rule.tick(now);
        self.after(out)
    }

    /// The commits among `out`'s events, in order.
    pub fn commits(out: &Outputs) -> Vec<Commit> {
        Commit::from_events(&out.events)
    }

    /// Once a step closes, reports of slices that can no longer count are forgotten: in
    /// sync, those for closed steps that never became whole (a worker that died half-way
    /// through its pushes); in async, those beyond the staleness bound.
    fn after(&mut self, out: Outputs) -> Outputs {
        if out.events.iter().any(|e| matches!(e, Event::StepApplied { .. })) {
            let open = self.rule.step();
            match self.rule.config().policy {
                Policy::Async { max_staleness: Some(max) } => {
                    self.reports.retain(|(step, _), _| open.saturating_sub(*step) <= max);
                }
                Policy::Async { max_staleness: None } => {}
                _ => self.reports.retain(|(step, _), _| *step + 1 >= open),
            }
        }
        out
    }
}
