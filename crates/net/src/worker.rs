//! A worker: join, then forever pull the newest parameters, compute a gradient, push it.
//! If the server goes away (a restart), it reconnects with backoff and joins again.

use crate::auth::AddToken;
use crate::proto::parameter_server_client::ParameterServerClient;
use crate::proto::*;
use crate::wire::{Assembler, Encoding};
use bytes::Bytes;
use quorum_compute::{BatchId, GradientSource};
use quorum_core::WorkerId;
use quorum_sim::DelaySampler;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::time::{Duration, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// How a worker runs.
#[derive(Clone)]
pub struct WorkerOptions {
    /// Its index, `0..workers`.
    pub index: u32,
    /// The server, e.g. `http://127.0.0.1:7070`.
    pub server: String,
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
}

impl WorkerOptions {
    /// Defaults: 60 s to connect, a heartbeat every 2 s, no injected delay.
    pub fn new(index: u32, server: impl Into<String>) -> Self {
        WorkerOptions {
            index,
            server: server.into(),
            connect_timeout: Duration::from_secs(60),
            heartbeat_every: Duration::from_secs(2),
            rpc_timeout: Duration::from_secs(30),
            delay: None,
            seed: 1,
            token: None,
            tls: crate::tls::TlsFiles::default(),
        }
    }
}

/// What a worker did.
#[derive(Debug, Clone, Default)]
pub struct WorkerReport {
    /// Gradients pushed.
    pub sent: u64,
    /// Gradients the server used.
    pub accepted: u64,
    /// Gradients dropped (late or too stale).
    pub dropped: u64,
    /// Late gradients reported without their values: the worker knew the step had closed.
    pub unsent_late: u64,
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

/// The channel with the token added to every request.
type Channel_ = InterceptedService<Channel, AddToken>;

/// Calls as tonic generates them (join, pull, heartbeat); pushes go over the same channel
/// through [`crate::raw::push`].
type Client = ParameterServerClient<Channel_>;

/// The endpoint to dial: the address, upgraded to TLS when the options carry TLS files.
fn endpoint(opts: &WorkerOptions) -> Result<(tonic::transport::Endpoint, String), WorkerError> {
    let addr = match opts.server.strip_prefix("http://") {
        Some(rest) if opts.tls.enabled() => format!("https://{rest}"),
        _ => opts.server.clone(),
    };
    let invalid = |last: String| WorkerError::Unreachable { addr: addr.clone(), secs: 0.0, last };
    let mut ep = Channel::from_shared(addr.clone()).map_err(|e| invalid(format!("invalid address: {e}")))?;
    let host = ep.uri().host().unwrap_or("localhost").to_string();
    if let Some(tls) = opts.tls.client(&host)? {
        ep = ep.tls_config(tls).map_err(|e| invalid(format!("TLS set-up: {e}")))?;
    }
    // Keep-alive pings find a dead peer (a frozen server, a black-holed link) when no RPC is
    // waiting; RPCs (and `connect`, handshakes included) have their own, shorter, deadlines.
    let ep = ep
        .http2_keep_alive_interval(opts.rpc_timeout)
        .keep_alive_timeout(2 * opts.rpc_timeout)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(crate::wire::STREAM_WINDOW)
        .initial_connection_window_size(crate::wire::CONNECTION_WINDOW)
        .max_frame_size(crate::wire::FRAME);
    Ok((ep, addr))
}

async fn connect(opts: &WorkerOptions) -> Result<(Client, Channel_), WorkerError> {
    let start = Instant::now();
    let mut backoff = Duration::from_millis(50);
    let (ep, addr) = endpoint(opts)?;
    loop {
        let err = match tokio::time::timeout(opts.rpc_timeout, ep.connect()).await {
            Err(_) => format!("no answer within {:.0} s", opts.rpc_timeout.as_secs_f64()),
            Ok(Ok(ch)) => {
                let ch = InterceptedService::new(ch, AddToken(opts.token.clone()));
                return Ok((ParameterServerClient::new(ch.clone()).max_decoding_message_size(8 << 20), ch));
            }
            // The transport error's source says why (refused, TLS handshake, ...).
            Ok(Err(e)) => std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| format!("{e}: {s}")),
        };
        if start.elapsed() >= opts.connect_timeout {
            return Err(WorkerError::Unreachable { addr, secs: start.elapsed().as_secs_f64(), last: err });
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// A pull running on its own task: the request and the wait for the first chunk.
struct PullTask(tokio::task::JoinHandle<Result<PullStart, tonic::Status>>);

/// A pull's response, read without codec copies ([`crate::raw`]).
type Replies = crate::raw::Messages<<Channel_ as tonic::client::GrpcService<tonic::body::Body>>::ResponseBody>;

/// A parameter chunk's fields and its bytes as they arrived.
type ParamsPiece = (ParamsChunk, crate::raw::Segments);

type PullStart = (Replies, Result<Option<ParamsPiece>, tonic::Status>);

impl PullTask {
    fn start(channel: &Channel_, worker: u32, min_step: u64) -> Self {
        let mut channel = channel.clone();
        PullTask(tokio::spawn(async move {
            let mut replies = crate::raw::pull(&mut channel, &PullRequest { worker, min_step }).await?;
            let first = replies.next_chunk(crate::raw::PARAMS_DATA).await;
            Ok((replies, first))
        }))
    }

    /// Whether the pull ended with "stop" (waiting for it at most a second).
    async fn said_stop(mut self) -> bool {
        match tokio::time::timeout(Duration::from_secs(1), &mut self.0).await {
            Ok(Ok(Ok((_, Ok(Some((chunk, _))))))) => chunk.stop,
            _ => false,
        }
    }
}

impl Drop for PullTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a session with the server ended.
enum SessionEnd {
    /// The server said stop.
    Stopped,
    /// The connection broke: reconnect and join again. `joined`: the session got as far as
    /// a successful join (else the link never worked, e.g. a TLS handshake the server refused).
    Lost { why: String, joined: bool },
    /// The join was refused because a live process holds this index (a duplicate, or this
    /// worker's previous incarnation not yet timed out): wait and join again.
    IndexHeld { why: String },
}

/// A broken link (the server died or restarts) as opposed to a refusal.
fn lost_or_refused(worker: u32, s: tonic::Status) -> Result<SessionEnd, WorkerError> {
    // An HTTP/2 error is the link, not the server's answer (e.g. plain text against TLS).
    let link = s.message().starts_with("h2 protocol error");
    match s.code() {
        tonic::Code::Unavailable
        | tonic::Code::Unknown
        | tonic::Code::Cancelled
        | tonic::Code::Aborted
        | tonic::Code::DeadlineExceeded => Ok(SessionEnd::Lost { why: s.message().to_string(), joined: true }),
        _ if link => Ok(SessionEnd::Lost { why: s.message().to_string(), joined: true }),
        _ => Err(WorkerError::Refused { worker, message: s.message().to_string() }),
    }
}

/// Waits at most `limit` for an RPC's answer; silence is a lost link (DEADLINE_EXCEEDED).
async fn within<T>(
    limit: Duration,
    what: &str,
    call: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(limit, call).await {
        Ok(r) => r,
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "no answer to a {what} within {:.0} s: the server is frozen or cut off",
            limit.as_secs_f64()
        ))),
    }
}

/// A session id for this process: random, so no other process can guess it.
fn new_session() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(std::process::id()) | 1
}

macro_rules! rpc {
    ($w:expr, $e:expr) => {
        match $e {
            Ok(v) => v,
            Err(s) => return lost_or_refused($w, s),
        }
    };
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
        let ended =
            session(&opts, session_id, &mut client, &mut channel, &mut source, &mut rng, &mut draws, &mut report).await;
        let ended = match ended {
            Err(WorkerError::Panicked { worker, message }) => {
                // Tell the server now, so no step waits for this worker's time-out.
                let why = format!("the gradient code panicked: {message}");
                let leave = LeaveRequest { worker, session: session_id, reason: why };
                let _ = within(opts.rpc_timeout, "leave", client.leave(leave)).await;
                return Err(WorkerError::Panicked { worker, message });
            }
            other => other?,
        };
        match ended {
            SessionEnd::Stopped => return Ok(report),
            SessionEnd::Lost { why, joined: true } => {
                failing_since = None;
                report.reconnects += 1;
                eprintln!("worker {}: lost the parameter server ({why}); reconnecting", opts.index);
            }
            // Waiting for a live process to give up this index, within the connect time-out.
            SessionEnd::IndexHeld { why } => {
                if failing_since.is_none() {
                    eprintln!("worker {}: {why}; waiting", opts.index);
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

#[allow(clippy::too_many_arguments)]
async fn session(
    opts: &WorkerOptions,
    session_id: u64,
    client: &mut Client,
    channel: &mut Channel_,
    source: &mut Option<Box<dyn GradientSource + Send>>,
    rng: &mut ChaCha8Rng,
    draws: &mut u64,
    report: &mut WorkerReport,
) -> Result<SessionEnd, WorkerError> {
    let w = opts.index;
    let num_params = source.as_ref().expect("source present between computations").layout().len();
    let join_request = JoinRequest { worker: w, num_params: num_params as u64, session: session_id };
    let join = match within(opts.rpc_timeout, "join", client.join(join_request)).await {
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
    let enc = Encoding::from_flag(join.bf16);
    // The server's interval wins when it is shorter: it declares workers gone by its own clock.
    let heartbeat_every = match join.heartbeat_ms {
        0 => opts.heartbeat_every,
        ms => opts.heartbeat_every.min(Duration::from_millis(ms)),
    };
    let beat_request = HeartbeatRequest { worker: w, session: session_id };
    let mut min_step = join.step;
    // A second handle on the same connection, for heartbeats while a pull is in flight.
    let mut beat = client.clone();
    // The parameters' buffer, reused from step to step.
    let mut params_buffer = Vec::new();
    // The next step's pull, asked for while the gradient is pushed.
    let mut pending: Option<PullTask> = None;
    loop {
        // Pull the newest parameters (at least `min_step`).
        // The pull waits until the step opens, which takes as long as the slowest of the N
        // gradients (or the stall timeout): heartbeat meanwhile, so waiting is not taken for death.
        let t_pull = Instant::now();
        let mut pull = match pending.take() {
            Some(p) => p,
            None => PullTask::start(channel, w, min_step),
        };
        let (mut replies, first) = loop {
            tokio::select! {
                r = &mut pull.0 => {
                    let r = r.unwrap_or_else(|e| Err(tonic::Status::unknown(format!("pull task failed: {e}"))));
                    break rpc!(w, r);
                }
                _ = tokio::time::sleep(heartbeat_every) => {
                    // A silent server (frozen, cut off) ends the session; a refusal too.
                    rpc!(w, within(opts.rpc_timeout, "heartbeat", beat.heartbeat(beat_request)).await);
                }
            }
        };
        let mut asm = Assembler::with_buffer(std::mem::take(&mut params_buffer));
        let mut step = None;
        let mut first_chunk = None;
        let mut next = rpc!(w, first);
        while let Some((c, data)) = next {
            first_chunk.get_or_insert_with(Instant::now);
            if c.stop {
                return Ok(SessionEnd::Stopped);
            }
            step = Some(c.step);
            let parts: Vec<&[u8]> = data.parts().collect();
            asm.push_parts(c.offset, c.total, &parts, Encoding::from_flag(c.bf16), num_params)
                .map_err(|e| WorkerError::Refused { worker: w, message: format!("malformed parameters: {e}") })?;
            next = rpc!(w, within(opts.rpc_timeout, "pull", replies.next_chunk(crate::raw::PARAMS_DATA)).await);
        }
        // Waiting for the step to open is not transfer: time from the first chunk.
        let pull_seconds = first_chunk.map_or(t_pull.elapsed(), |t| t.elapsed()).as_secs_f64();
        let Some(step) = step else {
            return Ok(SessionEnd::Lost { why: "empty parameter stream".into(), joined: true });
        };
        let params = asm
            .finish()
            .map_err(|e| WorkerError::Refused { worker: w, message: format!("malformed parameters: {e}") })?;

        if let Some(d) = &opts.delay {
            let secs = d.sample(w, *draws, rng);
            *draws += 1;
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        }
        let mut src = source.take().expect("source is returned after every computation");
        let t0 = Instant::now();
        let mut task = tokio::task::spawn_blocking(move || {
            let mut grad = Vec::new();
            let r = src.gradient(&params, BatchId { worker: WorkerId(w), step }, &mut grad).map(|loss| (loss, grad));
            (src, r, params)
        });
        // Heartbeats while the gradient is computed, so a slow gradient is not taken for death.
        let (src, result, params) = loop {
            tokio::select! {
                done = &mut task => match done {
                    Ok(done) => break done,
                    Err(e) => {
                        let message = match e.try_into_panic() {
                            Ok(p) => p
                                .downcast_ref::<&str>()
                                .map(|m| m.to_string())
                                .or_else(|| p.downcast_ref::<String>().cloned())
                                .unwrap_or_else(|| "no message".into()),
                            Err(e) => e.to_string(),
                        };
                        return Err(WorkerError::Panicked { worker: w, message });
                    }
                },
                _ = tokio::time::sleep(heartbeat_every) => {
                    // Failures here are noticed by the push that follows.
                    let _ = within(opts.rpc_timeout, "heartbeat", client.heartbeat(beat_request)).await;
                }
            }
        };
        let compute_seconds = t0.elapsed().as_secs_f64();
        report.compute_seconds += compute_seconds;
        *source = Some(src);
        params_buffer = params;
        let (loss, grad) = result.map_err(|source| WorkerError::Compute { worker: w, source })?;

        let total = grad.len() as u64;
        let bf16 = enc == Encoding::Bf16;
        let head = GradientChunk {
            worker: w,
            step,
            offset: 0,
            total,
            data: Default::default(),
            loss,
            bf16,
            compute_seconds,
            pull_seconds,
            session: session_id,
        };
        // Ask for the next parameters now: the server streams them the moment the step
        // closes, without waiting for this push's reply and a new request.
        pending = Some(PullTask::start(channel, w, step + 1));
        let mut reply = None;
        // Has the step closed while this gradient was computed? Then the server would drop it
        // unread: report it late without sending its values (a heartbeat's reply says the
        // server's step; a few bytes against a gradient's megabytes).
        let mut closed = false;
        if join.late_notices {
            if let Ok(r) = within(opts.rpc_timeout, "heartbeat", client.heartbeat(beat_request)).await {
                if r.get_ref().stop {
                    return Ok(SessionEnd::Stopped);
                }
                closed = r.get_ref().step > step;
            }
        }
        report.sent += 1;
        if closed {
            let notice = crate::raw::push_frames(&GradientChunk { total: 0, ..head.clone() }, vec![Bytes::new()]);
            match within(opts.rpc_timeout, "push", crate::raw::push(channel, notice)).await {
                Ok(r) if r.outcome == "late" || r.stop => {
                    report.unsent_late += u64::from(r.outcome == "late");
                    reply = Some(r);
                }
                // Anything else (a restarted server that reopened the step refuses an empty
                // gradient, a broken link): send the gradient in full below.
                _ => {}
            }
        }
        let pushed = match reply {
            Some(r) => Ok(r),
            None => {
                let frames = crate::raw::push_frames(&head, enc.encode_chunks(grad));
                within(opts.rpc_timeout, "push", crate::raw::push(channel, frames)).await
            }
        };
        let reply = match pushed {
            Ok(r) => r,
            Err(s) => {
                // The server may have ended the run and gone while this push was on the way,
                // having told this worker "stop" through the next step's pull.
                if let Some(p) = pending.take() {
                    if p.said_stop().await {
                        return Ok(SessionEnd::Stopped);
                    }
                }
                return lost_or_refused(w, s);
            }
        };
        match reply.outcome.as_str() {
            // "already_accepted": a re-push after a lost reply; the server holds it once.
            "accepted" | "already_accepted" => report.accepted += 1,
            "stopped" => return Ok(SessionEnd::Stopped),
            _ => report.dropped += 1,
        }
        if reply.stop {
            return Ok(SessionEnd::Stopped);
        }
        min_step = step + 1;
    }
}
