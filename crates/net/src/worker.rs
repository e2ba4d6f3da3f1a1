//! A worker: join, then forever pull the newest parameters (on the server's host: await them
//! in its shared memory), compute a gradient, push it. If the server goes away (a restart), it
//! reconnects with backoff and joins again.

use crate::encoding::{Assembler, Encoding};
use crate::proto::*;
use bytes::Bytes;
use quorum_compute::DelaySampler;
use quorum_compute::GradientSource;
use quorum_core::{OnNewerParams, Worker, WorkerAction, WorkerId};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::time::{Duration, Instant};

mod link;

use link::PullTask;
pub(crate) use link::{connect, connect_to, lost_or_refused, within, Channel_, Client, SessionEnd};

/// How a worker runs.
#[derive(Clone)]
pub struct WorkerOptions {
    /// Its index, `0..workers`.
    pub index: u32,
    /// The server, e.g. `http://127.0.0.1:7070`; in a sharded run shard 0 (the coordinator).
    pub server: String,
    /// A sharded run: the other shards' addresses, shard 1 onward, in order (empty: the run
    /// has one server). The worker pulls from and pushes to every shard at once.
    pub shards: Vec<String>,
    /// Give up (re)connecting after this long.
    pub connect_timeout: Duration,
    /// Send a heartbeat this often while computing, so a long gradient is not mistaken for
    /// death (at most; a server that asks for more often, in its join reply, gets that).
    pub heartbeat_every: Duration,
    /// The longest wait for an answer to a join, heartbeat or push (and for a pull's answer
    /// once the server has said the step is open); a server silent for this long is taken
    /// for lost (frozen, or cut off): the worker says so, reconnects and joins again.
    pub rpc_timeout: Duration,
    /// Injected straggling: extra seconds slept before each gradient.
    pub delay: Option<DelaySampler>,
    /// Seed of the delay stream.
    pub seed: u64,
    /// Join token sent with every RPC.
    pub token: Option<crate::auth::Token>,
    /// TLS files: `ca` to trust the server, `cert` + `key` to present for mutual TLS. With
    /// any of them the worker speaks TLS (an `http://` address is upgraded to `https://`).
    pub tls: crate::tls::TlsFiles,
    /// The HTTP/2 flow-control windows (default: sized to the link).
    pub window: crate::framing::Window,
    /// Use the server's shared memory for parameters and gradients when the server offers it
    /// and this worker can open it (it runs on the server's host): [`crate::shm`].
    pub shared_memory: bool,
    /// Stop a gradient half-way once its step has closed without it, where the worker hears
    /// of the closing as it happens (the server's shared memory says its newest step; without
    /// it, the answer to a pull of the next step made as the computation starts: one server,
    /// not shards) and the model can stop (the built-in native models, within layers): the
    /// CPU goes to the next step instead of a gradient the server would drop. Off: every
    /// computation runs to the end, as in the paper. Only where the server allows it
    /// ([`quorum_core::Policy::abandon`]).
    pub abandon: bool,
}

impl WorkerOptions {
    /// Defaults: 60 s to connect, a heartbeat every 2 s, no injected delay.
    pub fn new(index: u32, server: impl Into<String>) -> Self {
        WorkerOptions {
            index,
            server: server.into(),
            shards: Vec::new(),
            connect_timeout: Duration::from_secs(60),
            heartbeat_every: Duration::from_secs(2),
            rpc_timeout: Duration::from_secs(30),
            delay: None,
            seed: 1,
            token: None,
            tls: crate::tls::TlsFiles::default(),
            window: crate::framing::Window::default(),
            shared_memory: true,
            abandon: true,
        }
    }
}

/// What a worker did.
#[derive(Debug, Clone, Default)]
pub struct WorkerReport {
    /// Gradients pushed.
    pub sent: u64,
    /// Gradients the server used (one server; a sharded run counts `held` instead).
    pub accepted: u64,
    /// A sharded run: gradients every shard took for the open step. Whether the step then
    /// counted them is the coordinator's to say (its `events.jsonl`): a worker's gradient
    /// whole on every shard after N others were is dropped there as late.
    pub held: u64,
    /// Gradients dropped (late or too stale).
    pub dropped: u64,
    /// Late gradients reported without their values: the worker knew the step had closed.
    pub unsent_late: u64,
    /// Computations stopped half-way because their step closed without them ([`WorkerOptions::abandon`]).
    pub abandoned: u64,
    /// Computations on parameters read where the server wrote them in shared memory, not
    /// copied (a worker that abandons overtaken work).
    pub params_in_place: u64,
    /// Gradients whose values went through the server's shared memory, not over gRPC (a
    /// worker on the server's host).
    pub shm_pushes: u64,
    /// Steps this worker awaited in the server's shared memory instead of pulling them (a
    /// worker on the server's host: every step after a session's first).
    pub awaited: u64,
    /// Seconds spent computing gradients (excluding injected delay).
    pub compute_seconds: f64,
    /// Times it reconnected after losing the server.
    pub reconnects: u32,
}

/// A worker failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The server could not be reached in time.
    #[error("cannot reach the parameter server at {addr} after {secs:.0} s ({last}); is it running, and is the address right?")]
    Unreachable {
        /// Where it tried.
        addr: String,
        /// How long.
        secs: f64,
        /// The last error.
        last: String,
    },
    /// The server refused a request.
    #[error("the parameter server refused worker {worker}: {message}")]
    Refused {
        /// This worker.
        worker: u32,
        /// The server's message.
        message: String,
    },
    /// A TLS file could not be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The gradient code panicked.
    #[error("worker {worker}: the gradient code panicked ({message}); the server was told this worker left")]
    Panicked {
        /// This worker.
        worker: u32,
        /// The panic's message.
        message: String,
    },
    /// The gradient computation failed.
    #[error("worker {worker}: {source}")]
    Compute {
        /// This worker.
        worker: u32,
        /// What failed.
        source: quorum_compute::ComputeError,
    },
}

/// A session id for this process: random, so no other process can guess it.
fn new_session() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::process::id()) | 1
}

/// Runs one worker until the server says stop.
pub async fn run_worker(
    opts: WorkerOptions,
    source: Box<dyn GradientSource + Send>,
) -> Result<WorkerReport, WorkerError> {
    let mut report = WorkerReport::default();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    rng.set_stream(opts.index as u64 + 1);
    let mut source = Some(source);
    let mut draws = 0;
    let session_id = new_session();
    // Since when connections open but never get as far as a join (bounded by connect_timeout).
    let mut failing_since: Option<Instant> = None;
    loop {
        let (mut client, mut channel) = connect(&opts).await?;
        let local = Local { source: &mut source, rng: &mut rng, draws: &mut draws, report: &mut report };
        let ended = session(&opts, session_id, &mut client, &mut channel, local).await;
        let ended = match ended {
            Err(e @ (WorkerError::Panicked { .. } | WorkerError::Compute { .. })) => {
                // Tell the server now, so no step waits for this worker's time-out.
                let why = match &e {
                    WorkerError::Panicked { message, .. } => format!("the gradient code panicked: {message}"),
                    other => format!("the gradient code failed: {other}"),
                };
                let leave = LeaveRequest { worker: opts.index, session: session_id, reason: why };
                let _ = within(opts.rpc_timeout, "leave", client.leave(leave)).await;
                return Err(e);
            }
            other => other?,
        };
        match ended {
            SessionEnd::Stopped => return Ok(report),
            SessionEnd::Lost { why, joined: true } => {
                failing_since = None;
                report.reconnects += 1;
                tracing::warn!("worker {}: lost the parameter server ({why}); reconnecting", opts.index);
            }
            // Waiting for a live process to give up this index, within the connect time-out.
            SessionEnd::IndexHeld { why } => {
                if failing_since.is_none() {
                    tracing::warn!("worker {}: {why}; waiting", opts.index);
                }
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= opts.connect_timeout {
                    return Err(WorkerError::Refused { worker: opts.index, message: why });
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            SessionEnd::Lost { why, joined: false } => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= opts.connect_timeout {
                    return Err(WorkerError::Unreachable {
                        addr: opts.server.clone(),
                        secs: since.elapsed().as_secs_f64(),
                        last: format!(
                            "connected, but every join failed: {why}; if the server uses TLS, check this \
                                 worker's tls-ca (and tls-cert/tls-key when it requires client certificates)"
                        ),
                    });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Why a session's step loop left: a session end, or a failure of the worker itself.
enum Exit {
    End(SessionEnd),
    Fail(WorkerError),
}

impl From<WorkerError> for Exit {
    fn from(e: WorkerError) -> Self {
        Exit::Fail(e)
    }
}

impl From<Result<SessionEnd, WorkerError>> for Exit {
    fn from(r: Result<SessionEnd, WorkerError>) -> Self {
        r.map_or_else(Exit::Fail, Exit::End)
    }
}

/// An RPC's answer, or out of the step loop: a lost link or a refusal.
macro_rules! rpc {
    ($w:expr, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(s) => return Err(Exit::from(lost_or_refused($w, s))),
        }
    };
}

// After the macro, which they use.
mod compute;
mod shards;
use compute::{Computed, Ended, Gradient, Next, Params};
use shards::{join_others, ShardLink};

/// The worker's own state across sessions: its gradient code, the straggling it injects,
/// and what it reports.
struct Local<'a> {
    source: &'a mut Option<Box<dyn GradientSource + Send>>,
    rng: &'a mut ChaCha8Rng,
    draws: &'a mut u64,
    report: &'a mut WorkerReport,
}

/// Parameters pulled for a step.
struct Pulled {
    step: u64,
    params: Params,
    /// Seconds from the first chunk to the last (waiting for the step to open is not transfer).
    seconds: f64,
}

/// One joined session with the server: the links, what the join said, and the worker rule
/// ([`quorum_core::Worker`], the same rule the simulator's workers follow).
struct Session<'a> {
    opts: &'a WorkerOptions,
    id: u64,
    client: Client,
    /// A second handle on the same connection, for heartbeats while a pull is in flight.
    beat: Client,
    channel: Channel_,
    enc: Encoding,
    heartbeat_every: Duration,
    num_params: usize,
    rule: Worker,
    /// The next step's pull, asked for as soon as the rule says the worker waits for it (before
    /// the gradient is pushed), so the server streams the parameters the moment the step closes.
    pending: Option<PullTask>,
    /// The parameters' buffer, reused from step to step.
    params_buffer: Vec<f32>,
    /// Gradient buffers, handed back once pushed and reused.
    grads: crate::encoding::Recycled,
    /// The parameters this server (shard 0 of a sharded run) holds: all unless sharded.
    range: std::ops::Range<usize>,
    /// A sharded run: the other shards, 1 onward.
    others: Vec<ShardLink>,
    /// A sharded run: each shard's part of the parameters as pulled, reused.
    parts: Vec<Vec<f32>>,
    /// The server's shared memory, when this worker is on its host ([`crate::shm`]).
    shm: Option<std::sync::Arc<crate::shm::SharedRegion>>,
}

/// What the worker does with a computation its step's closing overtakes: stop it half-way
/// where it hears of the closing as it happens (the shared memory's newest step on the
/// server's host; elsewhere the answer to a pull of the next step, asked for as the
/// computation starts: one server, not shards) and the model can stop, if allowed and if a
/// step can close without it; else finish it and send it (as a late notice where the server
/// takes them).
fn on_newer(
    opts: &WorkerOptions,
    join: &JoinReply,
    one_server: bool,
    source: &Option<Box<dyn GradientSource + Send>>,
) -> OnNewerParams {
    let stoppable = source.as_ref().is_some_and(|s| s.can_abandon());
    match opts.abandon && join.abandon && one_server && stoppable {
        true => OnNewerParams::Abandon,
        false => OnNewerParams::FinishAndSend,
    }
}

/// What this worker joins with: its index, session and model layout.
fn join_request(opts: &WorkerOptions, session: u64, source: &Option<Box<dyn GradientSource + Send>>) -> JoinRequest {
    let layout = source.as_ref().expect("source present between computations").layout();
    let num_params = layout.len() as u64;
    let layout = layout
        .tensors()
        .iter()
        .map(|t| TensorShape { name: t.name.clone(), shape: t.shape.iter().map(|&d| d as u64).collect() })
        .collect();
    JoinRequest { worker: opts.index, num_params, session, layout }
}

async fn session(
    opts: &WorkerOptions,
    session_id: u64,
    client: &mut Client,
    channel: &mut Channel_,
    local: Local<'_>,
) -> Result<SessionEnd, WorkerError> {
    let w = opts.index;
    let join_request = join_request(opts, session_id, local.source);
    let num_params = join_request.num_params as usize;
    let join = match within(opts.rpc_timeout, "join", client.join(join_request.clone())).await {
        Ok(r) => r.into_inner(),
        // Not joined: wait (within the connect time-out) for the index to be free.
        Err(s) if s.code() == tonic::Code::AlreadyExists => {
            return Ok(SessionEnd::IndexHeld { why: s.message().to_string() })
        }
        Err(s) => {
            return lost_or_refused(w, s).map(|end| match end {
                SessionEnd::Lost { why, .. } => SessionEnd::Lost { why, joined: false },
                other => other,
            })
        }
    };
    if join.stop {
        return Ok(SessionEnd::Stopped);
    }
    let others = match join_others(opts, &join, &join_request).await {
        Ok(o) => o,
        Err(Exit::End(end)) => return Ok(end),
        Err(Exit::Fail(e)) => return Err(e),
    };
    let range = if others.is_empty() { 0..num_params } else { join.start as usize..join.end as usize };
    let shm = shared_memory(opts, &join, others.is_empty(), num_params);
    let mut s = Session {
        opts,
        id: session_id,
        client: client.clone(),
        beat: client.clone(),
        channel: channel.clone(),
        enc: Encoding::from_flag(join.bf16),
        // The server's interval wins when it is shorter: it declares workers gone by its own clock.
        heartbeat_every: match join.heartbeat_ms {
            0 => opts.heartbeat_every,
            ms => opts.heartbeat_every.min(Duration::from_millis(ms)),
        },
        num_params,
        rule: Worker::new(WorkerId(w), on_newer(opts, &join, others.is_empty(), local.source), join.late_notices),
        pending: None,
        params_buffer: Vec::new(),
        grads: Default::default(),
        parts: vec![Vec::new(); others.len() + 1],
        range,
        others,
        shm,
    };
    match s.steps(join.step, local).await {
        Ok(never) => match never {},
        Err(Exit::End(end)) => Ok(end),
        Err(Exit::Fail(e)) => Err(e),
    }
}

/// The server's shared memory, if it offers one this worker can use: one server (not
/// sharded), `f32` values, and a file this worker can open that holds the join's nonce (on
/// another host there is no such file: gRPC alone, said once at debug level).
fn shared_memory(
    opts: &WorkerOptions,
    join: &JoinReply,
    one_server: bool,
    len: usize,
) -> Option<std::sync::Arc<crate::shm::SharedRegion>> {
    if !opts.shared_memory || !one_server || join.shm_path.is_empty() || join.bf16 {
        return None;
    }
    match crate::shm::SharedRegion::open(&join.shm_path, join.shm_nonce, len, opts.index) {
        Ok(r) => {
            tracing::debug!("worker {}: parameters and gradients through shared memory", opts.index);
            Some(std::sync::Arc::new(r))
        }
        Err(e) => {
            tracing::debug!("worker {}: no shared memory with the server ({e}): gRPC alone", opts.index);
            None
        }
    }
}

impl Session<'_> {
    /// Asks for the parameters of `min_step` or later (through shared memory where there is one).
    fn start_pull(&self, min_step: u64) -> PullTask {
        PullTask::start(&self.channel, self.opts.index, min_step, self.shm.is_some())
    }

    /// Keeps a buffer of parameters for the next pull.
    fn keep(&mut self, params: Params) {
        if let Params::Owned(buffer) = params {
            self.params_buffer = buffer;
        }
    }

    fn heartbeat_request(&self) -> HeartbeatRequest {
        HeartbeatRequest { worker: self.opts.index, session: self.id }
    }

    /// Pull, compute, report, for ever: the rule says what follows each input.
    async fn steps(&mut self, first: u64, mut local: Local<'_>) -> Result<std::convert::Infallible, Exit> {
        let mut min_step = first;
        // The session's first parameters come from a pull; after that, a worker on the
        // server's host awaits each step in the shared memory, unless it could not be had
        // from there (then one pull, again).
        let mut pull = true;
        loop {
            let next = match pull || self.shm.is_none() {
                true => {
                    let pulled = self.pull(min_step).await?;
                    min_step = pulled.step + 1;
                    if !self.rule.on_params(pulled.step).contains(&WorkerAction::Compute { step: pulled.step }) {
                        // Not newer than what it computed on (a server restored from an older
                        // checkpoint): wait for newer ones.
                        self.keep(pulled.params);
                        continue;
                    }
                    Next::Pulled(pulled)
                }
                false => Next::Awaited { min_step },
            };
            pull = false;
            let done = match self.compute(next, &mut local).await? {
                Ended::Computed(done) => done,
                // Stopped half-way, its step closed: on to the newer parameters (the rule
                // cancels the old computation once they are here).
                Ended::Abandoned { step } => {
                    min_step = step + 1;
                    continue;
                }
                Ended::PullInstead => {
                    pull = true;
                    continue;
                }
            };
            min_step = done.step + 1;
            // Has the step closed while this gradient was computed? Worth asking only where a
            // step can close without this worker: the server's shared memory says its newest
            // step (one atomic read; "stop" reads as a step later than any); else the next
            // step's pull, where the computation asked for it as it started, says whether it
            // is answered (a step after this one published, or "stop"); else a heartbeat's
            // reply does (a few bytes against a gradient's megabytes).
            if self.rule.late_notices() {
                let told = self.pending.as_ref().filter(|p| p.min_step == done.step + 1).and_then(|p| p.answered());
                match (self.shm.as_ref(), told) {
                    (Some(region), _) => {
                        if let Some(newest) = region.newest() {
                            self.rule.on_news(newest);
                        }
                    }
                    (None, Some(true)) => self.rule.on_news(done.step + 1),
                    (None, Some(false)) => {}
                    (None, None) => {
                        let beat = self.heartbeat_request();
                        if let Ok(r) = within(self.opts.rpc_timeout, "heartbeat", self.client.heartbeat(beat)).await {
                            if r.get_ref().stop {
                                return Err(Exit::End(SessionEnd::Stopped));
                            }
                            self.rule.on_news(r.get_ref().step);
                        }
                    }
                }
            }
            let step = done.step;
            let mut done = Some(done);
            for action in self.rule.on_computed(step) {
                match action {
                    WorkerAction::AwaitParams { after } => {
                        min_step = after + 1;
                        // (Already asked for where the computation watched for its step's close;
                        // awaited in the shared memory where there is one.)
                        if self.shm.is_none() && self.pending.as_ref().is_none_or(|p| p.min_step != min_step) {
                            self.pending = Some(self.start_pull(min_step));
                        }
                    }
                    WorkerAction::Push { .. } | WorkerAction::NotifyLate { .. } => {
                        let notice = matches!(action, WorkerAction::NotifyLate { .. });
                        let done = done.take().expect("the rule reports a computation once");
                        self.push(done, local.report, notice).await?
                    }
                    WorkerAction::Discard { .. } => {}
                    // A networked worker fetches parameters only between computations, so it
                    // never holds newer ones to switch to mid-computation.
                    WorkerAction::Compute { .. } | WorkerAction::Cancel { .. } => {
                        unreachable!("a networked worker holds no parameters newer than those it computed on")
                    }
                }
            }
        }
    }

    /// Pulls the newest parameters (at least `min_step`). The pull waits until the step
    /// opens, which takes as long as the slowest of the N gradients (or the stall timeout):
    /// heartbeat meanwhile, so waiting is not taken for death.
    async fn pull(&mut self, min_step: u64) -> Result<Pulled, Exit> {
        let t_pull = Instant::now();
        let first = match self.pending.take() {
            Some(p) => p,
            None => self.start_pull(min_step),
        };
        if !self.others.is_empty() {
            return self.pull_shards(first, t_pull).await;
        }
        let buffer = std::mem::take(&mut self.params_buffer);
        let (step, params, first_chunk) = self.read_pull(first, self.num_params, buffer).await?;
        let seconds = first_chunk.map_or(t_pull.elapsed(), |t| t.elapsed()).as_secs_f64();
        Ok(Pulled { step, params, seconds })
    }

    /// Reads one pull's answer into `buffer` (`len` values), heartbeating while the step
    /// has not opened; the step, the values and when the first chunk came. Through shared
    /// memory, a worker that abandons overtaken work reads the values where they lie.
    async fn read_pull(
        &mut self,
        mut pull: PullTask,
        len: usize,
        mut buffer: Vec<f32>,
    ) -> Result<(u64, Params, Option<Instant>), Exit> {
        let w = self.opts.index;
        let beat = self.heartbeat_request();
        let (mut replies, first) = loop {
            let (replies, first) = loop {
                tokio::select! {
                    r = &mut pull.task => {
                        let r = r.unwrap_or_else(|e| Err(tonic::Status::unknown(format!("pull task failed: {e}"))));
                        break rpc!(w, r);
                    }
                    _ = tokio::time::sleep(self.heartbeat_every) => {
                        // A silent server (frozen, cut off) ends the session; a refusal too.
                        rpc!(w, within(self.opts.rpc_timeout, "heartbeat", self.beat.heartbeat(beat)).await);
                    }
                }
            };
            let shared = match &first {
                Ok(Some((c, _))) if c.shm && !c.stop => Some((c.step, c.shm_nonce)),
                _ => None,
            };
            let Some((step, nonce)) = shared else { break (replies, first) };
            let at = Instant::now();
            // (Another nonce: a restarted server's file, which this session has not opened.)
            if let Some(region) = self.shm.as_ref().filter(|r| r.nonce() == nonce) {
                if self.rule.abandons() {
                    if let Ok(view) = region.view_params(step) {
                        self.params_buffer = buffer;
                        return Ok((step, Params::Shared(view), Some(at)));
                    }
                } else if region.read_params(step, &mut buffer).is_ok() {
                    return Ok((step, Params::Owned(buffer), Some(at)));
                }
            }
            // Rewritten while read (the server went several steps on meanwhile): ask again,
            // over gRPC.
            pull = PullTask::start(&self.channel, w, step, false);
        };
        let mut asm = Assembler::with_buffer(buffer);
        let mut step = None;
        let mut first_chunk = None;
        let mut next = rpc!(w, first);
        let malformed = |e| WorkerError::Refused { worker: w, message: format!("malformed parameters: {e}") };
        while let Some((c, data)) = next {
            first_chunk.get_or_insert_with(Instant::now);
            if c.stop {
                return Err(Exit::End(SessionEnd::Stopped));
            }
            step = Some(c.step);
            let parts: Vec<&[u8]> = data.parts().collect();
            asm.push_parts(c.offset, c.total, &parts, Encoding::from_flag(c.bf16), len).map_err(malformed)?;
            next =
                rpc!(w, within(self.opts.rpc_timeout, "pull", replies.next_chunk(crate::framing::PARAMS_DATA)).await);
        }
        let Some(step) = step else {
            return Err(Exit::End(SessionEnd::Lost { why: "empty parameter stream".into(), joined: true }));
        };
        let params = asm.finish().map_err(malformed)?;
        Ok((step, Params::Owned(params), first_chunk))
    }

    /// The first chunk of a push of `done` (its fields; `total`: the whole gradient).
    fn head(&self, done: &Computed) -> GradientChunk {
        GradientChunk {
            worker: self.opts.index,
            step: done.step,
            offset: 0,
            total: done.grad.len() as u64,
            data: Default::default(),
            loss: done.loss,
            bf16: self.enc == Encoding::Bf16,
            compute_seconds: done.seconds,
            pull_seconds: done.pull_seconds,
            session: self.id,
            shm: false,
            shm_seq: 0,
            abandoned: false,
        }
    }

    /// A push that got no answer: the server may have ended the run and gone while it was on
    /// the way, having told this worker "stop" through its shared memory or the next step's
    /// pull; else a lost link (or a refusal).
    async fn push_failed(&mut self, s: tonic::Status) -> Exit {
        if self.shm.as_ref().is_some_and(|r| r.is_closed()) {
            return Exit::End(SessionEnd::Stopped);
        }
        if let Some(p) = self.pending.take() {
            if p.said_stop().await {
                return Exit::End(SessionEnd::Stopped);
            }
        }
        Exit::from(lost_or_refused(self.opts.index, s))
    }

    /// Sends the gradient, or with `notice` a late notice (no values; if the server does not
    /// answer "late", e.g. a restarted server that reopened the step, the gradient in full).
    async fn push(&mut self, done: Computed, report: &mut WorkerReport, notice: bool) -> Result<(), Exit> {
        if !self.others.is_empty() {
            return self.push_shards(done, report, notice).await;
        }
        let head = self.head(&done);
        report.sent += 1;
        let mut reply = None;
        if notice {
            let frames = crate::framing::push_frames(&GradientChunk { total: 0, ..head.clone() }, vec![Bytes::new()]);
            match within(self.opts.rpc_timeout, "push", crate::framing::push(&mut self.channel, frames)).await {
                Ok(r) if r.outcome() == PushOutcome::Late || r.stop => {
                    report.unsent_late += u64::from(r.outcome() == PushOutcome::Late);
                    reply = Some(r);
                }
                // Anything else: send the gradient in full below.
                _ => {}
            }
        }
        let pushed = match reply {
            Some(r) => Ok(r),
            None => {
                let frames = match done.grad {
                    // The values are in this worker's slot; the push names the write.
                    Gradient::Shared(write) => {
                        report.shm_pushes += 1;
                        let head = GradientChunk { shm: true, shm_seq: write.finish(done.step), ..head };
                        crate::framing::push_frames(&head, vec![Bytes::new()])
                    }
                    Gradient::Buffer(grad) => {
                        crate::framing::push_frames(&head, self.enc.encode_chunks_recycled(grad, Some(&self.grads)))
                    }
                };
                within(self.opts.rpc_timeout, "push", crate::framing::push(&mut self.channel, frames)).await
            }
        };
        match pushed {
            Ok(reply) => tally(&reply, report),
            Err(s) => Err(self.push_failed(s).await),
        }
    }
}

/// Counts what the server did with a push (or a notice); "stop" ends the session.
fn tally(reply: &PushReply, report: &mut WorkerReport) -> Result<(), Exit> {
    match reply.outcome() {
        // A re-push after a lost reply: the server holds it once.
        PushOutcome::Accepted | PushOutcome::AlreadyAccepted => report.accepted += 1,
        PushOutcome::Stopped => return Err(Exit::End(SessionEnd::Stopped)),
        PushOutcome::Late | PushOutcome::TooStale | PushOutcome::Unspecified => report.dropped += 1,
    }
    if reply.stop {
        return Err(Exit::End(SessionEnd::Stopped));
    }
    Ok(())
}
