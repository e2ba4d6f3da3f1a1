//! The gRPC side: handlers that only translate wire messages into commands for the loop,
//! push reassembly into kept buffers, and the routes that serve pushes and pulls without
//! codec copies.

use crate::encoding::{Assembler, Encoding, CHUNK_VALUES};
use crate::proto::parameter_server_server::{ParameterServer, ParameterServerServer};
use crate::proto::*;
use crate::shm::SharedRegion;
use quorum_core::{DropReason, Event, ProtocolError, ToServer, WorkerId};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::Stream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

#[derive(Clone)]
pub(super) struct Published {
    pub(super) step: u64,
    /// The pull's response body: the parameters encoded in wire chunks, each behind its
    /// message prefix ([`crate::framing::chunk_frames`]); built once per step, shared by every
    /// pull. With shared memory, built only if a pull over gRPC asks (from the step's slot).
    frames: Arc<std::sync::OnceLock<Arc<Vec<bytes::Bytes>>>>,
    pub(super) stop: bool,
    /// The parameters are in the shared memory's slot for `step`.
    pub(super) in_shm: bool,
    enc: Encoding,
}

impl Published {
    /// The parameters of `step`: written to the shared memory where there is one, else
    /// encoded for pulls at once.
    pub(super) fn new(step: u64, params: &[f32], enc: Encoding, shm: Option<&SharedRegion>) -> Self {
        match shm {
            Some(region) => {
                region.publish(step, params);
                Published { step, frames: Default::default(), stop: false, in_shm: true, enc }
            }
            None => Self::encoded(step, params, enc, false),
        }
    }

    fn encoded(step: u64, params: &[f32], enc: Encoding, stop: bool) -> Self {
        let frames = Arc::new(std::sync::OnceLock::from(Arc::new(pull_body(step, params, enc, stop))));
        Published { step, frames, stop, in_shm: false, enc }
    }

    /// "Stop", with the final parameters: a worker stops at the first chunk; an evaluator
    /// reads them all and evaluates the final step.
    pub(super) fn stopped(step: u64, params: &[f32], enc: Encoding) -> Self {
        Self::encoded(step, params, enc, true)
    }

    /// The body of a pull over gRPC; `None` if the parameters were only in shared memory and
    /// their slot has been rewritten since (by a later step, published by now or soon).
    pub(super) fn frames(&self, shm: Option<&SharedRegion>) -> Option<Arc<Vec<bytes::Bytes>>> {
        if let Some(f) = self.frames.get() {
            return Some(f.clone());
        }
        let mut params = Vec::new();
        shm?.read_params(self.step, &mut params).ok()?;
        Some(self.frames.get_or_init(|| Arc::new(pull_body(self.step, &params, self.enc, self.stop))).clone())
    }
}

/// The parameters in wire chunks, each chunk flagged `stop` or not.
fn pull_body(step: u64, params: &[f32], enc: Encoding, stop: bool) -> Vec<bytes::Bytes> {
    let chunks = enc.encode_chunks(params.to_vec());
    let mut frames = Vec::with_capacity(2 * chunks.len());
    for (i, data) in chunks.into_iter().enumerate() {
        let fields = ParamsChunk {
            step,
            offset: (i * CHUNK_VALUES) as u64,
            total: params.len() as u64,
            data: Default::default(),
            stop,
            bf16: enc == Encoding::Bf16,
            shm: false,
            shm_nonce: 0,
        };
        frames.extend(crate::framing::chunk_frames(&fields, crate::framing::PARAMS_DATA, data));
    }
    frames
}

pub(super) type Reply = oneshot::Sender<Result<Vec<Event>, ProtocolError>>;

/// The answer to a push (`Err`: a push through shared memory whose slot no longer holds the
/// gradient it names), with the receive buffer handed back for the next push.
pub(super) type PushAnswer = oneshot::Sender<(Result<Result<Vec<Event>, ProtocolError>, Status>, Values)>;

/// A pushed gradient's values as the loop gets them.
pub(super) enum Values {
    /// Reassembled from the push's chunks into a kept buffer, handed back with the answer.
    Buffer(Vec<f32>),
    /// In the pushing worker's slot of the shared memory, written as `seq`: the loop adds them
    /// up from there ([`crate::shm::SharedRegion::gradient`]), no copy made.
    Shared { seq: u64 },
}

/// A push through shared memory whose slot does not hold the gradient it names: the worker
/// is told to join again ("aborted", as a worker unknown here is), since its push may have
/// reached a restarted server, whose file (if any) it has not opened.
pub(super) fn slot_refused(worker: WorkerId, step: u64, e: crate::shm::SlotError) -> Status {
    Status::aborted(format!(
        "worker {}'s gradient of step {step} in shared memory: {e} (the server may have restarted: join again)",
        worker.0
    ))
}

/// Seconds a worker reports with a gradient: computing it, and moving bytes for it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Timing {
    pub(super) compute: f64,
    pub(super) transfer: f64,
    /// A notice of a computation stopped half-way: nothing to time.
    pub(super) abandoned: bool,
}

pub(super) enum Command {
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
        gradient: Values,
        loss: Option<f32>,
        timing: Timing,
        reply: PushAnswer,
    },
    StopSeen(WorkerId),
    /// Shard 0: another shard asks to follow the coordinator; its commits go to `stream`.
    Follow {
        hello: ShardReport,
        stream: super::rule::CommitStream,
        reply: oneshot::Sender<Result<(), String>>,
    },
    /// Shard 0: a follower holds a worker's slice.
    Report(ShardReport),
    /// A follower: the coordinator committed a step, or stopped the run.
    Commit(CommitNotice),
    /// A sharded run's link between a shard and the coordinator broke.
    LinkLost(String),
    /// An evaluator asked for parameters: it will report the final step's figures.
    EvaluatorPulled,
    /// An evaluator got the parameters of this step (a shard that takes no reports may go
    /// once it has the final step's).
    EvaluatorGot(u64),
    /// An evaluator's figures for the parameters after `step` updates; the reply: stopped.
    Evaluation {
        step: u64,
        evaluation: quorum_compute::Evaluation,
        reply: oneshot::Sender<bool>,
    },
}

/// Where the loop sends a command's result.
pub(super) enum Answer {
    Message(Reply),
    Push(PushAnswer, Values),
}

impl Answer {
    pub(super) fn send(self, r: Result<Vec<Event>, ProtocolError>) {
        // A requester that went away needs no answer.
        match self {
            Answer::Message(tx) => drop(tx.send(r)),
            Answer::Push(tx, values) => drop(tx.send((Ok(r), values))),
        }
    }
}

/// Receive buffers for pushed gradients, and a bound on how many pushes are reassembled at
/// once: gradients in flight cost the server `permits` model-sized buffers however many
/// workers there are (a push waiting for a permit holds only its HTTP/2 stream window).
/// Kept buffers are reused, so a push neither allocates nor page-faults a fresh one.
pub(super) struct GradientBuffers {
    pub(super) free: std::sync::Mutex<Vec<Vec<f32>>>,
    pub(super) permits: tokio::sync::Semaphore,
}

impl GradientBuffers {
    pub(super) fn new(permits: usize) -> Self {
        GradientBuffers { free: Default::default(), permits: tokio::sync::Semaphore::new(permits) }
    }

    pub(super) fn take(&self) -> Vec<f32> {
        self.free.lock().expect("buffer pool lock").pop().unwrap_or_default()
    }

    pub(super) fn give_back(&self, buffer: Vec<f32>) {
        self.free.lock().expect("buffer pool lock").push(buffer);
    }
}

/// Pushes reassembled at once: enough to keep every core decoding, few enough that memory
/// does not grow with the number of workers.
pub(super) fn push_permits() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(2, 8)
}

/// The next chunk of a push (its fields and data pieces), waiting at most `idle` for it: a
/// worker frozen mid-push must not keep its receive buffer (and permit) forever.
pub(super) async fn next_chunk(
    push: &mut crate::framing::Messages<tonic::body::Body>,
    idle: Duration,
) -> Result<Option<(GradientChunk, crate::framing::Segments)>, Status> {
    match tokio::time::timeout(idle, push.next_chunk(crate::framing::GRADIENT_DATA)).await {
        Ok(chunk) => chunk,
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no chunk of the pushed gradient for {:.0} s: push abandoned",
            idle.as_secs_f64()
        ))),
    }
}

pub(super) struct Service {
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) published: watch::Receiver<Published>,
    pub(super) num_params: usize,
    /// Values a push carries: the model's, or a shard's range of them.
    pub(super) push_len: usize,
    /// A sharded run: this server's shard, how many there are, and its range of the parameters.
    pub(super) shard: (u32, u32, std::ops::Range<usize>),
    /// The model's layout, which a joining worker's must equal.
    pub(super) layout: quorum_core::ParamLayout,
    pub(super) workers: u32,
    pub(super) encoding: Encoding,
    pub(super) buffers: Arc<GradientBuffers>,
    /// A push whose next chunk takes longer than this is abandoned.
    pub(super) chunk_timeout: Duration,
    /// Whether workers should check for, and report empty, gradients whose step has closed.
    pub(super) late_notices: bool,
    /// Workers may abandon overtaken computations ([`quorum_core::Policy::abandon`]).
    pub(super) abandon: bool,
    /// Mutual TLS: a worker's certificate must name the index it joins as.
    pub(super) certificates_name_workers: bool,
    /// The heartbeat interval workers are told (a quarter of the worker time-out).
    pub(super) heartbeat: Option<Duration>,
    /// Shared memory offered to workers on this host.
    pub(super) shm: Option<Arc<SharedRegion>>,
}

pub(super) fn status(e: ProtocolError) -> Status {
    match e {
        // A worker that is not joined here, or ahead of this server's step, is talking to a
        // restarted server (its channel reconnected on its own): "aborted" makes it join again.
        ProtocolError::NotJoined { .. } | ProtocolError::FutureStep { .. } => {
            Status::aborted(format!("{e} (the server may have restarted: join again)"))
        }
        ProtocolError::UnknownWorker { .. } => Status::failed_precondition(e.to_string()),
        // The index is held by a live process: a restarted worker waits for it to time out.
        ProtocolError::IndexInUse { .. } | ProtocolError::NotConfirmed { .. } => Status::already_exists(e.to_string()),
        ProtocolError::WrongSession { .. } => Status::permission_denied(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

pub(super) fn shutting_down<T>(_: T) -> Status {
    Status::unavailable("the parameter server is shutting down")
}

impl Service {
    pub(super) async fn send(
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
    pub(super) async fn receive_push(
        &self,
        body: tonic::body::Body,
    ) -> Result<(GradientChunk, Result<Vec<Event>, ProtocolError>), Status> {
        let idle = self.chunk_timeout;
        // Wait for a permit before reading anything, so a waiting push holds no more than its
        // HTTP/2 stream window.
        let _permit = self.buffers.permits.acquire().await.map_err(shutting_down)?;
        let mut push = crate::framing::Messages::new(body, tonic::Code::InvalidArgument);
        let mut next = next_chunk(&mut push, idle).await?;
        let first_at = Instant::now();
        let (head, gradient) = match next {
            Some((chunk, _)) if chunk.shm => {
                let gradient = self.shared(&chunk)?;
                if next_chunk(&mut push, idle).await?.is_some() {
                    return Err(Status::invalid_argument("a push through shared memory is one chunk"));
                }
                (chunk, gradient)
            }
            _ => {
                let mut asm = PushAssembler::with_buffer(self.push_len, self.buffers.take());
                while let Some((chunk, data)) = next {
                    asm.add(chunk, &data).map_err(|e| Status::invalid_argument(e.to_string()))?;
                    next = next_chunk(&mut push, idle).await?;
                }
                let (chunk, values) = asm.finish().map_err(|e| Status::invalid_argument(e.to_string()))?;
                (chunk, Values::Buffer(values))
            }
        };
        let timing = Timing {
            compute: head.compute_seconds,
            transfer: head.pull_seconds + first_at.elapsed().as_secs_f64(),
            abandoned: head.abandoned,
        };
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
        let Some((result, values)) = answer else {
            // The loop has ended. After a stop that is an answer ("stop"), not a broken link:
            // the worker may have heard "stop" through its next pull while this push was on the way.
            if self.published.borrow().stop {
                return Ok((head, Err(ProtocolError::Stopped)));
            }
            return Err(shutting_down(()));
        };
        if let Values::Buffer(buffer) = values {
            self.buffers.give_back(buffer);
        }
        Ok((head, result?))
    }

    /// A gradient pushed through shared memory, checked: the loop reads it in the worker's
    /// slot. A server without shared memory tells the worker to join again ([`slot_refused`]'s
    /// reason).
    fn shared(&self, c: &GradientChunk) -> Result<Values, Status> {
        let Some(region) = &self.shm else {
            return Err(Status::aborted(
                "this server offers no shared memory (it may have restarted): join again, and push the gradient's values",
            ));
        };
        if c.total as usize != region.len() {
            return Err(Status::invalid_argument(format!(
                "a gradient of {} values in shared memory; the model has {}",
                c.total,
                region.len()
            )));
        }
        Ok(Values::Shared { seq: c.shm_seq })
    }
}

impl Service {
    /// `ParameterServer.Pull`: waits for parameters of at least the asked step, then streams
    /// the step's shared pieces ([`Published::frames`]), not copied per worker.
    pub(super) async fn pull_http(&self, body: tonic::body::Body) -> Result<Vec<bytes::Bytes>, Status> {
        let r: PullRequest = crate::framing::read_request(body, self.chunk_timeout).await?;
        if r.worker == crate::evaluate::EVALUATOR {
            self.commands.send(Command::EvaluatorPulled).await.map_err(shutting_down)?;
        }
        let mut rx = self.published.clone();
        let (p, body) = loop {
            let p = rx.borrow_and_update().clone();
            if !p.stop && p.step < r.min_step {
                rx.changed().await.map_err(shutting_down)?;
                continue;
            }
            if let Some(region) = self.shm.as_ref().filter(|_| r.shm && p.in_shm && !p.stop) {
                let (step, total, shm_nonce) = (p.step, region.len() as u64, region.nonce());
                let fields = ParamsChunk { step, total, shm: true, shm_nonce, ..Default::default() };
                break (p, vec![crate::framing::message_frame(&fields)]);
            }
            match p.frames(self.shm.as_deref()) {
                Some(frames) => break (p, frames.to_vec()),
                // Overtaken while encoded: take the newer step's.
                None => tokio::task::yield_now().await,
            }
        };
        // (An evaluator's pull names no worker index: it is not one of the workers to tell.)
        if p.stop && r.worker < self.workers {
            let _ = self.commands.send(Command::StopSeen(WorkerId(r.worker))).await;
        }
        if r.worker == crate::evaluate::EVALUATOR {
            let _ = self.commands.send(Command::EvaluatorGot(p.step)).await;
        }
        Ok(body)
    }

    /// `ParameterServer.Push`, read from the HTTP/2 body without tonic's codec copies
    /// ([`crate::framing`]); same messages, same statuses.
    pub(super) async fn push_http(&self, body: tonic::body::Body) -> Result<PushReply, Status> {
        let (head, result) = self.receive_push(body).await?;
        let (worker, step) = (head.worker, head.step);
        let events = match result {
            Ok(ev) => ev,
            Err(ProtocolError::Stopped) => {
                let _ = self.commands.send(Command::StopSeen(WorkerId(worker))).await;
                return Ok(PushReply { outcome: PushOutcome::Stopped.into(), step, stop: true });
            }
            Err(e) => return Err(status(e)),
        };
        let outcome = events
            .iter()
            .find_map(|e| match e {
                Event::GradientAccepted { worker: w, .. } if w.0 == worker => Some(PushOutcome::Accepted),
                Event::GradientRepeated { worker: w, .. } if w.0 == worker => Some(PushOutcome::AlreadyAccepted),
                Event::GradientDropped { worker: w, reason, .. } if w.0 == worker => Some(match reason {
                    DropReason::Late => PushOutcome::Late,
                    DropReason::TooStale { .. } => PushOutcome::TooStale,
                }),
                _ => None,
            })
            .unwrap_or(PushOutcome::Accepted);
        let p = self.published.borrow().clone();
        if p.stop {
            let _ = self.commands.send(Command::StopSeen(WorkerId(worker))).await;
        }
        Ok(PushReply { outcome: outcome.into(), step: p.step, stop: p.stop })
    }
}

/// The gRPC service as served: `Push` and `Pull` by [`Service::push_http`] and
/// [`Service::pull_http`] (no codec copies, [`crate::framing`]), `Join` and `Heartbeat` by
/// tonic's generated server; the token checked on all of them.
#[derive(Clone)]
pub(super) struct Routes {
    pub(super) generated: InterceptedService<ParameterServerServer<Service>, crate::auth::CheckToken>,
    pub(super) service: Arc<Service>,
    pub(super) token: crate::auth::CheckToken,
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
            crate::framing::PULL_PATH => true,
            crate::framing::PUSH_PATH => false,
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
                service.push_http(req.into_body()).await.map(|reply| vec![crate::framing::message_frame(&reply)])
            };
            Ok(match answer {
                Ok(pieces) => crate::framing::response(pieces),
                Err(s) => s.into_http(),
            })
        })
    }
}

pub(super) type ChunkStream = Pin<Box<dyn Stream<Item = Result<ParamsChunk, Status>> + Send>>;

#[tonic::async_trait]
impl ParameterServer for Service {
    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<JoinReply>, Status> {
        if self.certificates_name_workers {
            let index = req.get_ref().worker;
            let certs = req.peer_certs();
            if !certs.as_deref().and_then(|c| c.first()).is_some_and(|c| crate::tls::names_worker(c, index)) {
                return Err(Status::permission_denied(format!(
                    "this worker's certificate does not name worker index {index}: under mutual TLS each worker \
                     needs a certificate of its own with the DNS name {} among its subject alternative names",
                    crate::tls::worker_name(index)
                )));
            }
        }
        let r = req.into_inner();
        // The layout says more (which tensor differs) than the count: check it first.
        if !r.layout.is_empty() {
            let theirs: Vec<(String, Vec<usize>)> =
                r.layout.iter().map(|t| (t.name.clone(), t.shape.iter().map(|&d| d as usize).collect())).collect();
            if let Some(diff) = self.layout.difference(&theirs) {
                return Err(Status::failed_precondition(format!(
                    "worker {} has another model than the server's: {diff} (\"here\" is the server); start \
                     every worker with the model the server was started with",
                    r.worker
                )));
            }
        }
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
            shard: self.shard.0,
            shards: self.shard.1,
            start: self.shard.2.start as u64,
            end: self.shard.2.end as u64,
            shm_path: self.shm.as_ref().map_or(String::new(), |r| r.path().display().to_string()),
            shm_nonce: self.shm.as_ref().map_or(0, |r| r.nonce()),
            abandon: self.abandon,
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
            Ok(_) => tracing::info!("worker {} left: {}", WorkerId(r.worker), r.reason),
            Err(ProtocolError::Stopped) => {}
            Err(e) => return Err(status(e)),
        }
        Ok(Response::new(LeaveReply {}))
    }

    async fn report(&self, req: Request<EvaluationReport>) -> Result<Response<ReportReply>, Status> {
        let r = req.into_inner();
        if !r.loss.is_finite() && !r.loss.is_nan() {
            return Err(Status::invalid_argument(format!("evaluation loss {} is not a number", r.loss)));
        }
        if r.has_accuracy && !(0.0..=1.0).contains(&r.accuracy) {
            return Err(Status::invalid_argument(format!(
                "accuracy {} is outside [0, 1]: report a fraction, not a percentage",
                r.accuracy
            )));
        }
        let evaluation = quorum_compute::Evaluation { loss: r.loss, accuracy: r.has_accuracy.then_some(r.accuracy) };
        let (reply, rx) = oneshot::channel();
        self.commands.send(Command::Evaluation { step: r.step, evaluation, reply }).await.map_err(shutting_down)?;
        let stop = rx.await.map_err(shutting_down)?;
        Ok(Response::new(ReportReply { stop, step: self.published.borrow().step }))
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

/// A push whose chunks do not make one gradient.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MalformedPush {
    /// The chunks' values do not add up.
    #[error("malformed gradient from worker {worker}: {source}")]
    Chunks {
        /// The sender.
        worker: u32,
        /// What is wrong.
        source: crate::encoding::ChunkError,
    },
    /// The chunks name different workers or steps.
    #[error(
        "malformed gradient from worker {worker}: the stream mixes worker/step ({first_worker}, {first_step}) and ({worker}, {step})"
    )]
    Mixed {
        /// The first chunk's worker.
        first_worker: u32,
        /// The first chunk's step.
        first_step: u64,
        /// This chunk's worker.
        worker: u32,
        /// This chunk's step.
        step: u64,
    },
    /// No chunk at all.
    #[error("empty gradient stream")]
    Empty,
}

/// Reassembles one pushed gradient from its stream of chunks, checking everything a
/// worker could get wrong (offsets, totals, lengths, mixed senders) before anything reaches
/// the protocol loop. Synchronous and free of I/O, so the fuzz target drives exactly this.
#[derive(Debug)]
pub struct PushAssembler {
    pub(super) asm: Assembler,
    pub(super) head: Option<GradientChunk>,
    pub(super) num_params: usize,
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

    /// Adds the next chunk: its fields (as [`crate::framing::parse_gradient_chunk`] gives them,
    /// `data` empty) and its data bytes, in the pieces they arrived in.
    pub fn add(&mut self, c: GradientChunk, data: &crate::framing::Segments) -> Result<(), MalformedPush> {
        let worker = c.worker;
        let parts: Vec<&[u8]> = data.parts().collect();
        let enc = Encoding::from_flag(c.bf16);
        self.asm
            .push_parts(c.offset, c.total, &parts, enc, self.num_params)
            .map_err(|source| MalformedPush::Chunks { worker, source })?;
        match &self.head {
            None => self.head = Some(GradientChunk { data: bytes::Bytes::new(), ..c }),
            Some(h) if h.worker != c.worker || h.step != c.step => {
                return Err(MalformedPush::Mixed { first_worker: h.worker, first_step: h.step, worker, step: c.step });
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// The first chunk (worker, step, loss, timings; without data) and the gradient.
    pub fn finish(self) -> Result<(GradientChunk, Vec<f32>), MalformedPush> {
        let head = self.head.ok_or(MalformedPush::Empty)?;
        let worker = head.worker;
        let gradient = self.asm.finish().map_err(|source| MalformedPush::Chunks { worker, source })?;
        Ok((head, gradient))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
