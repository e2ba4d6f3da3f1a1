//! One parameter-server shard: a range of the parameters ([`crate::ShardPlan`]) with that
//! range's optimizer state and EMA.
//!
//! A shard does not decide which gradients a step takes: with several shards, different
//! shards see different workers first, and taking each shard's own first N would average
//! different workers' work in different parts of the model (what TensorFlow's per-variable
//! accumulators do). So a shard *holds* each worker's slice for the open step, tells the
//! coordinator ([`crate::Coordinator`]) which slices it holds whole, and applies exactly the
//! set the coordinator commits ([`Commit`]) — the same set on every shard. Slices of workers
//! the commit leaves out are dropped as late.
//!
//! Holding slices costs one slice per worker that pushes before the step closes (at most
//! N + b slices of `1/S` of the model), where the single server keeps one running sum.
//!
//! Async runs keep their meaning: every gradient is applied on its own, in the order the
//! coordinator completes them, each with the staleness the coordinator measured. A shard
//! then holds slices computed on older parameters too (a worker's slice waits until the
//! coordinator has heard from every shard), and drops one once it can no longer be
//! committed: beyond `max_staleness`, or older than a slice of the same worker just applied
//! (a process that died having reached some shards only).

use crate::ema;
use crate::error::{ConfigError, ProtocolError};
use crate::event::{DropReason, Event};
use crate::ids::{Step, WorkerId};
use crate::optim::Optimizer;
use crate::policy::Policy;
use crate::server::{Action, Outputs, ServerConfig, ServerSnapshot};
use crate::shard_plan::ShardPlan;
use std::ops::Range;
use std::time::Duration;

/// The coordinator's decision for one step: every shard applies the same contributors'
/// slices, averaged, with the same learning rate.
#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    /// The step that closes.
    pub step: Step,
    /// The workers whose gradients the step averages, sorted.
    pub contributors: Vec<WorkerId>,
    /// The learning rate of the step.
    pub lr: f32,
    /// The contributors' gradients were computed on the parameters of `step - staleness`:
    /// 0 in sync and deadline runs, the gradient's age in async runs.
    pub staleness: u64,
}

impl Commit {
    /// The step whose parameters the contributors' gradients were computed on.
    pub fn read_step(&self) -> Step {
        self.step.saturating_sub(self.staleness)
    }

    /// The commits a coordinator's outputs stand for, in order: one per
    /// [`Event::StepApplied`], with the staleness of the [`Event::GradientAccepted`] that
    /// closed it (an async update takes one gradient, accepted just before it is applied).
    pub fn from_events(events: &[Event]) -> Vec<Commit> {
        let mut staleness = 0;
        let mut commits = Vec::new();
        for e in events {
            match e {
                Event::GradientAccepted { staleness: s, .. } => staleness = *s,
                Event::StepApplied { step, contributors, lr, .. } => {
                    commits.push(Commit { step: *step, contributors: contributors.clone(), lr: *lr, staleness });
                    staleness = 0;
                }
                _ => {}
            }
        }
        commits
    }
}

/// What a shard did with a worker's slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SliceOutcome {
    /// Held for the open step: tell the coordinator.
    Held,
    /// This shard already holds that worker's slice for that step (a re-push): kept once.
    AlreadyHeld,
    /// Its step has closed: dropped unread.
    Late,
    /// Async: computed on parameters more than `max_staleness` updates old; dropped unread.
    TooStale {
        /// Updates this shard applied since.
        staleness: u64,
    },
}

/// A shard's state machine.
#[derive(Debug, Clone)]
pub struct Shard {
    index: u32,
    range: Range<usize>,
    workers: u32,
    params: Vec<f32>,
    ema: Option<Vec<f32>>,
    ema_decay: Option<f32>,
    opt: Optimizer,
    step: Step,
    opened_at: Duration,
    /// Async: every gradient is its own update (`Some`, with the staleness bound if any).
    asynchronous: Option<Option<u64>>,
    /// Each worker's slices held, with the step each was computed on (sync: at most one,
    /// for the open step).
    held: Vec<Vec<(Step, Vec<f32>)>>,
    /// Buffers of slices already applied or dropped, reused.
    spare: Vec<Vec<f32>>,
    sum: Vec<f32>,
}

impl Shard {
    /// Shard `index` of `plan` at step 0, holding `init` (its range of the initial
    /// parameters). The policy must be one a sharded run supports ([`check_shardable`]).
    pub fn new(cfg: &ServerConfig, plan: &ShardPlan, index: u32, init: Vec<f32>) -> Result<Self, ConfigError> {
        cfg.validate()?;
        check_shardable(cfg, plan.shards())?;
        if index >= plan.shards() {
            return Err(ConfigError::invalid(format!(
                "shard {index} of {}: shards are numbered 0..{}",
                plan.shards(),
                plan.shards()
            )));
        }
        let range = plan.range(index);
        if init.len() != range.len() {
            return Err(ConfigError::invalid(format!(
                "shard {index} holds parameters {range:?} ({} values) but was given {}",
                range.len(),
                init.len()
            )));
        }
        Ok(Shard {
            index,
            workers: cfg.workers,
            ema: cfg.ema_decay.map(|_| init.clone()),
            ema_decay: cfg.ema_decay,
            opt: Optimizer::new(cfg.optimizer.clone(), range.len()),
            sum: vec![0.0; range.len()],
            range,
            params: init,
            step: 0,
            opened_at: Duration::ZERO,
            asynchronous: match cfg.policy {
                Policy::Async { max_staleness } => Some(max_staleness),
                _ => None,
            },
            held: vec![Vec::new(); cfg.workers as usize],
            spare: Vec::new(),
        })
    }

    /// A shard continuing from its checkpoint.
    pub fn restore(
        cfg: &ServerConfig,
        plan: &ShardPlan,
        index: u32,
        snap: ServerSnapshot,
    ) -> Result<Self, ConfigError> {
        let mut s = Shard::new(cfg, plan, index, snap.params)?;
        if let Some(e) = snap.ema.filter(|_| s.ema.is_some()) {
            if e.len() != s.params.len() {
                return Err(ConfigError::invalid(format!("shard {index}'s checkpoint EMA has the wrong length")));
            }
            s.ema = Some(e);
        }
        s.opt.restore_named(snap.optimizer_slots, snap.optimizer_updates)?;
        s.step = snap.step;
        Ok(s)
    }

    /// The durable state of this shard (its range only), for its checkpoint.
    pub fn snapshot(&self) -> ServerSnapshot {
        ServerSnapshot {
            step: self.step,
            params: self.params.clone(),
            ema: self.ema.clone(),
            optimizer_slots: self.opt.named_slots(),
            optimizer_updates: self.opt.updates(),
            aggregate: 0,
        }
    }

    /// This shard's number.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The parameters it holds, as a range of the flat buffer.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    /// Its parameters (of [`Shard::step`]).
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// Its part of the parameter EMA, if kept.
    pub fn ema(&self) -> Option<&[f32]> {
        self.ema.as_deref()
    }

    /// Updates applied so far.
    pub fn step(&self) -> Step {
        self.step
    }

    /// Slices held, waiting for the coordinator's decision.
    pub fn held_slices(&self) -> usize {
        self.held.iter().map(Vec::len).sum()
    }

    /// Takes worker `from`'s slice of a gradient computed on the parameters of `step`.
    /// [`SliceOutcome::Held`] means the coordinator must hear of it.
    pub fn on_slice(&mut self, from: WorkerId, step: Step, slice: &[f32]) -> Result<SliceOutcome, ProtocolError> {
        if from.index() >= self.held.len() {
            return Err(ProtocolError::UnknownWorker { worker: from, workers: self.workers });
        }
        if step > self.step {
            return Err(ProtocolError::FutureStep { worker: from, step, current: self.step });
        }
        match self.asynchronous {
            None if step < self.step => return Ok(SliceOutcome::Late),
            // The coordinator is at this shard's step or past it: it would drop this too.
            Some(Some(max)) if self.step - step > max => {
                return Ok(SliceOutcome::TooStale { staleness: self.step - step })
            }
            _ => {}
        }
        if self.held[from.index()].iter().any(|(s, _)| *s == step) {
            return Ok(SliceOutcome::AlreadyHeld);
        }
        if slice.len() != self.params.len() {
            return Err(ProtocolError::WrongLength { worker: from, got: slice.len(), expected: self.params.len() });
        }
        if !slice.iter().fold(true, |ok, x| ok & x.is_finite()) {
            let at = slice.iter().position(|x| !x.is_finite()).unwrap_or(0);
            return Err(ProtocolError::NonFinite { worker: from, index: self.range.start + at, value: slice[at] });
        }
        let mut buf = self.spare.pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(slice);
        self.held[from.index()].push((step, buf));
        Ok(SliceOutcome::Held)
    }

    /// Applies the coordinator's commit: the mean of exactly `commit.contributors`' slices
    /// (computed on the parameters of [`Commit::read_step`]), with the optimizer and EMA, and
    /// opens the next step. Every contributor's slice must be held (the coordinator commits
    /// only workers every shard reported whole); an `Err` leaves the shard as it was.
    pub fn on_commit(&mut self, now: Duration, commit: &Commit) -> Result<Outputs, ProtocolError> {
        let bad = |why: String| ProtocolError::BadCommit { shard: self.index, step: commit.step, why };
        if commit.step != self.step {
            return Err(bad(format!("this shard is at step {}", self.step)));
        }
        if commit.contributors.is_empty() {
            return Err(bad("it names no contributor".into()));
        }
        if commit.staleness > 0 && self.asynchronous.is_none() {
            return Err(bad(format!(
                "it applies gradients {} updates old, and this run is not async",
                commit.staleness
            )));
        }
        let read = commit.read_step();
        let missing: Vec<String> = commit
            .contributors
            .iter()
            .filter(|w| slice_of(&self.held, **w, read).is_none())
            .map(|w| w.to_string())
            .collect();
        if !missing.is_empty() {
            let of = if read == commit.step { String::new() } else { format!(" computed on step {read}") };
            return Err(bad(format!("this shard holds no slice{of} from {}", missing.join(", "))));
        }
        let mut seen = vec![false; self.held.len()];
        if commit.contributors.iter().any(|w| std::mem::replace(&mut seen[w.index()], true)) {
            return Err(bad("it names a worker twice".into()));
        }
        // Summed in the commit's (sorted) order: the same sum on every run, whatever the
        // arrival order was.
        for (i, w) in commit.contributors.iter().enumerate() {
            let g = slice_of(&self.held, *w, read).unwrap_or_default();
            if i == 0 {
                self.sum.copy_from_slice(g);
            } else {
                for (s, x) in self.sum.iter_mut().zip(g) {
                    *s += x;
                }
            }
        }
        let scale = 1.0 / commit.contributors.len() as f32;
        self.opt.apply(&mut self.params, &self.sum, scale, commit.lr);
        if let (Some(e), Some(alpha)) = (self.ema.as_mut(), self.ema_decay) {
            ema::update(e, &self.params, alpha);
        }
        let mut out = Outputs::default();
        let since_open = now.saturating_sub(self.opened_at).as_secs_f64();
        let time = now.as_secs_f64();
        let next = self.step + 1;
        for (i, held) in self.held.iter_mut().enumerate() {
            let worker = WorkerId(i as u32);
            let mut k = 0;
            while k < held.len() {
                let step = held[k].0;
                let applied = seen[i] && step == read;
                let reason = match self.asynchronous {
                    _ if applied => None,
                    // Sync: everything held was for this step; the commit leaves it out.
                    None => Some(DropReason::Late),
                    // Async: the coordinator has decided every older slice of a worker it
                    // just applied (it completes each worker's gradients in order), and will
                    // drop any slice more than `max` updates old.
                    Some(_) if seen[i] && step < read => Some(DropReason::Late),
                    Some(Some(max)) if next - step > max => Some(DropReason::TooStale { staleness: next - step }),
                    Some(_) => {
                        k += 1;
                        continue;
                    }
                };
                if let Some(reason) = reason {
                    out.events.push(Event::GradientDropped { worker, step, reason, since_open, time });
                }
                let (_, buf) = held.swap_remove(k);
                self.spare.push(buf);
            }
        }
        out.events.push(Event::StepApplied {
            step: self.step,
            contributors: commit.contributors.clone(),
            duration: since_open,
            lr: commit.lr,
            grad_norm: crate::clip::global_norm(&self.sum, scale),
            loss: None,
            time,
        });
        self.step = next;
        self.opened_at = now;
        out.actions.push(Action::BroadcastParams { step: self.step });
        Ok(out)
    }
}

/// Worker `w`'s slice computed on the parameters of `step`, if held.
fn slice_of(held: &[Vec<(Step, Vec<f32>)>], w: WorkerId, step: Step) -> Option<&[f32]> {
    held.get(w.index())?.iter().find(|(s, _)| *s == step).map(|(_, g)| g.as_slice())
}

/// Whether a run with this configuration can be split over `shards` servers. The sync,
/// deadline and async policies (with or without backups, late notices, a staleness bound)
/// can; the adaptive policy and global-norm clipping need every shard's figures at each
/// update and are not built for more than one shard yet.
pub fn check_shardable(cfg: &ServerConfig, shards: u32) -> Result<(), ConfigError> {
    if shards <= 1 {
        return Ok(());
    }
    let refuse = |what: &str| {
        Err(ConfigError::invalid(format!(
            "{what} is not supported with {shards} shards yet (every shard would need the others' figures at each \
             update); run it on one server (shards = 1), or use the sync, deadline or async policy without clip_norm"
        )))
    };
    match cfg.policy {
        Policy::Adaptive { .. } => refuse("the adaptive policy"),
        _ if cfg.clip_norm.is_some() => refuse("clip_norm"),
        Policy::Sync { .. } | Policy::Deadline { .. } | Policy::Async { .. } => Ok(()),
    }
}
