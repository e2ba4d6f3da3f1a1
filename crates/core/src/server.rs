//! The parameter server's state machine.
//!
//! One entry point per input — [`Server::handle`] for a worker's message and
//! [`Server::tick`] for the passage of time — and outputs as values ([`Outputs`]). The
//! driver carries out the [`Action`]s (sending parameters, stopping) and records the
//! [`Event`]s. An `Err` means a protocol violation and leaves the server exactly as it was.

use crate::adaptive::AdaptiveRule;
use crate::clip::{clip_factor, global_norm};
use crate::ema;
use crate::error::{ConfigError, ProtocolError};
use crate::event::{DropReason, Event, LeaveReason};
use crate::ids::{Step, WorkerId};
use crate::layout::ParamLayout;
use crate::message::ToServer;
use crate::optim::Optimizer;
use crate::policy::Policy;
use std::collections::VecDeque;

mod config;
mod liveness;
mod output;

pub use config::{Liveness, OnStall, ServerConfig};
pub use output::{Action, Outputs, ServerSnapshot, StopReason};
use std::time::Duration;

#[derive(Debug, Clone, Default)]
struct Slot {
    joined: bool,
    alive: bool,
    last_seen: Duration,
    /// When parameters were last sent to it (async "since_open"), or, under the adaptive
    /// policy, when it last pushed (it asks for parameters right after).
    sent_at: Duration,
    /// Last step it pushed (duplicate detection in async).
    last_push: Option<Step>,
    /// Last step whose gradient from it was accepted: a re-push of that step (its reply was
    /// lost, or it restarted mid-step) is answered "already accepted" and applied once.
    accepted: Option<Step>,
    /// The session that holds this index (see [`ToServer::Join`]).
    session: Option<u64>,
}

/// How many past step-opening times are remembered to time late arrivals.
const OPEN_TIMES_KEPT: usize = 1024;

/// The parameter server state machine.
#[derive(Debug, Clone)]
pub struct Server {
    cfg: ServerConfig,
    layout: ParamLayout,
    params: Vec<f32>,
    ema: Option<Vec<f32>>,
    opt: Optimizer,
    step: Step,
    aggregate: u32,
    /// Running sum of the current step's gradients: memory O(parameters), not O(N·parameters).
    sum: Vec<f32>,
    /// Sync policies: the running sum with a pushed gradient added, written in the same pass
    /// that checks the gradient finite (one read of it, not a check and then an add); becomes
    /// the sum once the gradient is accepted, and is thrown away if it is refused.
    staged: Vec<f32>,
    /// Workers in the open step, in arrival order, plus a per-worker flag for O(1) lookups.
    contributors: Vec<WorkerId>,
    contributed: Vec<bool>,
    loss_sum: f64,
    loss_count: u32,
    opened_at: Duration,
    open_times: VecDeque<(Step, Duration)>,
    slots: Vec<Slot>,
    stall_since: Option<Duration>,
    /// Deadline policy: the open step's time-out has passed (a tick saw it), so the step
    /// closes as soon as `min` gradients are in, and the deadline is no longer a wake-up.
    deadline_passed: bool,
    /// Adaptive policy: the rule choosing N, and the open step's sum of squared gradient norms.
    adaptive: Option<AdaptiveRule>,
    sum_sq: f64,
    stopped: bool,
}

/// The refusal of a gradient holding a value that is not finite, naming the first.
fn non_finite(from: WorkerId, g: &[f32]) -> ProtocolError {
    let index = g.iter().position(|x| !x.is_finite()).unwrap_or(0);
    ProtocolError::NonFinite { worker: from, index, value: g[index] }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl Server {
    /// A server at step 0 with parameters `init` laid out as `layout`.
    pub fn new(cfg: ServerConfig, layout: ParamLayout, init: Vec<f32>) -> Result<Self, ConfigError> {
        cfg.validate()?;
        if init.len() != layout.len() {
            return Err(ConfigError::invalid(format!(
                "initial parameters have {} values but the layout has {}",
                init.len(),
                layout.len()
            )));
        }
        let n = layout.len();
        let workers = cfg.workers as usize;
        let aggregate = match cfg.policy {
            Policy::Sync { aggregate, .. } => aggregate,
            Policy::Deadline { min, .. } => min,
            Policy::Async { .. } => 1,
            Policy::Adaptive { max, .. } => max,
        };
        let adaptive = match cfg.policy {
            Policy::Adaptive { min, max } => Some(AdaptiveRule::new(cfg.workers, min, max)),
            _ => None,
        };
        Ok(Server {
            adaptive,
            sum_sq: 0.0,
            opt: Optimizer::new(cfg.optimizer.clone(), n),
            ema: cfg.ema_decay.map(|_| init.clone()),
            sum: vec![0.0; n],
            staged: vec![0.0; n],
            slots: vec![Slot::default(); cfg.workers as usize],
            cfg,
            layout,
            params: init,
            step: 0,
            aggregate,
            contributors: Vec::new(),
            contributed: vec![false; workers],
            loss_sum: 0.0,
            loss_count: 0,
            opened_at: Duration::ZERO,
            open_times: VecDeque::new(),
            stall_since: None,
            deadline_passed: false,
            stopped: false,
        })
    }

    /// A server continuing from a snapshot (after a restart). Workers must join again.
    pub fn restore(cfg: ServerConfig, layout: ParamLayout, snap: ServerSnapshot) -> Result<Self, ConfigError> {
        let mut s = Server::new(cfg, layout, snap.params)?;
        if let Some(e) = &snap.ema {
            if e.len() != s.params.len() {
                return Err(ConfigError::invalid("checkpoint EMA has the wrong length"));
            }
        }
        if s.cfg.ema_decay.is_some() {
            s.ema = Some(snap.ema.unwrap_or_else(|| s.params.clone()));
        }
        s.opt.restore_named(snap.optimizer_slots, snap.optimizer_updates)?;
        s.step = snap.step;
        if snap.aggregate >= 1 && snap.aggregate <= s.aggregate {
            s.aggregate = snap.aggregate;
        }
        Ok(s)
    }

    /// Captures the durable state.
    pub fn snapshot(&self) -> ServerSnapshot {
        ServerSnapshot {
            step: self.step,
            params: self.params.clone(),
            ema: self.ema.clone(),
            optimizer_slots: self.opt.named_slots(),
            optimizer_updates: self.opt.updates(),
            aggregate: self.aggregate,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// The parameter layout.
    pub fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    /// Current parameters (of [`Server::step`]).
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// The parameter EMA, if kept.
    pub fn ema(&self) -> Option<&[f32]> {
        self.ema.as_deref()
    }

    /// The current step: updates applied so far.
    pub fn step(&self) -> Step {
        self.step
    }

    /// Gradients a sync step currently needs (N; lower after a stall with `lower_aggregate`).
    pub fn aggregate(&self) -> u32 {
        self.aggregate
    }

    /// Whether the server has stopped.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// The session of the process that holds worker `w`'s index, if one joined.
    pub fn session(&self, w: WorkerId) -> Option<u64> {
        self.slots.get(w.index()).and_then(|s| s.session)
    }

    /// Workers currently considered alive, sorted.
    pub fn live_workers(&self) -> Vec<WorkerId> {
        self.slots.iter().enumerate().filter(|(_, s)| s.alive).map(|(i, _)| WorkerId(i as u32)).collect()
    }

    /// Workers that have pushed for the open step, in arrival order.
    pub fn contributors(&self) -> &[WorkerId] {
        &self.contributors
    }

    /// The earliest time at which [`Server::tick`] may have something to do.
    pub fn next_wakeup(&self) -> Option<Duration> {
        if self.stopped {
            return None;
        }
        let mut best: Option<Duration> = None;
        let mut consider = |t: Duration| best = Some(best.map_or(t, |b| b.min(t)));
        if let Policy::Deadline { timeout, .. } = self.cfg.policy {
            // Once passed, the deadline is no wake-up: the step then closes on the push that
            // brings `min` gradients (a past instant would be re-scheduled at "now" forever).
            if !self.deadline_passed {
                consider(self.opened_at + timeout);
            }
        }
        if let Some(wt) = self.cfg.liveness.worker_timeout {
            for s in self.slots.iter().filter(|s| s.alive) {
                consider(s.last_seen + wt);
            }
        }
        if let (Some(since), Some(st)) = (self.stall_since, self.cfg.liveness.stall_timeout) {
            consider(since + st);
        }
        best
    }

    /// Handles one message from worker `from` at time `now`.
    pub fn handle(&mut self, now: Duration, from: WorkerId, msg: ToServer) -> Result<Outputs, ProtocolError> {
        if self.stopped {
            return Err(ProtocolError::Stopped);
        }
        if from.index() >= self.slots.len() {
            return Err(ProtocolError::UnknownWorker { worker: from, workers: self.cfg.workers });
        }
        match msg {
            ToServer::Join { session } => self.on_join(now, from, session),
            ToServer::Heartbeat => {
                self.require_joined(from)?;
                Ok(self.touch(now, from))
            }
            ToServer::Leave => {
                self.require_joined(from)?;
                Ok(self.on_leave(now, from))
            }
            ToServer::Push { step, gradient, loss } => self.push(now, from, step, &gradient, loss),
        }
    }

    /// Handles a pushed gradient that the caller keeps: the same as [`ToServer::Push`]
    /// through [`Server::handle`], for drivers that reuse their receive buffers.
    ///
    /// Under the sync and deadline policies a gradient for a step that has already closed is
    /// dropped as late without its values being read, so a worker that knows its step closed
    /// may report the late gradient empty (a "late notice") instead of sending it in full.
    pub fn push(
        &mut self,
        now: Duration,
        from: WorkerId,
        step: Step,
        gradient: &[f32],
        loss: Option<f32>,
    ) -> Result<Outputs, ProtocolError> {
        if self.stopped {
            return Err(ProtocolError::Stopped);
        }
        if from.index() >= self.slots.len() {
            return Err(ProtocolError::UnknownWorker { worker: from, workers: self.cfg.workers });
        }
        self.require_joined(from)?;
        if self.slots[from.index()].accepted == Some(step) {
            // Sent again after a lost reply or a restart mid-step: the server already holds it.
            let mut out = self.touch(now, from);
            out.events.push(Event::GradientRepeated { worker: from, step, time: secs(now) });
            return Ok(out);
        }
        let sync = !matches!(self.cfg.policy, Policy::Async { .. });
        let late = sync && step < self.step;
        if !late {
            self.validate_push(from, step, gradient, !sync)?;
        }
        if sync && !late {
            self.stage(from, gradient)?;
        }
        let mut out = self.touch(now, from);
        if self.stopped {
            // Hearing from a worker fired the stall check, which stopped the run: stopping is
            // final, so this gradient closes nothing.
            return Ok(out);
        }
        out.extend(match self.cfg.policy {
            Policy::Async { max_staleness } => self.push_async(now, from, step, gradient, loss, max_staleness),
            Policy::Sync { .. } | Policy::Deadline { .. } | Policy::Adaptive { .. } => {
                self.push_sync(now, from, step, gradient, loss)
            }
        });
        Ok(out)
    }

    /// Lets time pass: liveness time-outs, deadline closes, stall handling.
    pub fn tick(&mut self, now: Duration) -> Outputs {
        let mut out = Outputs::default();
        if self.stopped {
            return out;
        }
        if let Some(wt) = self.cfg.liveness.worker_timeout {
            for (i, s) in self.slots.iter_mut().enumerate() {
                if s.alive && s.last_seen + wt <= now {
                    s.alive = false;
                    out.events.push(Event::WorkerLeft {
                        worker: WorkerId(i as u32),
                        reason: LeaveReason::TimedOut,
                        time: secs(now),
                    });
                }
            }
        }
        if let Policy::Deadline { timeout, .. } = self.cfg.policy {
            self.deadline_passed |= now >= self.opened_at + timeout;
        }
        if self.should_close(now) {
            out.extend(self.close(now));
        }
        out.extend(self.check_stall(now));
        out
    }

    /// [`Server::handle`] for a message from the process `session`: every message but a join
    /// must come from the session that joined as `from` ([`Server::check_session`]).
    pub fn handle_from(
        &mut self,
        now: Duration,
        from: WorkerId,
        session: u64,
        msg: ToServer,
    ) -> Result<Outputs, ProtocolError> {
        if !matches!(msg, ToServer::Join { .. }) {
            self.check_session(from, session)?;
        }
        self.handle(now, from, msg)
    }

    /// Checks that `session` holds worker `w`'s index: every message after a join must come
    /// from the session that joined, so no other process can speak as `w`.
    pub fn check_session(&self, w: WorkerId, session: u64) -> Result<(), ProtocolError> {
        let slot =
            self.slots.get(w.index()).ok_or(ProtocolError::UnknownWorker { worker: w, workers: self.cfg.workers })?;
        match slot.session {
            Some(s) if s != session => Err(ProtocolError::WrongSession { worker: w }),
            _ => Ok(()),
        }
    }

    fn require_joined(&self, w: WorkerId) -> Result<(), ProtocolError> {
        if self.slots[w.index()].joined {
            Ok(())
        } else {
            Err(ProtocolError::NotJoined { worker: w })
        }
    }

    /// Checks a push; its values are checked finite here only with `values` (sync policies
    /// check them in [`Server::stage`]).
    fn validate_push(&self, from: WorkerId, step: Step, g: &[f32], values: bool) -> Result<(), ProtocolError> {
        if step > self.step {
            return Err(ProtocolError::FutureStep { worker: from, step, current: self.step });
        }
        let duplicate = match self.cfg.policy {
            Policy::Async { .. } => self.slots[from.index()].last_push.is_some_and(|p| p >= step),
            _ => step == self.step && self.contributed[from.index()],
        };
        if duplicate {
            return Err(ProtocolError::DuplicatePush { worker: from, step });
        }
        if g.len() != self.params.len() {
            return Err(ProtocolError::WrongLength { worker: from, got: g.len(), expected: self.params.len() });
        }
        // A branch-free fold vectorises; the position is only searched for on failure.
        if values && !g.iter().fold(true, |ok, x| ok & x.is_finite()) {
            return Err(non_finite(from, g));
        }
        Ok(())
    }

    /// Sync policies: the open step's sum plus `g` into `staged`, refusing `g` if any value
    /// is not finite (the sum untouched).
    fn stage(&mut self, from: WorkerId, g: &[f32]) -> Result<(), ProtocolError> {
        // Branch-free folds vectorise; the position is only searched for on failure.
        let finite = if self.contributors.is_empty() {
            self.staged.iter_mut().zip(g).fold(true, |ok, (s, &x)| {
                *s = x;
                ok & x.is_finite()
            })
        } else {
            self.staged.iter_mut().zip(self.sum.iter().zip(g)).fold(true, |ok, (s, (&a, &x))| {
                *s = a + x;
                ok & x.is_finite()
            })
        };
        if !finite {
            return Err(non_finite(from, g));
        }
        Ok(())
    }

    fn opened_at_of(&self, step: Step) -> Option<Duration> {
        if step == self.step {
            return Some(self.opened_at);
        }
        self.open_times.iter().rev().find(|(s, _)| *s == step).map(|(_, t)| *t)
    }

    fn push_sync(&mut self, now: Duration, from: WorkerId, step: Step, g: &[f32], loss: Option<f32>) -> Outputs {
        let mut out = Outputs::default();
        if self.adaptive.is_some() {
            // The worker could start this computation once it had pushed its previous one
            // and the step it computed for had opened.
            let opened = self.opened_at_of(step);
            let slot = &mut self.slots[from.index()];
            let start = opened.map_or(slot.sent_at, |o| o.max(slot.sent_at));
            slot.sent_at = now;
            if let Some(rule) = self.adaptive.as_mut() {
                rule.observe_response(from, secs(now.saturating_sub(start)));
            }
        }
        if step < self.step {
            let since_open = self.opened_at_of(step).map_or(f64::NAN, |t| secs(now.saturating_sub(t)));
            out.events.push(Event::GradientDropped {
                worker: from,
                step,
                reason: DropReason::Late,
                since_open,
                time: secs(now),
            });
            return out;
        }
        // The sum with `g` added, made when the push was checked.
        std::mem::swap(&mut self.sum, &mut self.staged);
        if self.adaptive.is_some() {
            self.sum_sq += (global_norm(g, 1.0) as f64).powi(2);
        }
        self.contributors.push(from);
        self.contributed[from.index()] = true;
        self.slots[from.index()].accepted = Some(step);
        if let Some(l) = loss.filter(|l| l.is_finite()) {
            self.loss_sum += l as f64;
            self.loss_count += 1;
        }
        out.events.push(Event::GradientAccepted {
            worker: from,
            step,
            k: self.contributors.len() as u32,
            since_open: secs(now.saturating_sub(self.opened_at)),
            staleness: 0,
            time: secs(now),
        });
        if self.should_close(now) {
            out.extend(self.close(now));
        }
        out
    }

    fn push_async(
        &mut self,
        now: Duration,
        from: WorkerId,
        step: Step,
        g: &[f32],
        loss: Option<f32>,
        max: Option<u64>,
    ) -> Outputs {
        let mut out = Outputs::default();
        let staleness = self.step - step;
        let slot = &mut self.slots[from.index()];
        slot.last_push = Some(step);
        let since_open = secs(now.saturating_sub(slot.sent_at));
        slot.sent_at = now;
        if max.is_some_and(|m| staleness > m) {
            out.events.push(Event::GradientDropped {
                worker: from,
                step,
                reason: DropReason::TooStale { staleness },
                since_open,
                time: secs(now),
            });
        } else {
            out.events.push(Event::GradientAccepted {
                worker: from,
                step,
                k: 1,
                since_open,
                staleness,
                time: secs(now),
            });
            self.contributors.push(from);
            self.contributed[from.index()] = true;
            self.slots[from.index()].accepted = Some(step);
            if let Some(l) = loss.filter(|l| l.is_finite()) {
                self.loss_sum += l as f64;
                self.loss_count += 1;
            }
            // Apply straight from the pushed buffer: no copy into the running sum.
            out.extend(self.apply(now, g, 1));
        }
        if !self.stopped {
            out.actions.push(Action::SendParams { to: from, step: self.step });
        }
        out
    }

    fn should_close(&self, now: Duration) -> bool {
        let have = self.contributors.len() as u32;
        if have == 0 {
            return false;
        }
        match self.cfg.policy {
            Policy::Sync { .. } | Policy::Adaptive { .. } => have >= self.aggregate,
            Policy::Deadline { timeout, .. } => {
                let all_in = self.slots.iter().zip(&self.contributed).all(|(s, &c)| !s.alive || c);
                all_in || (now >= self.opened_at + timeout && have >= self.aggregate)
            }
            Policy::Async { .. } => false,
        }
    }

    fn close(&mut self, now: Duration) -> Outputs {
        let sum = std::mem::take(&mut self.sum);
        let n = self.contributors.len();
        let out = self.apply(now, &sum, n);
        self.sum = sum;
        out
    }

    /// Averages `n` gradients summed in `grad_sum`, clips, applies the optimizer and EMA,
    /// and advances the step.
    fn apply(&mut self, now: Duration, grad_sum: &[f32], n: usize) -> Outputs {
        let mut out = Outputs::default();
        let mut scale = 1.0 / n as f32;
        let grad_norm = global_norm(grad_sum, scale);
        if let Some(c) = self.cfg.clip_norm {
            scale *= clip_factor(grad_norm, c);
        }
        let nominal = self.cfg.nominal_aggregate();
        let mut lr = self.cfg.schedule.lr(self.step, nominal);
        if let Some(rule) = self.adaptive.as_mut() {
            // Linear scaling: the configured rate is the rate at N = max.
            lr *= n as f32 / nominal as f32;
            rule.observe_step(n as u32, self.sum_sq, (grad_norm as f64).powi(2));
            self.sum_sq = 0.0;
        }
        self.opt.apply(&mut self.params, grad_sum, scale, lr);
        if let (Some(e), Some(alpha)) = (self.ema.as_mut(), self.cfg.ema_decay) {
            ema::update(e, &self.params, alpha);
        }
        let loss = (self.loss_count > 0).then(|| (self.loss_sum / self.loss_count as f64) as f32);
        let mut contributors = std::mem::take(&mut self.contributors);
        for w in &contributors {
            self.contributed[w.index()] = false;
        }
        contributors.sort_unstable();
        out.events.push(Event::StepApplied {
            step: self.step,
            contributors,
            duration: secs(now.saturating_sub(self.opened_at)),
            lr,
            grad_norm,
            loss,
            time: secs(now),
        });
        self.loss_sum = 0.0;
        self.loss_count = 0;
        if self.open_times.len() == OPEN_TIMES_KEPT {
            self.open_times.pop_front();
        }
        self.open_times.push_back((self.step, self.opened_at));
        self.step += 1;
        self.opened_at = now;
        self.deadline_passed = false;
        if self.cfg.max_steps.is_some_and(|m| self.step >= m) {
            self.stopped = true;
            out.actions.push(Action::Stop { reason: StopReason::Finished { steps: self.step } });
        } else if !matches!(self.cfg.policy, Policy::Async { .. }) {
            out.extend(self.choose_aggregate(now));
            out.actions.push(Action::BroadcastParams { step: self.step });
        }
        out
    }

    /// Adaptive policy: N for the step that just opened.
    fn choose_aggregate(&mut self, now: Duration) -> Outputs {
        let mut out = Outputs::default();
        if self.adaptive.is_none() {
            return out;
        }
        let live: Vec<bool> = self.slots.iter().map(|s| s.alive).collect();
        if let Some(choice) = self.adaptive.as_mut().and_then(|r| r.choose(self.aggregate, &live)) {
            self.change_aggregate(now, choice.aggregate, choice.reason, &mut out);
        }
        out
    }

    /// Sets N, with the event that says why.
    fn change_aggregate(&mut self, now: Duration, to: u32, reason: String, out: &mut Outputs) {
        out.events.push(Event::AggregateChanged { from: self.aggregate, to, reason, time: secs(now) });
        self.aggregate = to;
    }
}
