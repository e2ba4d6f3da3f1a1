//! What the loop drives: the one server of an unsharded run, or one shard of a sharded run
//! (shard 0 with the coordinator that decides every step's contributors for all shards).
//!
//! Both offer the driver the same inputs (a worker's message, a pushed gradient, time) and
//! answer with the core's [`Outputs`], so recording, publishing and stopping stay the
//! driver's, whatever the run's shape.

use crate::proto::{CommitNotice, ShardReport};
use quorum_core::{
    Action, Commit, Coordinator, DropReason, Event, Outputs, ProtocolError, Server, ServerSnapshot, Shard,
    SliceOutcome, Step, ToServer, WorkerId,
};
use std::time::Duration;
use tokio::sync::mpsc;

/// A follower shard's stream of commits, as the Follow RPC sends it.
pub(super) type CommitStream = mpsc::UnboundedSender<Result<CommitNotice, tonic::Status>>;

/// The state machine(s) one server process runs.
pub(super) enum Rule {
    /// An unsharded run: the whole model, the step rule.
    One(Box<Server>),
    /// One shard of a sharded run.
    Shard(Box<Sharded>),
}

/// A shard, and its part in the one quorum.
pub(super) struct Sharded {
    pub(super) shard: Shard,
    pub(super) role: Role,
}

/// Where a shard's slices are counted.
pub(super) enum Role {
    /// Shard 0: the coordinator runs here; the other shards follow it.
    Coordinator { coordinator: Box<Coordinator>, followers: Vec<Option<CommitStream>> },
    /// Another shard: it reports slices over its link and applies what the coordinator commits.
    Follower {
        link: mpsc::UnboundedSender<ShardReport>,
        /// The session the coordinator took as each worker (joins and pushes must come from it).
        sessions: Vec<Option<u64>>,
        /// The worker time-out (what a refused join is told to wait for).
        timeout: Duration,
        stopped: bool,
    },
}

/// The notice that the coordinator took session `session` as worker `w`.
fn session_notice(w: WorkerId, session: u64) -> CommitNotice {
    CommitNotice { session_only: true, worker: w.0, session, ..Default::default() }
}

/// The notice a commit travels to followers as.
pub(super) fn notice(c: &Commit) -> CommitNotice {
    CommitNotice {
        step: c.step,
        contributors: c.contributors.iter().map(|w| w.0).collect(),
        lr: c.lr,
        staleness: c.staleness,
        ..Default::default()
    }
}

impl Rule {
    pub(super) fn handle_from(
        &mut self,
        now: Duration,
        from: WorkerId,
        session: u64,
        msg: ToServer,
    ) -> Result<Outputs, ProtocolError> {
        let s = match self {
            Rule::One(server) => return server.handle_from(now, from, session, msg),
            Rule::Shard(s) => s,
        };
        match &mut s.role {
            Role::Coordinator { coordinator, followers } => {
                let joined = matches!(msg, ToServer::Join { .. });
                let out = coordinator.handle(now, from, session, msg)?;
                // The followers serve as `from` only the process the coordinator took.
                if joined {
                    let n = session_notice(from, session);
                    followers.iter().flatten().for_each(|f| drop(f.send(Ok(n.clone()))));
                }
                s.coordinated(now, out)
            }
            Role::Follower { sessions, stopped, timeout, .. } => {
                if *stopped {
                    return Err(ProtocolError::Stopped);
                }
                let workers = sessions.len() as u32;
                let held =
                    sessions.get_mut(from.index()).ok_or(ProtocolError::UnknownWorker { worker: from, workers })?;
                let mut out = Outputs::default();
                match msg {
                    // The coordinator (shard 0) keeps the worker's liveness and refuses a second
                    // live process; a follower serves only the process the coordinator took
                    // (a join it has not heard of yet is told to wait and join again).
                    ToServer::Join { session } if *held == Some(session) => {
                        out.actions.push(Action::SendParams { to: from, step: s.shard.step() });
                    }
                    ToServer::Join { .. } if held.is_none() => {
                        return Err(ProtocolError::NotConfirmed { worker: from })
                    }
                    ToServer::Join { .. } => return Err(ProtocolError::IndexInUse { worker: from, timeout: *timeout }),
                    ToServer::Push { .. } => return Err(ProtocolError::MisroutedPush { worker: from }),
                    ToServer::Heartbeat | ToServer::Leave => {}
                }
                Ok(out)
            }
        }
    }

    pub(super) fn check_session(&self, w: WorkerId, session: u64) -> Result<(), ProtocolError> {
        match self {
            Rule::One(server) => server.check_session(w, session),
            Rule::Shard(s) => match &s.role {
                Role::Coordinator { coordinator, .. } => coordinator.check_session(w, session),
                Role::Follower { sessions, .. } => match sessions.get(w.index()) {
                    None => Err(ProtocolError::UnknownWorker { worker: w, workers: sessions.len() as u32 }),
                    Some(None) => Err(ProtocolError::NotJoined { worker: w }),
                    Some(Some(s)) if *s != session => Err(ProtocolError::WrongSession { worker: w }),
                    Some(Some(_)) => Ok(()),
                },
            },
        }
    }

    /// A pushed gradient: the whole of it (one server), or this shard's slice.
    pub(super) fn push(
        &mut self,
        now: Duration,
        from: WorkerId,
        step: Step,
        gradient: &[f32],
        loss: Option<f32>,
    ) -> Result<Outputs, ProtocolError> {
        let s = match self {
            Rule::One(server) => return server.push(now, from, step, gradient, loss),
            Rule::Shard(s) => s,
        };
        if s.is_stopped() {
            return Err(ProtocolError::Stopped);
        }
        let time = now.as_secs_f64();
        let mut out = Outputs::default();
        match s.shard.on_slice(from, step, gradient)? {
            SliceOutcome::Late => {
                let since_open = f64::NAN;
                out.events.push(Event::GradientDropped {
                    worker: from,
                    step,
                    reason: DropReason::Late,
                    since_open,
                    time,
                });
            }
            SliceOutcome::TooStale { staleness } => {
                let reason = DropReason::TooStale { staleness };
                out.events.push(Event::GradientDropped { worker: from, step, reason, since_open: f64::NAN, time });
            }
            SliceOutcome::AlreadyHeld => out.events.push(Event::GradientRepeated { worker: from, step, time }),
            SliceOutcome::Held => {
                let index = s.shard.index();
                match &mut s.role {
                    Role::Coordinator { coordinator, .. } => {
                        let c = coordinator.slice_held(now, index, from, step, loss)?;
                        out = s.coordinated(now, c)?;
                    }
                    Role::Follower { link, .. } => {
                        let report = ShardReport {
                            shard: index,
                            step,
                            worker: from.0,
                            loss: loss.unwrap_or(f32::NAN),
                            ..Default::default()
                        };
                        // A closed link is noticed by the link task, which stops the run.
                        let _ = link.send(report);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Time passed. An `Err` is a commit this shard could not apply: the run cannot go on.
    pub(super) fn tick(&mut self, now: Duration) -> Result<Outputs, ProtocolError> {
        match self {
            Rule::One(server) => Ok(server.tick(now)),
            Rule::Shard(s) => match &mut s.role {
                Role::Coordinator { coordinator, .. } => {
                    let out = coordinator.tick(now);
                    s.coordinated(now, out)
                }
                Role::Follower { .. } => Ok(Outputs::default()),
            },
        }
    }

    pub(super) fn next_wakeup(&self) -> Option<Duration> {
        match self {
            Rule::One(server) => server.next_wakeup(),
            Rule::Shard(s) => match &s.role {
                Role::Coordinator { coordinator, .. } => coordinator.next_wakeup(),
                Role::Follower { .. } => None,
            },
        }
    }

    /// Workers this server waits to hear "stop" (a follower waits for none: workers hear it
    /// from shard 0).
    pub(super) fn live_workers(&self) -> Vec<WorkerId> {
        match self {
            Rule::One(server) => server.live_workers(),
            Rule::Shard(s) => match &s.role {
                Role::Coordinator { coordinator, .. } => coordinator.live_workers(),
                Role::Follower { .. } => Vec::new(),
            },
        }
    }

    /// The parameters this server holds (a shard: its range).
    pub(super) fn params(&self) -> &[f32] {
        match self {
            Rule::One(server) => server.params(),
            Rule::Shard(s) => s.shard.params(),
        }
    }

    pub(super) fn ema(&self) -> Option<&[f32]> {
        match self {
            Rule::One(server) => server.ema(),
            Rule::Shard(s) => s.shard.ema(),
        }
    }

    pub(super) fn step(&self) -> Step {
        match self {
            Rule::One(server) => server.step(),
            Rule::Shard(s) => s.shard.step(),
        }
    }

    pub(super) fn is_stopped(&self) -> bool {
        match self {
            Rule::One(server) => server.is_stopped(),
            Rule::Shard(s) => s.is_stopped(),
        }
    }

    pub(super) fn snapshot(&self) -> ServerSnapshot {
        match self {
            Rule::One(server) => server.snapshot(),
            Rule::Shard(s) => {
                let mut snap = s.shard.snapshot();
                if let Role::Coordinator { coordinator, .. } = &s.role {
                    snap.aggregate = coordinator.aggregate();
                }
                snap
            }
        }
    }

    /// Whether this is a shard other than 0 (evaluations are reported to shard 0, not here).
    pub(super) fn is_follower(&self) -> bool {
        matches!(self, Rule::Shard(s) if matches!(s.role, Role::Follower { .. }))
    }

    /// Whether this process holds the whole model (an evaluation or a checkpoint of it
    /// means something).
    pub(super) fn whole_model(&self) -> bool {
        matches!(self, Rule::One(_))
    }

    /// The coordinator's side of a follower's report.
    pub(super) fn on_report(&mut self, now: Duration, r: &ShardReport) -> Result<Outputs, ProtocolError> {
        let Rule::Shard(s) = self else { return Err(ProtocolError::UnknownShard { shard: r.shard, shards: 1 }) };
        let Role::Coordinator { coordinator, .. } = &mut s.role else {
            return Err(ProtocolError::UnknownShard { shard: r.shard, shards: 1 });
        };
        let loss = (!r.loss.is_nan()).then_some(r.loss);
        let out = coordinator.slice_held(now, r.shard, WorkerId(r.worker), r.step, loss)?;
        s.coordinated(now, out)
    }

    /// A follower tells the coordinator the run diverged (`why`): the coordinator ends the run
    /// for every shard, so this shard does not stop on its own. `false` if this is not a
    /// follower.
    pub(super) fn report_divergence(&mut self, why: &str) -> bool {
        let Rule::Shard(s) = self else { return false };
        let Role::Follower { link, .. } = &s.role else { return false };
        let report = ShardReport { shard: s.shard.index(), diverged: why.to_string(), ..Default::default() };
        // A closed link is noticed by the link task, which stops the run.
        let _ = link.send(report);
        true
    }

    /// A follower hears which process the coordinator took as worker `w`.
    pub(super) fn on_session(&mut self, w: WorkerId, session: u64) {
        if let Rule::Shard(s) = self {
            if let Role::Follower { sessions, .. } = &mut s.role {
                if let Some(held) = sessions.get_mut(w.index()) {
                    *held = Some(session);
                }
            }
        }
    }

    /// A follower's side of a commit.
    pub(super) fn on_commit(&mut self, now: Duration, c: &Commit) -> Result<Outputs, ProtocolError> {
        let Rule::Shard(s) = self else { return Err(ProtocolError::UnknownShard { shard: 0, shards: 1 }) };
        s.shard.on_commit(now, c)
    }

    /// The coordinator takes a follower: its hello must match this shard's plan and step.
    pub(super) fn follow(
        &mut self,
        hello: &ShardReport,
        total: usize,
        ranges: &[std::ops::Range<usize>],
        stream: CommitStream,
    ) -> Result<(), String> {
        let Rule::Shard(s) = self else {
            return Err("this server is not sharded (it was started with shards = 1)".into());
        };
        let step = s.shard.step();
        let Role::Coordinator { followers, coordinator } = &mut s.role else {
            return Err("this server is not shard 0, the coordinator".into());
        };
        let k = hello.shard as usize;
        let expected = ranges.get(k).cloned();
        if hello.shards as usize != ranges.len() || k == 0 || expected.is_none() {
            return Err(format!(
                "shard {} of {} asked to follow, but this run has {} shards (shard 0 coordinates): start every \
                 shard with the same number of shards",
                hello.shard,
                hello.shards,
                ranges.len()
            ));
        }
        let expected = expected.unwrap_or_default();
        if (hello.start as usize, hello.end as usize, hello.total as usize) != (expected.start, expected.end, total) {
            return Err(format!(
                "shard {k} holds parameters {}..{} of {}, but the coordinator's plan gives it {expected:?} of {total}: \
                 start every shard with the same model and the same number of shards",
                hello.start, hello.end, hello.total
            ));
        }
        if hello.step != step {
            return Err(format!(
                "shard {k} is at step {} but the coordinator (shard 0) at step {step}: every shard must start from \
                 the same step; restart them all with --resume --resume-step S, S a step every shard has a \
                 checkpoint of",
                hello.step
            ));
        }
        if followers[k].as_ref().is_some_and(|f| !f.is_closed()) {
            return Err(format!("shard {k} already follows this coordinator"));
        }
        // The workers the coordinator took before this shard followed.
        for w in 0..coordinator.config().workers {
            if let Some(session) = coordinator.session(WorkerId(w)) {
                let _ = stream.send(Ok(session_notice(WorkerId(w), session)));
            }
        }
        followers[k] = Some(stream);
        Ok(())
    }

    /// Tells every follower the run stopped (after its last commit), and whether an evaluator
    /// will pull the final parameters.
    pub(super) fn stop_followers(&mut self, reason: Option<&str>, broken: bool, evaluator: bool) {
        if let Rule::Shard(s) = self {
            if let Role::Coordinator { followers, .. } = &mut s.role {
                let reason = reason.unwrap_or_default().into();
                let stop = CommitNotice { stop: true, reason, broken, evaluator, ..Default::default() };
                for f in followers.iter().flatten() {
                    let _ = f.send(Ok(stop.clone()));
                }
            }
            if let Role::Follower { stopped, .. } = &mut s.role {
                *stopped = true;
            }
        }
    }
}

impl Sharded {
    fn is_stopped(&self) -> bool {
        match &self.role {
            Role::Coordinator { coordinator, .. } => coordinator.is_stopped(),
            Role::Follower { stopped, .. } => *stopped,
        }
    }

    /// Carries out the coordinator's decisions on this shard: each commit is applied here
    /// and sent to every follower; what the driver publishes is this shard's parameters.
    /// The events are the coordinator's: the record of the whole model.
    fn coordinated(&mut self, now: Duration, out: Outputs) -> Result<Outputs, ProtocolError> {
        let Role::Coordinator { followers, .. } = &self.role else { return Ok(out) };
        let mut done = Outputs { actions: Vec::new(), events: out.events };
        for commit in Commit::from_events(&done.events) {
            for f in followers.iter().flatten() {
                let _ = f.send(Ok(notice(&commit)));
            }
            done.actions.extend(self.shard.on_commit(now, &commit)?.actions);
        }
        for a in out.actions {
            match a {
                Action::SendParams { to, .. } => done.actions.push(Action::SendParams { to, step: self.shard.step() }),
                Action::Stop { .. } => done.actions.push(a),
                // The shard's own broadcast (from its commit) stands for it.
                Action::BroadcastParams { .. } => {}
            }
        }
        Ok(done)
    }
}
