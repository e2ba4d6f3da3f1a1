//! The parameter server: gRPC handlers that translate, and one loop that owns the state machine.

use crate::checkpoint;
use crate::proto::parameter_server_server::{ParameterServer, ParameterServerServer};
use crate::proto::*;
use crate::tensorboard::EventWriter;
use crate::wire::{Assembler, Encoding, CHUNK_VALUES, CONNECTION_WINDOW, FRAME, STREAM_WINDOW};
use quorum_compute::{Evaluation, GradientSource};
use quorum_core::server::StopReason;
use quorum_core::{
    Action, DropReason, Event, ParamLayout, ProtocolError, Server, ServerConfig, ServerSnapshot, ToServer, WorkerId,
};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::{Stream, StreamExt};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

/// Everything the parameter server needs.
pub struct ServerOptions {
    /// The state machine's configuration (`max_steps` ends the run).
    pub config: ServerConfig,
    /// Parameter layout.
    pub layout: ParamLayout,
    /// Initial parameters (ignored when `restore` is set).
    pub init: Vec<f32>,
    /// Continue from this state instead of `init` (`--resume`).
    pub restore: Option<ServerSnapshot>,
    /// Run directory for events.jsonl, metrics.csv, arrivals.csv, workers.csv, summary.json
    /// and the TensorBoard event file.
    pub out: Option<PathBuf>,
    /// Evaluates the parameters (test set) every `eval_every` steps and at the end, off the loop.
    pub evaluator: Option<Box<dyn GradientSource + Send>>,
    /// Evaluation interval in steps.
    pub eval_every: Option<u64>,
    /// Examples per gradient (for the `examples` column).
    pub batch: u64,
    /// How parameters travel to workers and gradients come back.
    pub encoding: Encoding,
    /// Periodic and final checkpoints.
    pub checkpoint: Option<CheckpointOptions>,
    /// Recorded in each checkpoint (the resolved run configuration).
    pub run_config: Option<String>,
    /// Called after every applied step.
    pub progress: Option<ProgressFn>,
    /// Join token every RPC must carry (required for servers reachable from other machines).
    pub token: Option<crate::auth::Token>,
    /// TLS files: with a certificate and key the server speaks TLS; with a CA as well,
    /// workers must present a certificate signed by it (mutual TLS).
    pub tls: crate::tls::TlsFiles,
    /// Stop as diverged once a step's mean loss is non-finite or above this, or a gradient is
    /// refused for non-finite values (use `f32::INFINITY` for "non-finite only"); `None`: the
    /// refused gradients are only counted.
    pub divergence_loss: Option<f32>,
}

impl ServerOptions {
    /// Options with no outputs, evaluation, checkpoints or progress.
    pub fn new(config: ServerConfig, layout: ParamLayout, init: Vec<f32>) -> Self {
        ServerOptions {
            config,
            layout,
            init,
            restore: None,
            out: None,
            evaluator: None,
            eval_every: None,
            batch: 1,
            encoding: Encoding::F32,
            checkpoint: None,
            run_config: None,
            progress: None,
            token: None,
            tls: crate::tls::TlsFiles::default(),
            divergence_loss: None,
        }
    }
}

/// When and where checkpoints are written.
#[derive(Debug, Clone)]
pub struct CheckpointOptions {
    /// Directory of `ckpt-<step>.{safetensors,json}`.
    pub dir: PathBuf,
    /// Every this many steps (besides the final one).
    pub every_steps: Option<u64>,
    /// Every this many seconds.
    pub every_seconds: Option<f64>,
    /// Checkpoints kept.
    pub keep: usize,
}

/// A callback for the live status line.
pub type ProgressFn = Box<dyn FnMut(&Progress) + Send>;

/// A progress snapshot for the live status line.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Updates applied.
    pub step: u64,
    /// Wall seconds since start.
    pub seconds: f64,
    /// Examples per second so far.
    pub examples_per_second: f64,
    /// Last mean train loss.
    pub loss: Option<f32>,
    /// Last test accuracy.
    pub accuracy: Option<f32>,
    /// Gradients dropped so far.
    pub dropped: u64,
    /// The slowest worker so far (highest mean compute + transfer time), with that mean.
    pub slowest: Option<(u32, f64)>,
}

/// What a finished run reports (`summary.json`).
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// Updates applied (including those before a resume).
    pub steps: u64,
    /// The step this run started from (0 unless resumed).
    pub start_step: u64,
    /// Wall seconds from start to the last update.
    pub wall_seconds: f64,
    /// Updates per wall second (this run's updates only).
    pub steps_per_second: f64,
    /// Gradients dropped.
    pub dropped: u64,
    /// Gradients used.
    pub accepted: u64,
    /// Gradients the server refused (protocol violations).
    pub rejected: u64,
    /// Policy name.
    pub policy: String,
    /// Workers (N + b).
    pub workers: u32,
    /// Backup workers.
    pub backups: u32,
    /// Test accuracy at the end (with an evaluator).
    pub final_test_accuracy: Option<f32>,
    /// Test loss at the end (with an evaluator).
    pub final_test_loss: Option<f32>,
    /// Why the run stopped, if not by finishing.
    pub stop_reason: Option<String>,
    /// Whether it stopped because training diverged.
    pub diverged: bool,
    /// Accuracy on the validation split at the end (held out of training; for restarts).
    pub final_validation_accuracy: Option<f32>,
    /// Loss on the validation split at the end.
    pub final_validation_loss: Option<f32>,
    /// The last checkpoint written.
    pub checkpoint: Option<PathBuf>,
    /// Unix time the server started.
    pub started_unix: f64,
}

#[derive(Clone)]
struct Published {
    step: u64,
    /// The pull's response body: the parameters encoded in wire chunks, each behind its
    /// message prefix ([`crate::raw::chunk_frames`]); built once per step, shared by every pull.
    frames: Arc<Vec<bytes::Bytes>>,
    stop: bool,
}

impl Published {
    fn new(step: u64, params: &[f32], enc: Encoding, stop: bool) -> Self {
        let chunks = enc.encode_chunks(params.to_vec());
        let mut frames = Vec::with_capacity(2 * chunks.len());
        for (i, data) in chunks.into_iter().enumerate() {
            let fields = ParamsChunk {
                step,
                offset: (i * CHUNK_VALUES) as u64,
                total: params.len() as u64,
                data: Default::default(),
                stop: false,
                bf16: enc == Encoding::Bf16,
            };
            frames.extend(crate::raw::chunk_frames(&fields, crate::raw::PARAMS_DATA, data));
        }
        Published { step, frames: Arc::new(frames), stop }
    }

    fn stopped(step: u64) -> Self {
        let chunk = ParamsChunk { step, offset: 0, total: 0, data: Default::default(), stop: true, bf16: false };
        Published { step, frames: Arc::new(vec![crate::raw::message_frame(&chunk)]), stop: true }
    }
}

type Reply = oneshot::Sender<Result<Vec<Event>, ProtocolError>>;

/// The answer to a push, with the receive buffer handed back for the next push.
type PushAnswer = oneshot::Sender<(Result<Vec<Event>, ProtocolError>, Vec<f32>)>;

/// Seconds a worker reports with a gradient: computing it, and moving bytes for it.
#[derive(Debug, Clone, Copy)]
struct Timing {
    compute: f64,
    transfer: f64,
}

enum Command {
    /// `session`: the sender's session, checked before anything but a join.
    Message {
        worker: WorkerId,
        session: u64,
        msg: ToServer,
        reply: Reply,
    },
    Push {
        worker: WorkerId,
        session: u64,
        step: u64,
        gradient: Vec<f32>,
        loss: Option<f32>,
        timing: Timing,
        reply: PushAnswer,
    },
    StopSeen(WorkerId),
}

/// Where the loop sends a command's result.
enum Answer {
    Message(Reply),
    Push(PushAnswer, Vec<f32>),
}

impl Answer {
    fn send(self, r: Result<Vec<Event>, ProtocolError>) {
        // A requester that went away needs no answer.
        match self {
            Answer::Message(tx) => drop(tx.send(r)),
            Answer::Push(tx, buffer) => drop(tx.send((r, buffer))),
        }
    }
}

/// Receive buffers for pushed gradients, and a bound on how many pushes are reassembled at
/// once: gradients in flight cost the server `permits` model-sized buffers however many
/// workers there are (a push waiting for a permit holds only its HTTP/2 stream window).
/// Kept buffers are reused, so a push neither allocates nor page-faults a fresh one.
struct GradientBuffers {
    free: std::sync::Mutex<Vec<Vec<f32>>>,
    permits: tokio::sync::Semaphore,
}

impl GradientBuffers {
    fn new(permits: usize) -> Self {
        GradientBuffers { free: Default::default(), permits: tokio::sync::Semaphore::new(permits) }
    }

    fn take(&self) -> Vec<f32> {
        self.free.lock().expect("buffer pool lock").pop().unwrap_or_default()
    }

    fn give_back(&self, buffer: Vec<f32>) {
        self.free.lock().expect("buffer pool lock").push(buffer);
    }
}

/// Pushes reassembled at once: enough to keep every core decoding, few enough that memory
/// does not grow with the number of workers.
fn push_permits() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8)
}

/// The next chunk of a push (its fields and data pieces), waiting at most `idle` for it: a
/// worker frozen mid-push must not keep its receive buffer (and permit) forever.
async fn next_chunk(
    push: &mut crate::raw::Messages<tonic::body::Body>,
    idle: Duration,
) -> Result<Option<(GradientChunk, crate::raw::Segments)>, Status> {
    match tokio::time::timeout(idle, push.next_chunk(crate::raw::GRADIENT_DATA)).await {
        Ok(chunk) => chunk,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no chunk of the pushed gradient for {:.0} s: push abandoned",
            idle.as_secs_f64()
        ))),
    }
}

struct Service {
    commands: mpsc::Sender<Command>,
    published: watch::Receiver<Published>,
    num_params: usize,
    workers: u32,
    encoding: Encoding,
    buffers: Arc<GradientBuffers>,
    /// A push whose next chunk takes longer than this is abandoned.
    chunk_timeout: Duration,
    /// Whether workers should check for, and report empty, gradients whose step has closed.
    late_notices: bool,
    /// The heartbeat interval workers are told (a quarter of the worker time-out).
    heartbeat: Option<Duration>,
}

fn status(e: ProtocolError) -> Status {
    match e {
        // A worker that is not joined here, or ahead of this server's step, is talking to a
        // restarted server (its channel reconnected on its own): "aborted" makes it join again.
        ProtocolError::NotJoined { .. } | ProtocolError::FutureStep { .. } => {
            Status::aborted(format!("{e} (the server may have restarted: join again)"))
        }
        ProtocolError::UnknownWorker { .. } => Status::failed_precondition(e.to_string()),
        // The index is held by a live process: a restarted worker waits for it to time out.
        ProtocolError::IndexInUse { .. } => Status::already_exists(e.to_string()),
        ProtocolError::WrongSession { .. } => Status::permission_denied(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

fn shutting_down<T>(_: T) -> Status {
    Status::unavailable("the parameter server is shutting down")
}

impl Service {
    async fn send(
        &self,
        worker: WorkerId,
        session: u64,
        msg: ToServer,
    ) -> Result<Result<Vec<Event>, ProtocolError>, Status> {
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Message { worker, session, msg, reply }).await.map_err(shutting_down)?;
        rx.await.map_err(shutting_down)
    }

    /// Reassembles a pushed gradient into a kept buffer (waiting for a permit) and hands it
    /// to the loop; the buffer comes back with the answer.
    async fn receive_push(
        &self,
        body: tonic::body::Body,
    ) -> Result<(GradientChunk, Result<Vec<Event>, ProtocolError>), Status> {
        let idle = self.chunk_timeout;
        // Wait for a permit before reading anything, so a waiting push holds no more than its
        // HTTP/2 stream window.
        let _permit = self.buffers.permits.acquire().await.map_err(shutting_down)?;
        let mut push = crate::raw::Messages::new(body, tonic::Code::InvalidArgument);
        let mut next = next_chunk(&mut push, idle).await?;
        let first_at = Instant::now();
        let mut asm = PushAssembler::with_buffer(self.num_params, self.buffers.take());
        while let Some((chunk, data)) = next {
            asm.add(chunk, &data).map_err(Status::invalid_argument)?;
            next = next_chunk(&mut push, idle).await?;
        }
        let (head, gradient) = asm.finish().map_err(Status::invalid_argument)?;
        let timing =
            Timing { compute: head.compute_seconds, transfer: head.pull_seconds + first_at.elapsed().as_secs_f64() };
        let loss = (!head.loss.is_nan()).then_some(head.loss);
        let (reply, rx) = oneshot::channel();
        let push = Command::Push {
            worker: WorkerId(head.worker),
            session: head.session,
            step: head.step,
            gradient,
            loss,
            timing,
            reply,
        };
        let answer = match self.commands.send(push).await {
            Ok(()) => rx.await.ok(),
            Err(_) => None,
        };
        let Some((result, buffer)) = answer else {
            // The loop has ended. After a stop that is an answer ("stop"), not a broken link:
            // the worker may have heard "stop" through its next pull while this push was on the way.
            if self.published.borrow().stop {
                return Ok((head, Err(ProtocolError::Stopped)));
            }
            return Err(shutting_down(()));
        };
        self.buffers.give_back(buffer);
        Ok((head, result))
    }
}

impl Service {
    /// `ParameterServer.Pull`: waits for parameters of at least the asked step, then streams
    /// the step's shared pieces ([`Published::frames`]), not copied per worker.
    async fn pull_http(&self, body: tonic::body::Body) -> Result<Vec<bytes::Bytes>, Status> {
        let r: PullRequest = crate::raw::read_request(body, self.chunk_timeout).await?;
        let mut rx = self.published.clone();
        let p = loop {
            let p = rx.borrow_and_update().clone();
            if p.stop || p.step >= r.min_step {
                break p;
            }
            rx.changed().await.map_err(shutting_down)?;
        };
        if p.stop {
            let _ = self.commands.send(Command::StopSeen(WorkerId(r.worker))).await;
        }
        Ok(p.frames.to_vec())
    }

    /// `ParameterServer.Push`, read from the HTTP/2 body without tonic's codec copies
    /// ([`crate::raw`]); same messages, same statuses.
    async fn push_http(&self, body: tonic::body::Body) -> Result<PushReply, Status> {
        let (head, result) = self.receive_push(body).await?;
        let (worker, step) = (head.worker, head.step);
        let events = match result {
            Ok(ev) => ev,
            Err(ProtocolError::Stopped) => {
                let _ = self.commands.send(Command::StopSeen(WorkerId(worker))).await;
                return Ok(PushReply { outcome: "stopped".into(), step, stop: true });
            }
            Err(e) => return Err(status(e)),
        };
        let outcome = events
            .iter()
            .find_map(|e| match e {
                Event::GradientAccepted { worker: w, .. } if w.0 == worker => Some("accepted"),
                Event::GradientRepeated { worker: w, .. } if w.0 == worker => Some("already_accepted"),
                Event::GradientDropped { worker: w, reason, .. } if w.0 == worker => Some(match reason {
                    DropReason::Late => "late",
                    DropReason::TooStale { .. } => "too_stale",
                }),
                _ => None,
            })
            .unwrap_or("accepted");
        let p = self.published.borrow().clone();
        if p.stop {
            let _ = self.commands.send(Command::StopSeen(WorkerId(worker))).await;
        }
        Ok(PushReply { outcome: outcome.into(), step: p.step, stop: p.stop })
    }
}

/// The gRPC service as served: `Push` and `Pull` by [`Service::push_http`] and
/// [`Service::pull_http`] (no codec copies, [`crate::raw`]), `Join` and `Heartbeat` by
/// tonic's generated server; the token checked on all of them.
#[derive(Clone)]
struct Routes {
    generated: InterceptedService<ParameterServerServer<Service>, crate::auth::CheckToken>,
    service: Arc<Service>,
    token: crate::auth::CheckToken,
}

impl tonic::server::NamedService for Routes {
    const NAME: &'static str = <ParameterServerServer<Service> as tonic::server::NamedService>::NAME;
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for Routes {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        tonic::codegen::Service::<http::Request<tonic::body::Body>>::poll_ready(&mut self.generated, cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let pull = match req.uri().path() {
            crate::raw::PULL_PATH => true,
            crate::raw::PUSH_PATH => false,
            _ => {
                let answer = self.generated.call(req);
                return Box::pin(async move { answer.await.map(|r| r.map(tonic::body::Body::new)) });
            }
        };
        use tonic::service::Interceptor;
        let auth = Request::from_parts(
            tonic::metadata::MetadataMap::from_headers(req.headers().clone()),
            Default::default(),
            (),
        );
        if let Err(s) = self.token.call(auth) {
            return Box::pin(std::future::ready(Ok(s.into_http())));
        }
        let service = self.service.clone();
        Box::pin(async move {
            let answer = if pull {
                service.pull_http(req.into_body()).await
            } else {
                service.push_http(req.into_body()).await.map(|reply| vec![crate::raw::message_frame(&reply)])
            };
            Ok(match answer {
                Ok(pieces) => crate::raw::response(pieces),
                Err(s) => s.into_http(),
            })
        })
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<ParamsChunk, Status>> + Send>>;

#[tonic::async_trait]
impl ParameterServer for Service {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        let r = req.into_inner();
        if r.num_params as usize != self.num_params {
            return Err(Status::failed_precondition(format!(
                "worker {} has a model of {} parameters but the server's has {}; start every process with the same model config",
                r.worker, r.num_params, self.num_params
            )));
        }
        match self.send(WorkerId(r.worker), r.session, ToServer::Join { session: r.session }).await? {
            Ok(_) | Err(ProtocolError::Stopped) => {}
            Err(e) => return Err(status(e)),
        }
        let p = self.published.borrow().clone();
        Ok(Response::new(JoinReply {
            step: p.step,
            num_params: self.num_params as u64,
            workers: self.workers,
            stop: p.stop,
            bf16: self.encoding == Encoding::Bf16,
            late_notices: self.late_notices,
            heartbeat_ms: self.heartbeat.map_or(0, |d| d.as_millis().max(1) as u64),
        }))
    }

    type PullStream = ChunkStream;

    async fn pull(&self, _: Request<PullRequest>) -> Result<Response<ChunkStream>, Status> {
        // `Routes` answers every request for this path itself (see `Service::pull_http`).
        Err(Status::internal("pulls are answered by the server's own Pull route"))
    }

    async fn push(&self, _: Request<Streaming<GradientChunk>>) -> Result<Response<PushReply>, Status> {
        // `Routes` answers every request for this path itself (see `Service::push_http`).
        Err(Status::internal("pushes are received by the server's own Push route"))
    }

    async fn leave(&self, req: Request<LeaveRequest>) -> Result<Response<LeaveReply>, Status> {
        let r = req.into_inner();
        match self.send(WorkerId(r.worker), r.session, ToServer::Leave).await? {
            Ok(_) => eprintln!("worker {} left: {}", WorkerId(r.worker), r.reason),
            Err(ProtocolError::Stopped) => {}
            Err(e) => return Err(status(e)),
        }
        Ok(Response::new(LeaveReply {}))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatReply>, Status> {
        let HeartbeatRequest { worker: w, session } = req.into_inner();
        match self.send(WorkerId(w), session, ToServer::Heartbeat).await? {
            Ok(_) | Err(ProtocolError::Stopped) => {}
            Err(e) => return Err(status(e)),
        }
        let p = self.published.borrow().clone();
        if p.stop {
            let _ = self.commands.send(Command::StopSeen(WorkerId(w))).await;
        }
        Ok(Response::new(HeartbeatReply { step: p.step, stop: p.stop }))
    }
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] quorum_core::ConfigError),
    /// Writing the run directory failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Writing a checkpoint failed.
    #[error(transparent)]
    Checkpoint(#[from] checkpoint::CheckpointError),
    /// The gRPC transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// A TLS file could not be used.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Reassembles one pushed gradient from its stream of chunks, checking everything a
/// worker could get wrong (offsets, totals, lengths, mixed senders) before anything reaches
/// the protocol loop. Synchronous and free of I/O, so the fuzz target drives exactly this.
#[derive(Debug)]
pub struct PushAssembler {
    asm: Assembler,
    head: Option<GradientChunk>,
    num_params: usize,
}

impl PushAssembler {
    /// For a model of `num_params` parameters.
    pub fn new(num_params: usize) -> Self {
        Self::with_buffer(num_params, Vec::new())
    }

    /// Reassembles into `buffer` (its capacity reused).
    pub fn with_buffer(num_params: usize, buffer: Vec<f32>) -> Self {
        PushAssembler { asm: Assembler::with_buffer(buffer), head: None, num_params }
    }

    /// Adds the next chunk: its fields (as [`crate::raw::parse_gradient_chunk`] gives them,
    /// `data` empty) and its data bytes, in the pieces they arrived in.
    pub fn add(&mut self, c: GradientChunk, data: &crate::raw::Segments) -> Result<(), String> {
        let worker = c.worker;
        let malformed = |e: String| format!("malformed gradient from worker {worker}: {e}");
        let parts: Vec<&[u8]> = data.parts().collect();
        let enc = Encoding::from_flag(c.bf16);
        self.asm.push_parts(c.offset, c.total, &parts, enc, self.num_params).map_err(malformed)?;
        match &self.head {
            None => self.head = Some(GradientChunk { data: bytes::Bytes::new(), ..c }),
            Some(h) if h.worker != c.worker || h.step != c.step => {
                return Err(malformed(format!(
                    "the stream mixes worker/step ({}, {}) and ({}, {})",
                    h.worker, h.step, c.worker, c.step
                )));
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// The first chunk (worker, step, loss, timings; without data) and the gradient.
    pub fn finish(self) -> Result<(GradientChunk, Vec<f32>), String> {
        let head = self.head.ok_or_else(|| "empty gradient stream".to_string())?;
        let worker = head.worker;
        let gradient = self.asm.finish().map_err(|e| format!("malformed gradient from worker {worker}: {e}"))?;
        Ok((head, gradient))
    }
}

/// Per-worker counters and timing samples (workers.csv).
#[derive(Default, Clone)]
struct WorkerStats {
    sent: u64,
    accepted: u64,
    dropped: u64,
    rejected: u64,
    wait_sum: f64,
    compute: Vec<f64>,
    transfer: Vec<f64>,
    /// Running sums of `compute` and `transfer`, so the live "slowest worker" costs O(workers).
    compute_sum: f64,
    transfer_sum: f64,
}

/// A statistic of a worker's samples as a CSV cell: empty when there are none (a worker that
/// never sent), not a made-up 0 or NaN.
fn cell(v: &[f64], stat: impl Fn(&[f64]) -> f64) -> String {
    if v.is_empty() {
        String::new()
    } else {
        stat(v).to_string()
    }
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn p50(v: &[f64]) -> f64 {
    quorum_sim::report::quantile(v, 0.5)
}

fn p99(v: &[f64]) -> f64 {
    quorum_sim::report::quantile(v, 0.99)
}

/// Everything the run records, fed by the loop's events.
struct Recorder {
    out: Option<PathBuf>,
    events: Option<std::io::BufWriter<std::fs::File>>,
    tensorboard: Option<EventWriter>,
    started_unix: f64,
    batch: u64,
    /// (step, seconds, examples, train loss) per update.
    rows: Vec<(u64, f64, u64, Option<f32>)>,
    /// (step, k, worker, seconds since the step opened, accepted).
    arrivals: Vec<(u64, u32, u32, f64, bool)>,
    arrivals_per_step: HashMap<u64, u32>,
    evals: BTreeMap<u64, Evaluation>,
    workers: Vec<WorkerStats>,
    accepted: u64,
    dropped: u64,
    rejected: u64,
    examples: u64,
    last_step_at: f64,
    /// What a resumed run keeps of the run before it.
    earlier: Earlier,
}

const METRICS_HEADER: &str = "step,seconds,examples,train_loss,test_loss,test_accuracy";
const ARRIVALS_HEADER: &str = "step,k,worker,seconds,accepted";

/// The records of the run a resumed run continues, up to the checkpointed step: the new
/// run's files continue them rather than replace them.
#[derive(Default)]
struct Earlier {
    /// metrics.csv and arrivals.csv rows (without headers).
    metrics: Vec<String>,
    arrivals: Vec<String>,
    /// Seconds and examples at the checkpointed step: the new rows continue from there.
    seconds: f64,
    examples: u64,
}

impl Earlier {
    /// Reads `dir`'s files, keeping what happened up to `step` updates; rewrites
    /// events.jsonl to end at the `step`-th update (later events belong to updates the
    /// checkpoint does not have, which the resumed run makes again).
    fn read(dir: &std::path::Path, step: u64, workers: u32, batch: u64) -> std::io::Result<Self> {
        let read = |name: &str| match std::fs::read_to_string(dir.join(name)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            other => other,
        };
        let mut earlier = Earlier::default();
        let mut rows_up_to = 0;
        for line in read("metrics.csv")?.lines().skip(1) {
            let mut f = line.split(',');
            let (Some(Ok(s)), Some(Ok(secs)), Some(Ok(ex))) =
                (f.next().map(str::parse::<u64>), f.next().map(str::parse::<f64>), f.next().map(str::parse::<u64>))
            else {
                continue;
            };
            if s <= step {
                earlier.metrics.push(line.to_string());
                (earlier.seconds, earlier.examples, rows_up_to) = (secs, ex, s);
            }
        }
        for line in read("arrivals.csv")?.lines().skip(1) {
            if line.split(',').next().and_then(|s| s.parse::<u64>().ok()).is_some_and(|s| s < step) {
                earlier.arrivals.push(line.to_string());
            }
        }
        // Without the `step`-th update in the file (a killed server loses its last unflushed
        // events), every complete line is kept: nothing in it is past the checkpoint.
        let events = read("events.jsonl")?;
        let mut keep = events.rfind('\n').map_or(0, |i| i + 1);
        // Where the updates metrics.csv lacks begin: after the `rows_up_to`-th.
        let mut missing_from = (rows_up_to == 0).then_some(0);
        let mut at = 0;
        for line in events.split_inclusive('\n') {
            at += line.len();
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            if v["event"] == "step_applied" {
                let applied = v["step"].as_u64().map(|s| s + 1);
                if applied == Some(rows_up_to) {
                    missing_from = Some(at);
                }
                if applied == Some(step) {
                    keep = at;
                    break;
                }
            }
        }
        std::fs::write(dir.join("events.jsonl"), &events[..keep])?;
        // A server killed with SIGKILL never wrote metrics.csv and arrivals.csv (written when
        // a run ends): rebuild the updates it made from its events, which follow the last
        // update metrics.csv has and run on that run's own clock.
        if let Some(from) = missing_from.filter(|&from| rows_up_to < step && from <= keep) {
            let mut replay = Recorder::new(None, workers, batch, None)?;
            for line in events[from..keep].lines() {
                if let Ok(e) = serde_json::from_str::<Event>(line) {
                    replay.event(&e)?;
                }
            }
            let (t0, ex0) = (earlier.seconds, earlier.examples);
            for (s, secs, ex, loss) in replay.rows.iter().filter(|r| r.0 > rows_up_to && r.0 <= step) {
                let loss = loss.map(|l| l.to_string()).unwrap_or_default();
                earlier.metrics.push(format!("{s},{},{},{loss},,", t0 + secs, ex0 + ex));
                (earlier.seconds, earlier.examples) = (t0 + secs, ex0 + ex);
            }
            for (s, k, w, secs, acc) in replay.arrivals.iter().filter(|a| a.0 >= rows_up_to && a.0 < step) {
                earlier.arrivals.push(format!("{s},{k},{w},{secs},{acc}"));
            }
        }
        // Written back now, so a later crash of the resumed run loses only its own records
        // (which its events, flushed at every checkpoint, rebuild again).
        let lines = |header: &str, rows: &[String]| rows.iter().fold(format!("{header}\n"), |s, r| s + r + "\n");
        std::fs::write(dir.join("metrics.csv"), lines(METRICS_HEADER, &earlier.metrics))?;
        std::fs::write(dir.join("arrivals.csv"), lines(ARRIVALS_HEADER, &earlier.arrivals))?;
        Ok(earlier)
    }
}

impl Recorder {
    /// `resumed_at`: the step a resumed run starts from (its files continue the earlier run's).
    fn new(out: Option<PathBuf>, workers: u32, batch: u64, resumed_at: Option<u64>) -> std::io::Result<Self> {
        let started_unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let mut earlier = Earlier::default();
        let (events, tensorboard) = match &out {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                let path = dir.join("events.jsonl");
                let file = match resumed_at {
                    Some(step) => {
                        earlier = Earlier::read(dir, step, workers, batch)?;
                        std::fs::OpenOptions::new().append(true).create(true).open(path)?
                    }
                    None => std::fs::File::create(path)?,
                };
                (
                    Some(std::io::BufWriter::new(file)),
                    Some(EventWriter::create(&dir.join("tensorboard"), started_unix)?),
                )
            }
            None => (None, None),
        };
        Ok(Recorder {
            out,
            events,
            tensorboard,
            started_unix,
            batch,
            rows: Vec::new(),
            arrivals: Vec::new(),
            arrivals_per_step: HashMap::new(),
            evals: BTreeMap::new(),
            workers: vec![WorkerStats::default(); workers as usize],
            accepted: 0,
            dropped: 0,
            rejected: 0,
            examples: 0,
            last_step_at: 0.0,
            earlier,
        })
    }

    fn flush_events(&mut self) -> std::io::Result<()> {
        match self.events.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }

    fn log(&mut self, e: &Event) -> std::io::Result<()> {
        if let Some(f) = self.events.as_mut() {
            serde_json::to_writer(&mut *f, e).map_err(std::io::Error::other)?;
            f.write_all(b"\n")?;
        }
        Ok(())
    }

    fn timing(&mut self, worker: WorkerId, t: Timing) {
        if let Some(w) = self.workers.get_mut(worker.index()) {
            w.sent += 1;
            w.compute.push(t.compute);
            w.transfer.push(t.transfer);
            w.compute_sum += t.compute;
            w.transfer_sum += t.transfer;
        }
    }

    fn arrival(&mut self, step: u64, worker: WorkerId, since_open: f64, accepted: bool) {
        let k = self.arrivals_per_step.entry(step).or_insert(0);
        *k += 1;
        self.arrivals.push((step, *k, worker.0, since_open, accepted));
    }

    fn evaluation(&mut self, step: u64, e: Evaluation) -> std::io::Result<()> {
        if let Some(tb) = self.tensorboard.as_mut() {
            let mut v = vec![("test/loss", e.loss)];
            if let Some(a) = e.accuracy {
                v.push(("test/accuracy", a));
            }
            tb.scalars(self.started_unix + self.last_step_at, step, &v)?;
        }
        self.evals.insert(step, e);
        Ok(())
    }

    /// The worker with the highest mean compute + transfer time.
    fn slowest(&self) -> Option<(u32, f64)> {
        self.workers
            .iter()
            .enumerate()
            .filter(|(_, w)| !w.compute.is_empty())
            .map(|(i, w)| (i as u32, (w.compute_sum + w.transfer_sum) / w.compute.len() as f64))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// Records one event; returns the step just completed when it is a `StepApplied`.
    fn event(&mut self, e: &Event) -> std::io::Result<Option<u64>> {
        self.log(e)?;
        match e {
            Event::GradientAccepted { worker, step, since_open, .. } => {
                self.accepted += 1;
                self.workers[worker.index()].accepted += 1;
                self.workers[worker.index()].wait_sum += since_open;
                self.arrival(*step, *worker, *since_open, true);
            }
            Event::GradientDropped { worker, step, since_open, .. } => {
                self.dropped += 1;
                self.workers[worker.index()].dropped += 1;
                self.arrival(*step, *worker, *since_open, false);
            }
            Event::StepApplied { step, contributors, loss, time, duration, .. } => {
                self.examples += contributors.len() as u64 * self.batch;
                self.last_step_at = *time;
                let done = step + 1;
                self.rows.push((done, *time, self.examples, *loss));
                // Late gradients of steps long closed are rare; forget counters of old steps.
                if done.is_multiple_of(256) {
                    self.arrivals_per_step.retain(|s, _| s + 64 >= done);
                }
                if let Some(tb) = self.tensorboard.as_mut() {
                    let mut v = vec![("train/step_seconds", *duration as f32), ("train/dropped", self.dropped as f32)];
                    if let Some(l) = loss {
                        v.push(("train/loss", *l));
                    }
                    tb.scalars(self.started_unix + time, done, &v)?;
                }
                return Ok(Some(done));
            }
            _ => {}
        }
        Ok(None)
    }

    fn write_files(&mut self, summary: &TrainSummary) -> std::io::Result<()> {
        let Some(dir) = self.out.clone() else { return Ok(()) };
        if let Some(f) = self.events.as_mut() {
            f.flush()?;
        }
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.flush()?;
        }
        let opt = |v: Option<f32>| v.map(|x| x.to_string()).unwrap_or_default();
        let mut m = std::io::BufWriter::new(std::fs::File::create(dir.join("metrics.csv"))?);
        writeln!(m, "{METRICS_HEADER}")?;
        for row in &self.earlier.metrics {
            writeln!(m, "{row}")?;
        }
        // A resumed run continues the earlier run's clock and example count.
        let (t0, ex0) = (self.earlier.seconds, self.earlier.examples);
        for (step, secs, ex, loss) in &self.rows {
            let e = self.evals.get(step);
            writeln!(
                m,
                "{step},{},{},{},{},{}",
                secs + t0,
                ex + ex0,
                opt(*loss),
                opt(e.map(|e| e.loss)),
                opt(e.and_then(|e| e.accuracy))
            )?;
        }
        m.flush()?;
        let mut a = std::io::BufWriter::new(std::fs::File::create(dir.join("arrivals.csv"))?);
        writeln!(a, "{ARRIVALS_HEADER}")?;
        for row in &self.earlier.arrivals {
            writeln!(a, "{row}")?;
        }
        for (step, k, w, secs, acc) in &self.arrivals {
            writeln!(a, "{step},{k},{w},{secs},{acc}")?;
        }
        a.flush()?;
        let mut w = std::io::BufWriter::new(std::fs::File::create(dir.join("workers.csv"))?);
        writeln!(
            w,
            "worker,sent,accepted,dropped,rejected,mean_wait_seconds,mean_compute_seconds,p50_compute_seconds,\
             p99_compute_seconds,mean_transfer_seconds,p50_transfer_seconds,p99_transfer_seconds"
        )?;
        for (i, s) in self.workers.iter().enumerate() {
            let wait = if s.accepted > 0 { (s.wait_sum / s.accepted as f64).to_string() } else { String::new() };
            let (c, t) = (&s.compute, &s.transfer);
            writeln!(
                w,
                "{i},{},{},{},{},{wait},{},{},{},{},{},{}",
                s.sent,
                s.accepted,
                s.dropped,
                s.rejected,
                cell(c, mean),
                cell(c, p50),
                cell(c, p99),
                cell(t, mean),
                cell(t, p50),
                cell(t, p99)
            )?;
        }
        w.flush()?;
        std::fs::write(
            dir.join("summary.json"),
            serde_json::to_string_pretty(summary).map_err(std::io::Error::other)? + "\n",
        )?;
        Ok(())
    }
}

/// Writes checkpoints on a thread of their own so the loop never waits for the disk.
struct Checkpointer {
    opts: CheckpointOptions,
    tx: Option<std::sync::mpsc::Sender<ServerSnapshot>>,
    thread: Option<std::thread::JoinHandle<Option<PathBuf>>>,
    last_at: Instant,
}

impl Checkpointer {
    fn start(opts: CheckpointOptions, layout: ParamLayout, cfg: ServerConfig, run_config: Option<String>) -> Self {
        let (tx, rx) = std::sync::mpsc::channel::<ServerSnapshot>();
        let (dir, keep) = (opts.dir.clone(), opts.keep);
        let thread = std::thread::spawn(move || {
            let mut last = None;
            while let Ok(mut snap) = rx.recv() {
                // Only the newest request matters when the disk falls behind.
                while let Ok(newer) = rx.try_recv() {
                    snap = newer;
                }
                match checkpoint::save(&dir, &snap, &layout, &cfg, run_config.as_deref(), keep) {
                    Ok(p) => last = Some(p),
                    Err(e) => eprintln!("warning: checkpoint at step {} failed: {e}", snap.step),
                }
            }
            last
        });
        Checkpointer { opts, tx: Some(tx), thread: Some(thread), last_at: Instant::now() }
    }

    fn due(&self, step: u64) -> bool {
        self.opts.every_steps.is_some_and(|k| k > 0 && step.is_multiple_of(k))
            || self.opts.every_seconds.is_some_and(|s| self.last_at.elapsed().as_secs_f64() >= s)
    }

    fn request(&mut self, snap: ServerSnapshot) {
        self.last_at = Instant::now();
        if let Some(tx) = &self.tx {
            let _ = tx.send(snap);
        }
    }

    /// Writes the final checkpoint and waits for the thread; returns the last path written.
    fn finish(mut self, snap: ServerSnapshot) -> Option<PathBuf> {
        self.request(snap);
        drop(self.tx.take());
        self.thread.take().and_then(|t| t.join().ok()).flatten()
    }
}

/// Serves on `listener` until the run finishes (`max_steps`), stalls, or `shutdown` resolves.
/// Every way out writes the run directory and (when configured) a final checkpoint.
pub async fn run_server(
    listener: tokio::net::TcpListener,
    mut opts: ServerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<TrainSummary, NetError> {
    let mut server = match opts.restore.take() {
        Some(snap) => Server::restore(opts.config.clone(), opts.layout.clone(), snap)?,
        None => Server::new(opts.config.clone(), opts.layout.clone(), std::mem::take(&mut opts.init))?,
    };
    let start_step = server.step();
    let start = Instant::now();
    let (pub_tx, pub_rx) = watch::channel(Published::new(server.step(), server.params(), opts.encoding, false));
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Command>(1024);
    let (grpc_stop_tx, grpc_stop_rx) = oneshot::channel::<()>();
    let service = Service {
        commands: cmd_tx,
        published: pub_rx,
        num_params: opts.layout.len(),
        workers: opts.config.workers,
        encoding: opts.encoding,
        buffers: Arc::new(GradientBuffers::new(push_permits())),
        chunk_timeout: opts.config.liveness.worker_timeout.unwrap_or(Duration::from_secs(30)),
        // Only when a step can close without some worker's gradient (not sync without backups).
        late_notices: !matches!(
            opts.config.policy,
            quorum_core::Policy::Async { .. } | quorum_core::Policy::Sync { backups: 0, .. }
        ),
        heartbeat: opts.config.liveness.worker_timeout.map(|t| t / 4),
    };
    let service = Arc::new(service);
    let token = crate::auth::CheckToken(opts.token.clone());
    let routes = Routes {
        generated: InterceptedService::new(
            ParameterServerServer::from_arc(service.clone()).max_decoding_message_size(8 << 20),
            token.clone(),
        ),
        service,
        token,
    };
    // Small messages (replies, the last chunk) must not wait for Nagle's algorithm.
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        let s = s?;
        s.set_nodelay(true)?;
        Ok::<_, std::io::Error>(s)
    });
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = opts.tls.server()? {
        builder = builder.tls_config(tls)?;
    }
    let grpc = tokio::spawn(
        builder
            // Parameters and gradients are megabytes: HTTP/2's 64 KiB default window would
            // make every transfer wait for window updates.
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(FRAME)
            .add_service(routes)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = grpc_stop_rx.await;
            }),
    );

    let resumed_at = (start_step > 0).then_some(start_step);
    let mut rec = Recorder::new(opts.out.clone(), opts.config.workers, opts.batch, resumed_at)?;
    let mut checkpointer = opts
        .checkpoint
        .clone()
        .map(|c| Checkpointer::start(c, opts.layout.clone(), opts.config.clone(), opts.run_config.clone()));
    // Evaluation runs on its own thread so the protocol loop never waits for it.
    let (eval_tx, eval_rx) = std::sync::mpsc::channel::<(u64, Arc<Vec<f32>>)>();
    let (eval_done_tx, eval_done_rx) = std::sync::mpsc::channel::<(u64, Evaluation)>();
    let eval_thread = opts.evaluator.take().map(|mut ev| {
        std::thread::spawn(move || {
            while let Ok((step, params)) = eval_rx.recv() {
                if let Ok(e) = ev.evaluate(&params) {
                    let _ = eval_done_tx.send((step, e));
                }
            }
            ev
        })
    });
    let mut stop_reason: Option<String> = None;
    let mut diverged = false;
    let mut stopped_at: Option<Instant> = None;
    let mut acks: BTreeSet<WorkerId> = BTreeSet::new();
    tokio::pin!(shutdown);

    loop {
        if let Some(t) = stopped_at {
            // Give connected workers a moment to hear "stop" so they exit 0 rather than on a dead link.
            if acks.len() >= server.live_workers().len() || t.elapsed() > Duration::from_secs(5) {
                break;
            }
        }
        let wake =
            server.next_wakeup().map(|d| start + d).unwrap_or_else(|| Instant::now() + Duration::from_millis(200));
        let sleep_until = if stopped_at.is_some() { Instant::now() + Duration::from_millis(100) } else { wake };
        let mut outputs = None;
        tokio::select! {
            cmd = cmd_rx.recv() => match cmd {
                Some(Command::StopSeen(w)) => { acks.insert(w); }
                None => break,
                Some(cmd) => {
                    let now = start.elapsed();
                    let (worker, result, answer) = match cmd {
                        // Stopping: nothing more is applied, so the final checkpoint is the state at the stop.
                        Command::Message { reply, .. } if stopped_at.is_some() => {
                            Answer::Message(reply).send(Err(ProtocolError::Stopped));
                            continue;
                        }
                        Command::Push { reply, gradient, .. } if stopped_at.is_some() => {
                            Answer::Push(reply, gradient).send(Err(ProtocolError::Stopped));
                            continue;
                        }
                        Command::Message { worker, session, msg, reply } => {
                            let result = match msg {
                                ToServer::Join { .. } => server.handle(now, worker, msg),
                                msg => server.check_session(worker, session).and_then(|()| server.handle(now, worker, msg)),
                            };
                            (worker, result, Answer::Message(reply))
                        }
                        Command::Push { worker, session, step, gradient, loss, timing, reply } => {
                            let result = server
                                .check_session(worker, session)
                                .and_then(|()| server.push(now, worker, step, &gradient, loss));
                            if result.is_ok() {
                                rec.timing(worker, timing);
                            }
                            (worker, result, Answer::Push(reply, gradient))
                        }
                        Command::StopSeen(_) => unreachable!("handled above"),
                    };
                    match result {
                        Ok(out) => {
                            answer.send(Ok(out.events.clone()));
                            outputs = Some(out);
                        }
                        Err(e) => {
                            if matches!(e, ProtocolError::NonFinite { .. })
                                && opts.divergence_loss.is_some()
                                && stopped_at.is_none()
                            {
                                diverged = true;
                                stop_reason = Some(format!("training diverged ({e})"));
                                stopped_at = Some(Instant::now());
                                pub_tx.send_replace(Published::stopped(server.step()));
                            }
                            if e != ProtocolError::Stopped {
                                rec.rejected += 1;
                                if let Some(w) = rec.workers.get_mut(worker.index()) {
                                    w.rejected += 1;
                                }
                                rec.log(&Event::Rejected { worker, reason: e.to_string(), time: now.as_secs_f64() })?;
                            }
                            answer.send(Err(e));
                        }
                    }
                }
            },
            _ = tokio::time::sleep_until(sleep_until.into()) => {
                if stopped_at.is_none() {
                    outputs = Some(server.tick(start.elapsed()));
                }
            }
            _ = &mut shutdown, if stopped_at.is_none() => {
                stop_reason = Some("interrupted".into());
                stopped_at = Some(Instant::now());
                pub_tx.send_replace(Published::stopped(server.step()));
            }
        }
        let Some(out) = outputs else { continue };
        for e in &out.events {
            if let (Event::StepApplied { step, loss: Some(l), .. }, Some(limit)) = (e, opts.divergence_loss) {
                if (!l.is_finite() || *l > limit) && stopped_at.is_none() {
                    diverged = true;
                    stop_reason = Some(format!("training diverged (mean loss {l} at step {step}, above {limit})"));
                    stopped_at = Some(Instant::now());
                    pub_tx.send_replace(Published::stopped(server.step()));
                }
            }
            let Some(done) = rec.event(e)? else { continue };
            if opts.eval_every.is_some_and(|k| k > 0 && done.is_multiple_of(k)) {
                let _ = eval_tx.send((done, Arc::new(server.ema().unwrap_or(server.params()).to_vec())));
            }
            if let Some(c) = checkpointer.as_mut() {
                if c.due(done) && !server.is_stopped() {
                    c.request(server.snapshot());
                    // The log reaches at least the checkpoint, so a resumed run can rebuild
                    // its records from it even after SIGKILL.
                    rec.flush_events()?;
                }
            }
            while let Ok((s, ev)) = eval_done_rx.try_recv() {
                rec.evaluation(s, ev)?;
            }
            if let Some(cb) = opts.progress.as_mut() {
                let (seconds, dropped) = (rec.last_step_at, rec.dropped);
                cb(&Progress {
                    step: done,
                    seconds,
                    examples_per_second: rec.examples as f64 / seconds.max(1e-9),
                    loss: rec.rows.last().and_then(|r| r.3),
                    accuracy: rec.evals.values().last().and_then(|e| e.accuracy),
                    dropped,
                    slowest: rec.slowest(),
                });
            }
        }
        for a in out.actions {
            match a {
                Action::SendParams { step, .. } | Action::BroadcastParams { step } => {
                    // Once stopping, "stop" stays published: nothing reopens the run.
                    if stopped_at.is_none() && pub_tx.borrow().step != step {
                        pub_tx.send_replace(Published::new(step, server.params(), opts.encoding, false));
                    }
                }
                Action::Stop { reason } => {
                    if let StopReason::TooFewWorkers { live, needed, missing } = &reason {
                        let names: Vec<String> = missing.iter().map(|w| w.to_string()).collect();
                        stop_reason = Some(format!(
                            "only {live} of the {needed} workers a step needs are alive; missing: {}",
                            names.join(", ")
                        ));
                    }
                    stopped_at = Some(Instant::now());
                    pub_tx.send_replace(Published::stopped(server.step()));
                }
            }
        }
    }
    // Requests still waiting for the loop get their answer now (a stopped run says "stop").
    drop(cmd_rx);
    let _ = grpc_stop_tx.send(());
    // A graceful shutdown waits for open requests; a frozen worker would hold one forever.
    let mut grpc = grpc;
    if tokio::time::timeout(Duration::from_secs(3), &mut grpc).await.is_err() {
        grpc.abort();
    }

    let checkpoint = checkpointer.map(|c| c.finish(server.snapshot())).unwrap_or_default();
    // Final evaluation, then collect every evaluation the thread made.
    if eval_thread.is_some() {
        let _ = eval_tx.send((server.step(), Arc::new(server.ema().unwrap_or(server.params()).to_vec())));
    }
    drop(eval_tx);
    let final_params = server.ema().unwrap_or(server.params()).to_vec();
    let validation = match eval_thread.map(|t| t.join()) {
        Some(Ok(mut ev)) if !diverged => ev.validate(&final_params).ok(),
        _ => None,
    };
    while let Ok((s, ev)) = eval_done_rx.try_recv() {
        rec.evaluation(s, ev)?;
    }
    let last_eval = rec.evals.get(&server.step()).copied();
    let cfg = &opts.config;
    let run_steps = server.step() - start_step;
    let summary = TrainSummary {
        steps: server.step(),
        start_step,
        wall_seconds: rec.last_step_at,
        steps_per_second: if rec.last_step_at > 0.0 { run_steps as f64 / rec.last_step_at } else { 0.0 },
        dropped: rec.dropped,
        accepted: rec.accepted,
        rejected: rec.rejected,
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
    };
    rec.write_files(&summary)?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_run_keeps_the_earlier_records_up_to_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let metrics: String = (1..=5).map(|s| format!("{s},{}.5,{},0.1,,\n", s, 32 * s)).collect();
        std::fs::write(
            d.join("metrics.csv"),
            format!("step,seconds,examples,train_loss,test_loss,test_accuracy\n{metrics}"),
        )
        .unwrap();
        let arrivals: String = (0..5).map(|s| format!("{s},1,0,0.01,true\n")).collect();
        std::fs::write(d.join("arrivals.csv"), format!("step,k,worker,seconds,accepted\n{arrivals}")).unwrap();
        let line = |s: u64| {
            format!("{{\"event\":\"gradient_accepted\",\"step\":{s}}}\n{{\"event\":\"step_applied\",\"step\":{s}}}\n")
        };
        let events: String = (0..5).map(line).collect();
        std::fs::write(d.join("events.jsonl"), &events).unwrap();

        let e = Earlier::read(d, 3, 1, 32).unwrap();
        assert_eq!(e.metrics.len(), 3);
        assert_eq!((e.seconds, e.examples), (3.5, 96));
        assert_eq!(e.arrivals, ["0,1,0,0.01,true", "1,1,0,0.01,true", "2,1,0,0.01,true"]);
        let kept = std::fs::read_to_string(d.join("events.jsonl")).unwrap();
        assert_eq!(kept, (0..3).map(line).collect::<String>(), "events end at the 3rd update");

        // A killed server's log may stop before the checkpointed update, mid-line: the
        // complete lines are kept, the torn one is not.
        std::fs::write(d.join("events.jsonl"), format!("{}{{\"event\":\"step_ap", line(0))).unwrap();
        Earlier::read(d, 3, 1, 32).unwrap();
        assert_eq!(std::fs::read_to_string(d.join("events.jsonl")).unwrap(), line(0));
    }

    #[test]
    fn after_a_sigkill_the_records_the_killed_run_never_wrote_are_rebuilt_from_its_events() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A first run stopped cleanly after 2 updates (its rows and events), then a resumed
        // run made updates 3..=5 on its own clock and was killed before writing any rows.
        std::fs::write(d.join("metrics.csv"), format!("{METRICS_HEADER}\n1,1,32,0.5,,\n2,2,64,0.4,0.3,0.9\n")).unwrap();
        std::fs::write(d.join("arrivals.csv"), format!("{ARRIVALS_HEADER}\n0,1,0,0.1,true\n1,1,0,0.1,true\n")).unwrap();
        let w = WorkerId(0);
        let update = |step: u64, time: f64| {
            [
                Event::GradientAccepted { worker: w, step, k: 1, since_open: 0.25, staleness: 0, time },
                Event::StepApplied {
                    step,
                    contributors: vec![w],
                    duration: 0.25,
                    lr: 0.1,
                    grad_norm: 1.0,
                    loss: Some(0.125),
                    time,
                },
            ]
        };
        let events: String = [update(0, 1.0), update(1, 2.0), update(2, 0.5), update(3, 1.0), update(4, 1.5)]
            .iter()
            .flatten()
            .map(|e| serde_json::to_string(e).unwrap() + "\n")
            .collect();
        std::fs::write(d.join("events.jsonl"), events).unwrap();

        // Resumed again from the checkpoint at 4 updates.
        let e = Earlier::read(d, 4, 1, 32).unwrap();
        assert_eq!(e.metrics, ["1,1,32,0.5,,", "2,2,64,0.4,0.3,0.9", "3,2.5,96,0.125,,", "4,3,128,0.125,,"]);
        assert_eq!((e.seconds, e.examples), (3.0, 128));
        assert_eq!(e.arrivals.len(), 4);
        assert_eq!(e.arrivals[3], "3,1,0,0.25,true");
        // Written back at once, and the log cut after the 4th update.
        let metrics = std::fs::read_to_string(d.join("metrics.csv")).unwrap();
        assert!(metrics.ends_with("3,2.5,96,0.125,,\n4,3,128,0.125,,\n"), "{metrics}");
        let log = std::fs::read_to_string(d.join("events.jsonl")).unwrap();
        assert_eq!(log.lines().count(), 8);
    }

    #[test]
    fn a_worker_talking_to_a_restarted_server_is_told_to_join_again_not_refused() {
        let w = WorkerId(1);
        assert_eq!(status(ProtocolError::NotJoined { worker: w }).code(), tonic::Code::Aborted);
        assert_eq!(status(ProtocolError::FutureStep { worker: w, step: 9, current: 3 }).code(), tonic::Code::Aborted);
        // A worker index the server does not have is a configuration error: refused.
        let unknown = ProtocolError::UnknownWorker { worker: WorkerId(7), workers: 2 };
        assert_eq!(status(unknown).code(), tonic::Code::FailedPrecondition);
    }
}
