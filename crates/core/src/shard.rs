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
}

impl Commit {
    /// The commit a coordinator's [`Event::StepApplied`] stands for.
    pub fn from_event(e: &Event) -> Option<Commit> {
        match e {
            Event::StepApplied { step, contributors, lr, .. } => {
                Some(Commit { step: *step, contributors: contributors.clone(), lr: *lr })
            }
            _ => None,
        }
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
    /// Each worker's slice for the open step, if held.
    held: Vec<Option<Vec<f32>>>,
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
            held: vec![None; cfg.workers as usize],
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

    /// Takes worker `from`'s slice of a gradient computed on the parameters of `step`.
    /// [`SliceOutcome::Held`] means the coordinator must hear of it.
    pub fn on_slice(&mut self, from: WorkerId, step: Step, slice: &[f32]) -> Result<SliceOutcome, ProtocolError> {
        if from.index() >= self.held.len() {
            return Err(ProtocolError::UnknownWorker { worker: from, workers: self.workers });
        }
        if step < self.step {
            return Ok(SliceOutcome::Late);
        }
        if step > self.step {
            return Err(ProtocolError::FutureStep { worker: from, step, current: self.step });
        }
        if self.held[from.index()].is_some() {
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
        self.held[from.index()] = Some(buf);
        Ok(SliceOutcome::Held)
    }

    /// Applies the coordinator's commit: the mean of exactly `commit.contributors`' slices,
    /// with the optimizer and EMA, and opens the next step. Every contributor's slice must be
    /// held (the coordinator commits only workers every shard reported whole); an `Err`
    /// leaves the shard as it was.
    pub fn on_commit(&mut self, now: Duration, commit: &Commit) -> Result<Outputs, ProtocolError> {
        let bad = |why: String| ProtocolError::BadCommit { shard: self.index, step: commit.step, why };
        if commit.step != self.step {
            return Err(bad(format!("this shard is at step {}", self.step)));
        }
        if commit.contributors.is_empty() {
            return Err(bad("it names no contributor".into()));
        }
        let missing: Vec<String> = commit
            .contributors
            .iter()
            .filter(|w| self.held.get(w.index()).is_none_or(|h| h.is_none()))
            .map(|w| w.to_string())
            .collect();
        if !missing.is_empty() {
            return Err(bad(format!("this shard holds no slice from {}", missing.join(", "))));
        }
        let mut seen = vec![false; self.held.len()];
        if commit.contributors.iter().any(|w| std::mem::replace(&mut seen[w.index()], true)) {
            return Err(bad("it names a worker twice".into()));
        }
        // Summed in the commit's (sorted) order: the same sum on every run, whatever the
        // arrival order was.
        for (i, w) in commit.contributors.iter().enumerate() {
            let g = self.held[w.index()].as_deref().unwrap_or_default();
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
        for (i, h) in self.held.iter_mut().enumerate() {
            let Some(buf) = h.take() else { continue };
            let worker = WorkerId(i as u32);
            if !seen[i] {
                let reason = DropReason::Late;
                out.events.push(Event::GradientDropped { worker, step: self.step, reason, since_open, time });
            }
            self.spare.push(buf);
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
        self.step += 1;
        self.opened_at = now;
        out.actions.push(Action::BroadcastParams { step: self.step });
        Ok(out)
    }
}

/// Whether a run with this configuration can be split over `shards` servers. The sync and
/// deadline policies (with or without backups and late notices) can; the async and adaptive
/// policies and global-norm clipping need every shard's figures at each update and are not
/// built for more than one shard yet.
pub fn check_shardable(cfg: &ServerConfig, shards: u32) -> Result<(), ConfigError> {
    if shards <= 1 {
        return Ok(());
    }
    let refuse = |what: &str| {
        Err(ConfigError::invalid(format!(
            "{what} is not supported with {shards} shards yet (every shard would need the others' figures at each \
             update); run it on one server (shards = 1), or use the sync or deadline policy without clip_norm"
        )))
    };
    match cfg.policy {
        Policy::Async { .. } => refuse("the async policy"),
        Policy::Adaptive { .. } => refuse("the adaptive policy"),
        Policy::Sync { .. } | Policy::Deadline { .. } if cfg.clip_norm.is_some() => refuse("clip_norm"),
        Policy::Sync { .. } | Policy::Deadline { .. } => Ok(()),
    }
}
