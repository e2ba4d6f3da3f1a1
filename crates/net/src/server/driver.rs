//! The loop's state, in raft-rs's `RawNode` shape: the loop in [`super::run_server`] only
//! selects on its inputs and hands each to [`Driver::on_command`], [`Driver::on_tick`] or
//! [`Driver::begin_stop`]; what the core decides goes through [`Driver::carry_out`]; every
//! way out goes through [`Driver::begin_stop`] and ends in [`Driver::finish`].

use super::checkpointer::Checkpointer;
use super::evaluator::Evaluator;
use super::record::Recorder;
use super::rule::{CommitStream, Rule};
use super::service::{slot_refused, Answer, Command, Published, Values};
use super::{NetError, Progress, ServerOptions, TrainSummary};
use quorum_core::server::StopReason;
use quorum_core::{Action, Commit, Event, Outputs, ProtocolError, WorkerId};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long a stopping server waits for its workers to hear "stop" before it exits.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// How long a stopping server that has heard from an evaluator waits for its evaluation of
/// the final step.
const FINAL_EVALUATION_GRACE: Duration = Duration::from_secs(120);

/// Why the run stops.
pub(super) enum StopCause {
    /// The shutdown future resolved (Ctrl-C, SIGTERM).
    Interrupted,
    /// The loss or a gradient left the finite range (the message says how).
    Diverged(String),
    /// The core stopped: the last step was applied, or too few workers are alive.
    Core(StopReason),
    /// A sharded run cannot go on (a shard's link to the coordinator broke, a commit could not
    /// be applied); the message says what.
    Failed(String),
    /// The coordinator of a sharded run stopped it (for the reason it gives, if any;
    /// `broken`: because a shard was lost).
    CoordinatorStopped { reason: String, broken: bool },
}

/// A run that is stopping: since when, and why (`None`: it finished).
struct Stopping {
    since: Instant,
    reason: Option<String>,
    diverged: bool,
    /// A sharded run lost a shard: this shard's state may be ahead of another's, so no final
    /// checkpoint (the newest one every shard wrote is where a resumed run starts).
    broken: bool,
}

/// Everything the loop owns: the core's state machine and what carries out its decisions.
pub(super) struct Driver {
    rule: Rule,
    opts: ServerOptions,
    start: Instant,
    start_step: u64,
    published: watch::Sender<Published>,
    rec: Recorder,
    checkpointer: Option<Checkpointer>,
    evaluator: Evaluator,
    stopping: Option<Stopping>,
    /// Workers that have heard "stop".
    acks: BTreeSet<WorkerId>,
    /// An evaluator process has reported: wait for its evaluation of the final step.
    evaluator_seen: bool,
    /// The newest step whose parameters the evaluator pulled (a follower shard waits for the
    /// final step's, not for a report: reports go to shard 0).
    evaluator_got: Option<u64>,
    /// Shared memory with the workers on this host: each step's parameters are written there.
    shm: Option<std::sync::Arc<crate::shm::SharedRegion>>,
}

impl Driver {
    /// `opts.evaluator` moves to the evaluation thread; `opts.checkpoint` starts the
    /// checkpoint thread.
    pub(super) fn new(
        rule: Rule,
        mut opts: ServerOptions,
        start: Instant,
        published: watch::Sender<Published>,
        shm: Option<std::sync::Arc<crate::shm::SharedRegion>>,
    ) -> Result<Self, NetError> {
        let start_step = rule.step();
        let resumed_at = (start_step > 0).then_some(start_step);
        let rec = Recorder::new(opts.out.clone(), opts.config.workers, opts.batch, resumed_at)?;
        // A shard's checkpoint holds its range, under a layout naming the shard and the split.
        let ckpt_layout = match &opts.shard {
            Some(s) => s.plan.layout_of(&opts.layout, s.index),
            None => opts.layout.clone(),
        };
        let checkpointer = opts
            .checkpoint
            .clone()
            .map(|c| Checkpointer::start(c, ckpt_layout, opts.config.clone(), opts.run_config.clone()));
        let evaluator = Evaluator::start(opts.evaluator.take());
        Ok(Driver {
            rule,
            opts,
            start,
            start_step,
            published,
            rec,
            checkpointer,
            evaluator,
            stopping: None,
            acks: BTreeSet::new(),
            evaluator_seen: false,
            evaluator_got: None,
            shm,
        })
    }

    /// Whether the run is stopping.
    pub(super) fn is_stopping(&self) -> bool {
        self.stopping.is_some()
    }

    /// A stopping run may exit once every live worker heard "stop", or after a grace period
    /// (so connected workers exit 0 rather than on a dead link).
    pub(super) fn may_exit(&self) -> bool {
        self.stopping.as_ref().is_some_and(|s| {
            if s.broken {
                return true;
            }
            let workers = self.acks.len() >= self.rule.live_workers().len() || s.since.elapsed() > STOP_GRACE;
            let evaluated = !self.evaluator_seen
                || self.rec.evals.contains_key(&self.rule.step())
                || (self.rule.is_follower() && self.evaluator_got.is_some_and(|s| s >= self.rule.step()))
                || s.since.elapsed() > FINAL_EVALUATION_GRACE;
            workers && evaluated
        })
    }

    /// When the loop should call [`Driver::on_tick`] if nothing else happens.
    pub(super) fn next_tick(&self) -> Instant {
        if self.is_stopping() {
            return Instant::now() + Duration::from_millis(100);
        }
        let wake = self.rule.next_wakeup().map(|d| self.start + d);
        wake.unwrap_or_else(|| Instant::now() + Duration::from_millis(200))
    }

    /// A command from the gRPC handlers: answered here; the core's outputs returned.
    pub(super) fn on_command(&mut self, cmd: Command) -> Result<Option<Outputs>, NetError> {
        let now = self.start.elapsed();
        let (worker, result, answer) = match cmd {
            Command::StopSeen(w) => {
                self.acks.insert(w);
                return Ok(None);
            }
            Command::EvaluatorPulled => {
                self.evaluator_seen = true;
                return Ok(None);
            }
            Command::EvaluatorGot(step) => {
                self.evaluator_got = self.evaluator_got.max(Some(step));
                return Ok(None);
            }
            Command::Evaluation { step, evaluation, reply } => {
                self.evaluator_seen = true;
                self.rec.evaluation(step, evaluation)?;
                let _ = reply.send(self.is_stopping());
                return Ok(None);
            }
            // Stopping: nothing more is applied, so the final checkpoint is the state at the stop.
            Command::Message { reply, .. } if self.is_stopping() => {
                Answer::Message(reply).send(Err(ProtocolError::Stopped));
                return Ok(None);
            }
            Command::Push { reply, gradient, .. } if self.is_stopping() => {
                Answer::Push(reply, gradient).send(Err(ProtocolError::Stopped));
                return Ok(None);
            }
            Command::Follow { hello, stream, reply } => {
                let _ = reply.send(self.follow(&hello, stream));
                return Ok(None);
            }
            Command::Report(r) if !r.diverged.is_empty() => {
                self.begin_stop(StopCause::Diverged(r.diverged));
                return Ok(None);
            }
            Command::Report(r) => {
                return match self.rule.on_report(now, &r) {
                    Ok(out) => Ok(Some(out)),
                    // A late report after the stop, or a worker the coordinator refuses: logged.
                    Err(ProtocolError::Stopped) => Ok(None),
                    Err(e) => {
                        self.rec.event(&Event::Rejected {
                            worker: WorkerId(r.worker),
                            reason: e.to_string(),
                            time: now.as_secs_f64(),
                        })?;
                        Ok(None)
                    }
                };
            }
            Command::Commit(n) => {
                if n.session_only {
                    self.rule.on_session(WorkerId(n.worker), n.session);
                    return Ok(None);
                }
                if n.stop {
                    // The evaluator may have pulled from shard 0 only so far: wait for its pull
                    // of this shard's final part too.
                    self.evaluator_seen |= n.evaluator;
                    self.begin_stop(StopCause::CoordinatorStopped { reason: n.reason, broken: n.broken });
                    return Ok(None);
                }
                let contributors = n.contributors.into_iter().map(WorkerId).collect();
                let commit = Commit { step: n.step, contributors, lr: n.lr, staleness: n.staleness };
                return match self.rule.on_commit(now, &commit) {
                    Ok(out) => Ok(Some(out)),
                    Err(e) => {
                        self.begin_stop(StopCause::Failed(e.to_string()));
                        Ok(None)
                    }
                };
            }
            Command::LinkLost(why) => {
                self.begin_stop(StopCause::Failed(why));
                return Ok(None);
            }
            Command::Message { worker, session, msg, reply } => {
                (worker, self.rule.handle_from(now, worker, session, msg), Answer::Message(reply))
            }
            Command::Push { worker, session, step, gradient, loss, timing, reply } => {
                let rule = &mut self.rule;
                let result = match (&gradient, rule.check_session(worker, session)) {
                    (_, Err(e)) => Err(e),
                    (Values::Buffer(g), Ok(())) => rule.push(now, worker, step, g, loss),
                    // Added up where the worker wrote it, held from being rewritten meanwhile.
                    (Values::Shared { seq }, Ok(())) => {
                        let region = self.shm.as_deref().expect("pushes through shared memory come with one");
                        match region.gradient(worker.0, step, *seq) {
                            Ok(read) => rule.push(now, worker, step, read.values(), loss),
                            Err(e) => {
                                let refused = slot_refused(worker, step, e);
                                let reason = refused.message().to_string();
                                let _ = reply.send((Err(refused), gradient));
                                self.rec.event(&Event::Rejected { worker, reason, time: now.as_secs_f64() })?;
                                return Ok(None);
                            }
                        }
                    }
                };
                if result.is_ok() {
                    self.rec.pushed(worker, timing);
                }
                (worker, result, Answer::Push(reply, gradient))
            }
        };
        match result {
            Ok(out) => {
                answer.send(Ok(out.events.clone()));
                Ok(Some(out))
            }
            Err(e) => {
                if matches!(e, ProtocolError::NonFinite { .. }) && self.opts.divergence_loss.is_some() {
                    let why = format!("training diverged ({e})");
                    // A follower leaves the stop to the coordinator, which ends the run for all.
                    if !self.rule.report_divergence(&why) {
                        self.begin_stop(StopCause::Diverged(why));
                    }
                }
                if e != ProtocolError::Stopped {
                    self.rec.event(&Event::Rejected { worker, reason: e.to_string(), time: now.as_secs_f64() })?;
                }
                answer.send(Err(e));
                Ok(None)
            }
        }
    }

    /// Time passed: the core's time-outs (a stopping run ticks nothing).
    pub(super) fn on_tick(&mut self) -> Option<Outputs> {
        if self.is_stopping() {
            return None;
        }
        match self.rule.tick(self.start.elapsed()) {
            Ok(out) => Some(out),
            Err(e) => {
                self.begin_stop(StopCause::Failed(e.to_string()));
                None
            }
        }
    }

    /// A shard asks to follow this coordinator.
    fn follow(&mut self, hello: &crate::proto::ShardReport, stream: CommitStream) -> Result<(), String> {
        let plan = self.opts.shard.as_ref().map(|s| s.plan.clone());
        let plan = plan.ok_or("this server is not sharded (it was started with shards = 1)")?;
        self.rule.follow(hello, plan.len(), plan.ranges(), stream)?;
        tracing::info!("shard {} follows the coordinator", hello.shard);
        Ok(())
    }

    /// Carries out what the core decided: records its events (with divergence, evaluation,
    /// checkpoints and the progress line on each update) and publishes parameters or stop.
    pub(super) fn carry_out(&mut self, out: Outputs) -> Result<(), NetError> {
        for e in &out.events {
            self.on_event(e)?;
        }
        for a in out.actions {
            match a {
                Action::SendParams { step, .. } | Action::BroadcastParams { step } => {
                    // Once stopping, "stop" stays published: nothing reopens the run.
                    if !self.is_stopping() && self.published.borrow().step != step {
                        let p = Published::new(step, self.rule.params(), self.opts.encoding, self.shm.as_deref());
                        self.published.send_replace(p);
                    }
                }
                Action::Stop { reason } => self.begin_stop(StopCause::Core(reason)),
            }
        }
        Ok(())
    }

    fn on_event(&mut self, e: &Event) -> Result<(), NetError> {
        if let Event::StepApplied { step, loss: Some(l), .. } = e {
            if quorum_core::diverged(*l, self.opts.divergence_loss) {
                let limit = self.opts.divergence_loss.unwrap_or(f32::INFINITY);
                self.begin_stop(StopCause::Diverged(format!(
                    "training diverged (mean loss {l} at step {step}, above {limit})"
                )));
            }
        }
        let Some(done) = self.rec.event(e)? else { return Ok(()) };
        let whole = self.rule.whole_model();
        if whole && self.opts.eval_every.is_some_and(|k| k > 0 && done.is_multiple_of(k)) {
            self.evaluator.request(done, self.rule.ema().unwrap_or(self.rule.params()));
        }
        if let Some(c) = self.checkpointer.as_mut() {
            if c.due(done) && !self.rule.is_stopped() {
                c.request(self.rule.snapshot());
                // The log reaches at least the checkpoint, so a resumed run can rebuild its
                // records from it even after SIGKILL.
                self.rec.flush_events()?;
            }
        }
        self.evaluator.drain_into(&mut self.rec)?;
        if let Some(cb) = self.opts.progress.as_mut() {
            let run = &self.rec.run;
            cb(&Progress {
                step: done,
                seconds: run.last_step_at,
                examples_per_second: run.examples as f64 / run.last_step_at.max(1e-9),
                loss: run.updates.last().and_then(|u| u.loss),
                accuracy: self.rec.evals.values().last().and_then(|e| e.accuracy),
                dropped: run.dropped,
                slowest: run.slowest(),
            });
        }
        Ok(())
    }

    /// Every way out: publishes "stop" (pulls answer it, pushes are refused) and remembers
    /// why. The first cause wins; stopping is final.
    pub(super) fn begin_stop(&mut self, cause: StopCause) {
        if self.is_stopping() {
            return;
        }
        let broken = matches!(cause, StopCause::Failed(_) | StopCause::CoordinatorStopped { broken: true, .. });
        let (reason, diverged) = match cause {
            StopCause::Interrupted => (Some("interrupted".to_string()), false),
            StopCause::Diverged(why) => (Some(why), true),
            StopCause::Core(StopReason::TooFewWorkers { live, needed, missing }) => {
                let names: Vec<String> = missing.iter().map(|w| w.to_string()).collect();
                let why = format!(
                    "only {live} of the {needed} workers a step needs are alive; missing: {}",
                    names.join(", ")
                );
                (Some(why), false)
            }
            StopCause::Core(_) => (None, false),
            StopCause::Failed(why) => (Some(why), false),
            StopCause::CoordinatorStopped { reason, .. } => ((!reason.is_empty()).then_some(reason), false),
        };
        self.rule.stop_followers(reason.as_deref(), broken, self.evaluator_seen);
        self.stopping = Some(Stopping { since: Instant::now(), reason, diverged, broken });
        if broken {
            // Workers are not told "stop": to them the server is gone, so they keep trying to
            // reconnect (within their connect time-out) and carry on once the shards resume.
            return;
        }
        let params = self.rule.ema().unwrap_or(self.rule.params());
        self.published.send_replace(Published::stopped(self.rule.step(), params, self.opts.encoding));
        if let Some(region) = &self.shm {
            // Every step is closed now: computations that can stop half-way stop.
            region.close_all();
        }
    }

    /// After the loop: the final checkpoint and evaluation, the run directory, the summary.
    pub(super) fn finish(self) -> Result<TrainSummary, NetError> {
        let Driver { rule, opts, start_step, mut rec, checkpointer, evaluator, stopping, .. } = self;
        let whole = rule.whole_model();
        let broken = stopping.as_ref().is_some_and(|s| s.broken);
        let checkpoint = checkpointer.filter(|_| !broken).map(|c| c.finish(rule.snapshot())).unwrap_or_default();
        let (stop_reason, diverged) = stopping.map_or((None, false), |s| (s.reason, s.diverged));
        let final_params = rule.ema().unwrap_or(rule.params());
        let validation = evaluator.finish(rule.step(), final_params, whole && !diverged, &mut rec)?;
        let last_eval = rec.evals.get(&rule.step()).copied();
        let cfg = &opts.config;
        let run = &rec.run;
        let run_steps = rule.step() - start_step;
        let summary = TrainSummary {
            steps: rule.step(),
            start_step,
            wall_seconds: run.last_step_at,
            steps_per_second: if run.last_step_at > 0.0 { run_steps as f64 / run.last_step_at } else { 0.0 },
            dropped: run.dropped,
            accepted: run.accepted,
            rejected: run.rejected,
            policy: cfg.policy.name().into(),
            workers: cfg.workers,
            backups: cfg.policy.backups(),
            final_test_accuracy: last_eval.and_then(|e| e.accuracy),
            final_test_loss: last_eval.map(|e| e.loss),
            stop_reason,
            diverged,
            final_validation_accuracy: validation.and_then(|e| e.accuracy),
            final_validation_loss: validation.map(|e| e.loss),
            checkpoint,
            started_unix: rec.started_unix,
            shard_params: (!whole).then(|| final_params.to_vec()),
        };
        rec.write_files(&summary)?;
        Ok(summary)
    }
}
