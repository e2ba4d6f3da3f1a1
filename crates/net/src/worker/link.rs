//! A worker's connection to a server: dialling it (TLS, keep-alive, windows), a pull that
//! runs on its own task, and how a failed call reads (a lost link or a refusal).

use super::{WorkerError, WorkerOptions};
use crate::auth::AddToken;
use crate::proto::parameter_server_client::ParameterServerClient;
use crate::proto::*;
use std::time::{Duration, Instant};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The channel with the token added to every request.
pub(crate) type Channel_ = InterceptedService<Channel, AddToken>;

/// Calls as tonic generates them (join, pull, heartbeat); pushes go over the same channel
/// through [`crate::framing::push`].
pub(crate) type Client = ParameterServerClient<Channel_>;

/// The endpoint to dial: the address, upgraded to TLS when the options carry TLS files.
fn endpoint(opts: &WorkerOptions, server: &str) -> Result<(tonic::transport::Endpoint, String), WorkerError> {
    let addr = match server.strip_prefix("http://") {
        Some(rest) if opts.tls.enabled() => format!("https://{rest}"),
        _ => server.to_string(),
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
        .max_frame_size(crate::framing::FRAME);
    let ep = opts.window.endpoint(ep);
    Ok((ep, addr))
}

pub(crate) async fn connect(opts: &WorkerOptions) -> Result<(Client, Channel_), WorkerError> {
    connect_to(opts, &opts.server).await
}

/// Connects to `server` (retrying within the connect time-out).
pub(crate) async fn connect_to(opts: &WorkerOptions, server: &str) -> Result<(Client, Channel_), WorkerError> {
    let start = Instant::now();
    let mut backoff = Duration::from_millis(50);
    let (ep, addr) = endpoint(opts, server)?;
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
pub(super) struct PullTask {
    pub(super) task: tokio::task::JoinHandle<Result<PullStart, tonic::Status>>,
    pub(super) min_step: u64,
    /// Set once the answer begins, where the pull was started told ([`PullTask::start_told`]).
    answered: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// A pull's response, read without codec copies ([`crate::framing`]).
type Replies = crate::framing::Messages<<Channel_ as tonic::client::GrpcService<tonic::body::Body>>::ResponseBody>;

/// A parameter chunk's fields and its bytes as they arrived.
type ParamsPiece = (ParamsChunk, crate::framing::Segments);

type PullStart = (Replies, Result<Option<ParamsPiece>, tonic::Status>);

impl PullTask {
    /// With `shm`, the parameters are to be read from the server's shared memory.
    pub(super) fn start(channel: &Channel_, worker: u32, min_step: u64, shm: bool) -> Self {
        Self::start_told(channel, worker, min_step, shm, None)
    }

    /// [`PullTask::start`], setting `answered` once the answer begins: the server has
    /// published a step of at least `min_step` (or "stop").
    pub(super) fn start_told(
        channel: &Channel_,
        worker: u32,
        min_step: u64,
        shm: bool,
        answered: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    ) -> Self {
        let mut channel = channel.clone();
        let flag = answered.clone();
        let task = tokio::spawn(async move {
            let mut replies = crate::framing::pull(&mut channel, &PullRequest { worker, min_step, shm }).await?;
            let first = replies.next_chunk(crate::framing::PARAMS_DATA).await;
            if let Some(flag) = flag {
                flag.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            Ok((replies, first))
        });
        PullTask { task, min_step, answered }
    }

    /// For a pull started told: whether its answer has begun (the server has published a step
    /// of at least `min_step`, or "stop"). `None` for a pull started without the flag.
    pub(super) fn answered(&self) -> Option<bool> {
        self.answered.as_ref().map(|f| f.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Whether the pull ended with "stop" (waiting for it at most a second).
    pub(super) async fn said_stop(mut self) -> bool {
        match tokio::time::timeout(Duration::from_secs(1), &mut self.task).await {
            Ok(Ok(Ok((_, Ok(Some((chunk, _))))))) => chunk.stop,
            _ => false,
        }
    }
}

impl Drop for PullTask {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How a session with the server ended.
pub(crate) enum SessionEnd {
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
pub(crate) fn lost_or_refused(worker: u32, s: tonic::Status) -> Result<SessionEnd, WorkerError> {
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
pub(crate) async fn within<T>(
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
