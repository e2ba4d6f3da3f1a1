//! The discrete-event driver: runs the core's server and worker state machines against a
//! virtual clock.

use crate::config::{EvalOn, SimConfig};
use crate::network::ServerLink;
use crate::queue::EventQueue;
use crate::report::{MetricRow, SimReport, Summary};
use quorum_compute::delay::DelaySampler;
use quorum_compute::{BatchId, GradientSource};
use quorum_core::{Action, Commit, ConfigError, Event, ParamLayout, Step, ToServer, Worker, WorkerAction, WorkerId};
use quorum_record::{quantile, RunRecord};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sharded::Rule;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

mod faults;
mod sharded;

/// Why a simulation could not run.
#[derive(Debug, Error)]
pub enum SimError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The delay model could not be prepared (e.g. a missing replay file).
    #[error("delay model: {0}")]
    Delay(#[from] quorum_compute::DelayError),
    /// The gradient source failed.
    #[error("gradient computation failed: {0}")]
    Compute(#[from] quorum_compute::ComputeError),
    /// The core rejected a simulated message: a bug in the simulator, never expected.
    #[error("protocol violation inside the simulator (a bug): {0}")]
    Protocol(#[from] quorum_core::ProtocolError),
    /// Nothing more can happen, yet the server has neither finished nor stopped: a real
    /// cluster would wait forever here.
    #[error("the cluster would wait forever at {at:.3} virtual seconds (step {step}): nothing is left to happen and the server has not stopped; set a stall timeout")]
    Hang {
        /// Virtual seconds.
        at: f64,
        /// The server's step.
        step: Step,
    },
    /// Two shards applied different contributors at some step: the one-quorum invariant
    /// broken (a bug in the core or the simulator, never expected).
    #[error("the shards disagree at step {step}: {why} (shard {shard}; a bug, never expected)")]
    ShardsDisagree {
        /// The first shard found to disagree with the coordinator.
        shard: u32,
        /// The first step they differ at.
        step: Step,
        /// What each applied.
        why: String,
    },
    /// Virtual time stopped: too many events at one instant.
    #[error("virtual time stopped at {at:.3} s: {events} events at the same instant (a wake-up re-scheduled at \"now\" forever)")]
    Stuck {
        /// Virtual seconds.
        at: f64,
        /// Events seen at that instant.
        events: u64,
    },
}

/// What the loop does after an event: go on, skip the end-of-event checks, or end the run.
enum Flow {
    Next,
    Skip,
    End,
}

/// Events at one virtual instant past which the clock is taken to have stopped.
const EVENTS_AT_ONE_INSTANT: u64 = 10_000_000;

/// `life`: the worker process an event is for (its incarnation); a crash ends a life, and
/// what was on the way to it is lost.
enum SimEvent {
    /// `session`: the sending process's, checked as the networked server checks it.
    ToServer {
        from: WorkerId,
        session: u64,
        msg: ToServer,
    },
    /// `transfer`: the seconds the message took (the worker's pull, in `workers.csv`).
    Params {
        to: WorkerId,
        life: u32,
        step: Step,
        params: Arc<Vec<f32>>,
        transfer: f64,
    },
    ComputeDone {
        worker: WorkerId,
        life: u32,
        step: Step,
        seconds: f64,
    },
    Tick,
    Fault(usize),
    Restart(WorkerId),
    Thaw(WorkerId),
    Beat {
        worker: WorkerId,
        life: u32,
    },
    /// Sharded: a worker's gradient, of which shard `shard` takes its slice.
    Slice {
        shard: u32,
        from: WorkerId,
        life: u32,
        step: Step,
        grad: Arc<Vec<f32>>,
        loss: Option<f32>,
    },
    /// Sharded: shard `shard` holds `from`'s slice of `step` (to the coordinator).
    Report {
        shard: u32,
        from: WorkerId,
        step: Step,
        loss: Option<f32>,
    },
    /// Sharded: the coordinator's commit reaches shard `shard`.
    CommitAt {
        shard: u32,
        commit: Commit,
    },
    /// Sharded: shard `shard`'s part of the parameters of `step`, to a worker.
    ParamPart {
        to: WorkerId,
        life: u32,
        shard: u32,
        step: Step,
        params: Arc<Vec<f32>>,
        transfer: f64,
    },
}

impl SimEvent {
    /// Heartbeats and time-outs: events that by themselves move no training forward.
    fn is_quiet(&self) -> bool {
        matches!(self, SimEvent::Beat { .. } | SimEvent::Tick | SimEvent::ToServer { msg: ToServer::Heartbeat, .. })
    }
}

struct SimWorker {
    sm: Worker,
    /// Newest parameters received, and the seconds they took to arrive.
    latest: Option<(Step, Arc<Vec<f32>>, f64)>,
    /// Parameters of the computation in progress, and the seconds they took to arrive.
    computing_on: Option<(Arc<Vec<f32>>, f64)>,
    /// Seconds the last finished computation took.
    computed_seconds: f64,
    rng: ChaCha8Rng,
    draws: u64,
    /// Its process: bumped by each crash.
    life: u32,
    /// Dead (crashed, not restarted yet).
    down: bool,
    /// Its process has joined (a restarted one waits for its join to be accepted).
    joined: bool,
    /// Frozen until then.
    frozen_until: Duration,
    /// Its link is this much slower until then.
    slow: Option<(f64, Duration)>,
    /// It computes this much slower until then.
    lag: Option<(f64, Duration)>,
}

impl SimWorker {
    fn session(&self, id: WorkerId) -> u64 {
        (u64::from(self.life) << 32) | u64::from(id.0)
    }
}

struct Engine<'a> {
    cfg: &'a SimConfig,
    source: Option<&'a mut (dyn GradientSource + 'a)>,
    rule: Rule,
    workers: Vec<SimWorker>,
    queue: EventQueue<SimEvent>,
    delay: DelaySampler,
    tick_at: Option<Duration>,
    /// Parameters published for the current step, shared by every message that carries them.
    published: Option<(Step, Arc<Vec<f32>>)>,
    bytes: usize,
    report: SimReport,
    /// The run record, the same as the networked server keeps.
    record: RunRecord,
    grad: Vec<f32>,
    done: bool,
    /// An evaluation due at this step (and the metrics row it fills), waiting for every
    /// shard to have applied it.
    pending_eval: Option<(u64, usize)>,
    /// The servers' links: parameters out, gradients in.
    down: ServerLink,
    up: ServerLink,
    /// The network's own random stream (jitter).
    net_rng: ChaCha8Rng,
}

/// Which way a message crosses the servers' links.
#[derive(Clone, Copy)]
enum Direction {
    /// Parameters to a worker.
    Down,
    /// A gradient to the server.
    Up,
}

fn at(now: Duration, seconds: f64) -> Duration {
    now + Duration::from_secs_f64(seconds.max(0.0))
}

/// Runs one simulation. `source = None` is a timing-only run: no gradient math, messages
/// charged as `virtual_params` parameters.
pub fn simulate<'a>(
    cfg: &'a SimConfig,
    source: Option<&'a mut (dyn GradientSource + 'a)>,
) -> Result<SimReport, SimError> {
    cfg.validate()?;
    let (layout, init, batch) = match &source {
        Some(s) => (s.layout().clone(), s.init_params(cfg.seed), s.batch_size() as u64),
        None => (ParamLayout::new(), Vec::new(), 0),
    };
    let bytes = 4 * if source.is_some() { layout.len() } else { cfg.virtual_params };
    let mut server_cfg = cfg.server.clone();
    server_cfg.max_steps = Some(cfg.steps);
    let rule = Rule::new(server_cfg, cfg.network.shards, cfg.server.workers, layout, init)?;
    let workers = (0..cfg.server.workers)
        .map(|i| {
            let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
            rng.set_stream(i as u64 + 1);
            SimWorker {
                sm: Worker::new(WorkerId(i), cfg.on_newer, cfg.server.policy.late_notices()),
                latest: None,
                computing_on: None,
                rng,
                draws: 0,
                computed_seconds: 0.0,
                life: 0,
                down: false,
                joined: true,
                frozen_until: Duration::ZERO,
                slow: None,
                lag: None,
            }
        })
        .collect();
    let summary = Summary {
        steps: 0,
        virtual_seconds: 0.0,
        mean_step_seconds: 0.0,
        p50_step_seconds: 0.0,
        p99_step_seconds: 0.0,
        dropped: 0,
        accepted: 0,
        policy: cfg.server.policy.name().to_string(),
        workers: cfg.server.workers,
        backups: cfg.server.policy.backups(),
        mean_staleness: 0.0,
        examples: 0,
        final_train_loss: None,
        final_test_loss: None,
        final_test_accuracy: None,
        diverged: false,
        target_step: None,
        target_seconds: None,
        target_examples: None,
        validation_accuracy: None,
        delay: cfg.delay.to_string(),
        seed: cfg.seed,
        shards: None,
    };
    let mut engine = Engine {
        cfg,
        source,
        rule,
        workers,
        queue: EventQueue::default(),
        delay: cfg.delay.sampler()?,
        tick_at: None,
        published: None,
        bytes,
        report: SimReport {
            summary,
            events: Vec::new(),
            arrivals: Vec::new(),
            metrics: Vec::new(),
            workers: Vec::new(),
            step_seconds: Vec::new(),
            final_params: Vec::new(),
            final_eval_params: Vec::new(),
        },
        record: RunRecord::new(cfg.server.workers, batch, cfg.record_arrivals),
        grad: Vec::new(),
        done: false,
        pending_eval: None,
        down: ServerLink::default(),
        up: ServerLink::default(),
        net_rng: {
            let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
            rng.set_stream(u64::MAX);
            rng
        },
    };
    engine.run()?;
    engine.finish()
}

impl Engine<'_> {
    fn run(&mut self) -> Result<(), SimError> {
        let first = self.cfg.network.delay(0);
        let spread = self.cfg.join_ramp / f64::from(self.cfg.server.workers.saturating_sub(1).max(1));
        for i in 0..self.cfg.server.workers {
            let join_at = at(Duration::ZERO, first + spread * f64::from(i));
            self.queue.push(
                join_at,
                SimEvent::ToServer {
                    from: WorkerId(i),
                    session: u64::from(i),
                    msg: ToServer::Join { session: u64::from(i) },
                },
            );
            if let Some(beat) = self.beat_every() {
                self.queue.push(join_at + beat, SimEvent::Beat { worker: WorkerId(i), life: 0 });
            }
        }
        for (i, f) in self.cfg.faults.iter().enumerate() {
            self.queue.push(at(Duration::ZERO, f.at), SimEvent::Fault(i));
        }
        let mut instant = (Duration::ZERO, 0u64);
        let liveness = &self.cfg.server.liveness;
        let quiet_limit = liveness.worker_timeout.unwrap_or_default()
            + liveness.stall_timeout.unwrap_or_default()
            + Duration::from_secs(60);
        let mut last_news = Duration::ZERO;
        while let Some((now, ev)) = self.queue.pop() {
            if !ev.is_quiet() {
                last_news = now;
            }
            if instant.0 == now {
                instant.1 += 1;
                if instant.1 > EVENTS_AT_ONE_INSTANT {
                    return Err(SimError::Stuck { at: now.as_secs_f64(), events: instant.1 });
                }
            } else {
                instant = (now, 1);
            }
            // A frozen worker handles nothing until it thaws.
            let frozen = |w: WorkerId, workers: &[SimWorker]| workers[w.index()].frozen_until > now;
            match ev {
                SimEvent::Params { to, .. }
                | SimEvent::ParamPart { to, .. }
                | SimEvent::ComputeDone { worker: to, .. }
                    if frozen(to, &self.workers) =>
                {
                    let until = self.workers[to.index()].frozen_until;
                    self.queue.push(until, ev);
                }
                SimEvent::Fault(i) => self.inject(now, i),
                SimEvent::Restart(id) => self.restart(now, id),
                SimEvent::Thaw(id) => self.thaw(now, id),
                SimEvent::Beat { worker, life } => self.beat(now, worker, life),
                SimEvent::ToServer { from, session, msg } => match self.on_to_server(now, from, session, msg)? {
                    Flow::Next => {}
                    Flow::Skip => continue,
                    Flow::End => break,
                },
                SimEvent::Params { to, life, step, params, transfer } => {
                    let w = &mut self.workers[to.index()];
                    if w.life != life || w.down || !w.joined {
                        continue;
                    }
                    w.latest = Some((step, params, transfer));
                    let acts = w.sm.on_params(step);
                    self.worker_actions(now, to, acts)?;
                }
                SimEvent::ComputeDone { worker, life, step, seconds } => {
                    let w = &mut self.workers[worker.index()];
                    if w.life != life || w.down {
                        continue;
                    }
                    if w.sm.computing() == Some(step) {
                        w.computed_seconds = seconds;
                    }
                    let acts = w.sm.on_computed(step);
                    self.worker_actions(now, worker, acts)?;
                }
                SimEvent::Tick => {
                    if self.tick_at.is_some_and(|t| t <= now) {
                        self.tick_at = None;
                    }
                    let out = self.rule.tick(now);
                    self.carry_out(now, out)?;
                }
                SimEvent::Slice { shard, from, life, step, grad, loss } => {
                    match self.on_slice(now, shard, from, life, step, &grad, loss)? {
                        Flow::End => break,
                        Flow::Next | Flow::Skip => {}
                    }
                }
                SimEvent::Report { shard, from, step, loss } => self.on_report(now, shard, from, step, loss)?,
                SimEvent::CommitAt { shard, commit } => self.on_commit_at(now, shard, &commit)?,
                SimEvent::ParamPart { to, life, shard, step, params, transfer } => {
                    let w = &self.workers[to.index()];
                    if w.life != life || w.down || !w.joined {
                        continue;
                    }
                    self.on_part(now, to, shard, step, params, transfer)?;
                }
            }
            if self.done {
                break;
            }
            // Nothing but heartbeats and time-outs for longer than any time-out could take to
            // end the run, and nothing else to come: a real server would wait forever. (The
            // scan of the queue runs only once the cheap tests say so.)
            if !self.cfg.faults.is_empty()
                && now > last_news + quiet_limit
                && !self.rule.is_stopped()
                && self.queue.all(SimEvent::is_quiet)
            {
                return Err(SimError::Hang { at: now.as_secs_f64(), step: self.rule.step() });
            }
            if let Some(t) = self.rule.next_wakeup() {
                if self.tick_at.is_none_or(|s| t < s) {
                    self.tick_at = Some(t.max(now));
                    self.queue.push(t.max(now), SimEvent::Tick);
                }
            }
        }
        // The coordinator's last commits may still be on their way to the other shards: they
        // arrive (every shard ends on the same step), and the last evaluation runs.
        while let Some((now, ev)) = self.queue.pop() {
            if let SimEvent::CommitAt { shard, commit } = ev {
                self.on_commit_at(now, shard, &commit)?;
            }
        }
        Ok(())
    }

    /// A message reaches the server.
    fn on_to_server(&mut self, now: Duration, from: WorkerId, session: u64, msg: ToServer) -> Result<Flow, SimError> {
        let (is_join, is_beat) = (matches!(msg, ToServer::Join { .. }), matches!(msg, ToServer::Heartbeat));
        let handled = self.rule.handle_from(now, from, session, msg);
        if is_join && handled.is_ok() && self.workers[from.index()].session(from) == session {
            self.workers[from.index()].joined = true;
        }
        let out = match handled {
            // A heartbeat sent before the join arrived says nothing.
            Err(quorum_core::ProtocolError::NotJoined { .. }) if is_beat => return Ok(Flow::Skip),
            // Under faults the server refuses what a real one would (a restarted
            // worker whose old session still looks alive, a message of a dead
            // life): recorded, and a refused join is tried again.
            Err(e) if !self.cfg.faults.is_empty() && !matches!(e, quorum_core::ProtocolError::NonFinite { .. }) => {
                let rejected = Event::Rejected { worker: from, reason: e.to_string(), time: now.as_secs_f64() };
                self.record.observe(&rejected);
                if self.cfg.record_events {
                    self.report.events.push(rejected);
                }
                if is_join && !self.workers[from.index()].down {
                    let session = self.workers[from.index()].session(from);
                    let retry = self.beat_every().unwrap_or(Duration::from_millis(500));
                    self.queue.push(now + retry, SimEvent::ToServer { from, session, msg: ToServer::Join { session } });
                }
                return Ok(Flow::Skip);
            }
            // A diverged model sends non-finite gradients, which the server's own
            // validation refuses; when divergence is watched for, that ends the run.
            Err(quorum_core::ProtocolError::NonFinite { .. }) if self.cfg.divergence_loss.is_some() => {
                self.report.summary.diverged = true;
                return Ok(Flow::End);
            }
            other => other?,
        };
        self.carry_out(now, out)?;
        Ok(Flow::Next)
    }

    fn params_of(&mut self, step: Step) -> Arc<Vec<f32>> {
        match &self.published {
            Some((s, p)) if *s == step => p.clone(),
            _ => {
                let p = Arc::new(self.rule.params());
                self.published = Some((step, p.clone()));
                p
            }
        }
    }

    fn send_params(&mut self, now: Duration, to: WorkerId, step: Step) {
        let params = self.params_of(step);
        let transfer = self.server_delay(now, to, self.bytes, Direction::Down);
        let life = self.workers[to.index()].life;
        self.queue.push(at(now, transfer), SimEvent::Params { to, life, step, params, transfer });
    }

    /// A parameter or gradient message between `w` and the servers: it crosses `w`'s link and
    /// the servers' links (where it may queue behind others) at once; it has arrived when the
    /// slower of the two is through.
    fn server_delay(&mut self, now: Duration, w: WorkerId, bytes: usize, dir: Direction) -> f64 {
        let own = self.link_delay(now, w, bytes);
        let busy = self.cfg.network.server_seconds(bytes);
        if busy <= 0.0 {
            return own + self.jitter();
        }
        let link = match dir {
            Direction::Down => &mut self.down,
            Direction::Up => &mut self.up,
        };
        let t = now.as_secs_f64();
        own.max(link.through(t, busy, self.cfg.network.latency)) + self.jitter()
    }

    /// A message's extra delay on the way to or from a server (none without jitter).
    fn jitter(&mut self) -> f64 {
        let mean = self.cfg.network.jitter;
        if mean <= 0.0 {
            return 0.0;
        }
        // Exponential with this mean, by inversion.
        -mean * (1.0 - rand::Rng::random::<f64>(&mut self.net_rng)).ln()
    }

    /// A message's delay on `w`'s link: the network's, times a slow link's factor.
    fn link_delay(&self, now: Duration, w: WorkerId, bytes: usize) -> f64 {
        let base = self.cfg.network.delay(bytes);
        match self.workers[w.index()].slow {
            Some((factor, until)) if until > now => base * factor,
            _ => base,
        }
    }

    /// A small message from a worker (join, heartbeat).
    fn send_to_server(&mut self, now: Duration, from: WorkerId, msg: ToServer) {
        let arrive = at(now, self.link_delay(now, from, 0));
        let session = self.workers[from.index()].session(from);
        self.queue.push(arrive, SimEvent::ToServer { from, session, msg });
    }

    fn carry_out(&mut self, now: Duration, out: quorum_core::Outputs) -> Result<(), SimError> {
        let sharded = matches!(self.rule, Rule::Sharded(_));
        if sharded {
            self.sharded_actions(now, &out);
        }
        for e in out.events {
            self.observe(now, &e)?;
            if self.cfg.record_events {
                self.report.events.push(e);
            }
        }
        for a in out.actions {
            match a {
                // Sharded: each shard sends its own part (`sharded_actions`, and on each commit).
                Action::SendParams { .. } | Action::BroadcastParams { .. } if sharded => {}
                Action::SendParams { to, step } => self.send_params(now, to, step),
                Action::BroadcastParams { step } => {
                    for w in self.rule.live_workers() {
                        self.send_params(now, w, step);
                    }
                }
                // `max_steps` reached, or a stall stopped the run.
                Action::Stop { .. } => self.done = true,
            }
        }
        Ok(())
    }

    /// Feeds the run record; on an update, the metrics row (with an evaluation when due) and
    /// the stop conditions (divergence, the target reached).
    fn observe(&mut self, now: Duration, e: &Event) -> Result<(), SimError> {
        let Some(done_steps) = self.record.observe(e) else { return Ok(()) };
        let loss = self.record.updates.last().and_then(|u| u.loss);
        let row = MetricRow {
            step: done_steps,
            virtual_seconds: now.as_secs_f64(),
            examples: self.record.examples,
            train_loss: loss,
            test_loss: None,
            test_accuracy: None,
        };
        if let Some(l) = loss {
            if quorum_core::diverged(l, self.cfg.divergence_loss) {
                self.report.summary.diverged = true;
                self.done = true;
            }
        }
        let due = self.cfg.eval_every.is_some_and(|k| done_steps % k == 0) || done_steps == self.cfg.steps;
        if self.source.is_some() {
            self.report.metrics.push(row);
            if due {
                self.pending_eval = Some((done_steps, self.report.metrics.len() - 1));
                self.evaluate_when_whole()?;
            }
        }
        Ok(())
    }

    /// Runs the evaluation due, once the whole model has the parameters of its step (at once
    /// on one server; sharded, once the last shard has applied the step).
    fn evaluate_when_whole(&mut self) -> Result<(), SimError> {
        let Some((done_steps, row)) = self.pending_eval else { return Ok(()) };
        if !self.rule.whole_at(done_steps) {
            return Ok(());
        }
        self.pending_eval = None;
        let params: Vec<f32> = match (self.cfg.eval_on, self.rule.ema()) {
            (EvalOn::Ema, Some(e)) => e,
            _ => self.rule.params(),
        };
        let Some(src) = self.source.as_mut() else { return Ok(()) };
        let ev = src.evaluate(&params)?;
        let row = &mut self.report.metrics[row];
        row.test_loss = Some(ev.loss);
        row.test_accuracy = ev.accuracy;
        let (seconds, examples) = (row.virtual_seconds, row.examples);
        let reached = self.cfg.target.is_some_and(|t| ev.accuracy.is_some_and(|a| a >= t));
        let s = &mut self.report.summary;
        if reached && s.target_step.is_none() {
            s.target_step = Some(done_steps);
            s.target_seconds = Some(seconds);
            s.target_examples = Some(examples);
            self.done |= self.cfg.stop_at_target;
        }
        Ok(())
    }

    fn worker_actions(&mut self, now: Duration, id: WorkerId, acts: Vec<WorkerAction>) -> Result<(), SimError> {
        for a in acts {
            match a {
                WorkerAction::Compute { step } => {
                    let w = &mut self.workers[id.index()];
                    w.computing_on = w.latest.as_ref().map(|(_, p, transfer)| (p.clone(), *transfer));
                    let mut seconds = self.delay.sample(id.0, w.draws, &mut w.rng);
                    w.draws += 1;
                    if let Some((factor, _)) = w.lag.filter(|&(_, until)| until > now) {
                        seconds *= factor;
                    }
                    let life = w.life;
                    self.queue.push(at(now, seconds), SimEvent::ComputeDone { worker: id, life, step, seconds });
                }
                WorkerAction::Cancel { .. } | WorkerAction::Discard { .. } => self.record.abandoned(id),
                // The server sends new parameters to every live worker when a step closes:
                // the networked worker's long-poll pull, in virtual time.
                WorkerAction::AwaitParams { .. } => {}
                // A late notice: the step and the worker, no values (so no gradient math).
                WorkerAction::NotifyLate { step } if matches!(self.rule, Rule::Sharded(_)) => {
                    // Every shard would answer "late": the step has closed (the worker has newer
                    // parameters), and shard 0's record says so.
                    self.record_push(id);
                    self.record_drop(now, id, step, quorum_core::DropReason::Late);
                }
                WorkerAction::NotifyLate { step } => {
                    self.record_push(id);
                    let session = self.workers[id.index()].session(id);
                    let arrive = at(now, self.link_delay(now, id, 0));
                    self.queue.push(
                        arrive,
                        SimEvent::ToServer {
                            from: id,
                            session,
                            msg: ToServer::Push { step, gradient: Vec::new(), loss: None },
                        },
                    );
                }
                WorkerAction::Push { step } => {
                    self.record_push(id);
                    let w = &self.workers[id.index()];
                    let (gradient, loss) = match self.source.as_mut() {
                        Some(src) => {
                            let (params, _) = w.computing_on.as_ref().expect("a computation has parameters");
                            let loss = src.gradient(params, BatchId { worker: id, step }, &mut self.grad)?;
                            (self.grad.clone(), Some(loss))
                        }
                        None => (Vec::new(), None),
                    };
                    // Divergence is judged where the server judges it (`quorum_core::diverged`):
                    // the applied step's loss, and non-finite gradients refused on arrival.
                    if matches!(self.rule, Rule::Sharded(_)) {
                        self.push_slices(now, id, step, Arc::new(gradient), loss);
                        continue;
                    }
                    let session = self.workers[id.index()].session(id);
                    let arrive = at(now, self.server_delay(now, id, self.bytes, Direction::Up));
                    self.queue.push(
                        arrive,
                        SimEvent::ToServer { from: id, session, msg: ToServer::Push { step, gradient, loss } },
                    );
                }
            }
        }
        Ok(())
    }

    /// A push (or late notice) leaves `id`: its timing goes to the record, as a networked
    /// push's does.
    fn record_push(&mut self, id: WorkerId) {
        let w = &self.workers[id.index()];
        let transfer = w.computing_on.as_ref().map_or(0.0, |(_, t)| *t);
        self.record.pushed(id, w.computed_seconds, transfer);
    }

    fn finish(mut self) -> Result<SimReport, SimError> {
        self.report.summary.shards = self.rule.check_one_quorum()?;
        let record = std::mem::replace(&mut self.record, RunRecord::new(0, 0, false));
        let s = &mut self.report.summary;
        s.steps = self.rule.step();
        s.virtual_seconds = record.last_step_at;
        s.accepted = record.accepted;
        s.dropped = record.dropped;
        s.examples = record.examples;
        s.mean_staleness = record.mean_staleness();
        let n = record.step_seconds.len().max(1) as f64;
        s.mean_step_seconds = record.step_seconds.iter().sum::<f64>() / n;
        s.p50_step_seconds = quantile(&record.step_seconds, 0.5);
        s.p99_step_seconds = quantile(&record.step_seconds, 0.99);
        let losses: Vec<f32> = self.report.metrics.iter().filter_map(|m| m.train_loss).collect();
        let tail = (losses.len() / 10).max(1).min(losses.len());
        if tail > 0 {
            s.final_train_loss = Some(losses[losses.len() - tail..].iter().sum::<f32>() / tail as f32);
        }
        if let Some(m) = self.report.metrics.iter().rev().find(|m| m.test_loss.is_some()) {
            s.final_test_loss = m.test_loss;
            s.final_test_accuracy = m.test_accuracy;
        }
        self.report.final_params = self.rule.params();
        self.report.final_eval_params = match (self.cfg.eval_on, self.rule.ema()) {
            (EvalOn::Ema, Some(e)) => e,
            _ => self.report.final_params.clone(),
        };
        self.report.step_seconds = record.step_seconds;
        self.report.arrivals = record.arrivals;
        self.report.workers = record.workers;
        Ok(self.report)
    }
}
