//! The parameter server: gRPC handlers that translate, and one loop that owns the state machine.

use crate::proto::parameter_server_server::{ParameterServer, ParameterServerServer};
use crate::proto::*;
use crate::wire::{encode, Assembler, CHUNK_VALUES};
use quorum_compute::GradientSource;
use quorum_core::{Action, Event, ParamLayout, ProtocolError, Server, ServerConfig, ToServer, WorkerId};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// Everything the parameter server needs.
pub struct ServerOptions {
    /// The state machine's configuration (`max_steps` ends the run).
    pub config: ServerConfig,
    /// Parameter layout.
    pub layout: ParamLayout,
    /// Initial parameters.
    pub init: Vec<f32>,
    /// Run directory for events.jsonl, metrics.csv, summary.json, workers.csv.
    pub out: Option<PathBuf>,
    /// Evaluates the parameters (test set) every `eval_every` steps and at the end, off the loop.
    pub evaluator: Option<Box<dyn GradientSource + Send>>,
    /// Evaluation interval in steps.
    pub eval_every: Option<u64>,
    /// Examples per gradient (for the `examples` column).
    pub batch: u64,
    /// Called after every applied step.
    pub progress: Option<ProgressFn>,
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
    /// The worker that contributed least often so far.
    pub slowest: Option<u32>,
}

/// What a finished run reports (`summary.json`).
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// Updates applied.
    pub steps: u64,
    /// Wall seconds from start to the last update.
    pub wall_seconds: f64,
    /// Updates per wall second.
    pub steps_per_second: f64,
    /// Gradients dropped.
    pub dropped: u64,
    /// Gradients used.
    pub accepted: u64,
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
}

#[derive(Clone)]
struct Published {
    step: u64,
    params: Arc<Vec<f32>>,
    stop: bool,
}

type Reply = oneshot::Sender<Result<Vec<Event>, ProtocolError>>;

enum Command {
    Message { worker: WorkerId, msg: ToServer, reply: Reply },
    StopSeen(WorkerId),
}

struct Service {
    commands: mpsc::Sender<Command>,
    published: watch::Receiver<Published>,
    num_params: usize,
    workers: u32,
}

fn status(e: ProtocolError) -> Status {
    match e {
        ProtocolError::UnknownWorker { .. } | ProtocolError::NotJoined { .. } => {
            Status::failed_precondition(e.to_string())
        }
        _ => Status::invalid_argument(e.to_string()),
    }
}

impl Service {
    async fn send(&self, worker: WorkerId, msg: ToServer) -> Result<Result<Vec<Event>, ProtocolError>, Status> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Message { worker, msg, reply })
            .await
            .map_err(|_| Status::unavailable("the parameter server is shutting down"))?;
        rx.await.map_err(|_| Status::unavailable("the parameter server is shutting down"))
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
        match self.send(WorkerId(r.worker), ToServer::Join).await? {
            Ok(_) => {}
            Err(ProtocolError::Stopped) => {}
            Err(e) => return Err(status(e)),
        }
        let p = self.published.borrow().clone();
        Ok(Response::new(JoinReply {
            step: p.step,
            num_params: self.num_params as u64,
            workers: self.workers,
            stop: p.stop,
        }))
    }

    type PullStream = ChunkStream;

    async fn pull(&self, req: Request<PullRequest>) -> Result<Response<ChunkStream>, Status> {
        let r = req.into_inner();
        let mut rx = self.published.clone();
        let p = loop {
            let p = rx.borrow_and_update().clone();
            if p.stop || p.step >= r.min_step {
                break p;
            }
            rx.changed().await.map_err(|_| Status::unavailable("the parameter server is shutting down"))?;
        };
        if p.stop {
            let _ = self.commands.send(Command::StopSeen(WorkerId(r.worker))).await;
            let chunk = ParamsChunk { step: p.step, offset: 0, total: 0, data: Vec::new(), stop: true };
            return Ok(Response::new(Box::pin(tokio_stream::once(Ok(chunk)))));
        }
        let total = p.params.len();
        let chunks = total.div_ceil(CHUNK_VALUES).max(1);
        let stream = tokio_stream::iter(0..chunks).map(move |i| {
            let start = i * CHUNK_VALUES;
            let end = (start + CHUNK_VALUES).min(total);
            Ok(ParamsChunk {
                step: p.step,
                offset: start as u64,
                total: total as u64,
                data: encode(&p.params[start..end]),
                stop: false,
            })
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn push(&self, req: Request<Streaming<GradientChunk>>) -> Result<Response<PushReply>, Status> {
        let mut stream = req.into_inner();
        let mut asm = Assembler::default();
        let mut head: Option<(u32, u64, f32)> = None;
        while let Some(chunk) = stream.next().await {
            let c = chunk?;
            match head {
                None => head = Some((c.worker, c.step, c.loss)),
                Some((w, s, _)) if w != c.worker || s != c.step => {
                    return Err(Status::invalid_argument(format!(
                        "gradient stream mixes worker/step ({w}, {s}) and ({}, {})",
                        c.worker, c.step
                    )));
                }
                Some(_) => {}
            }
            asm.push(c.offset, c.total, &c.data, self.num_params)
                .map_err(|e| Status::invalid_argument(format!("malformed gradient from worker {}: {e}", c.worker)))?;
        }
        let (worker, step, loss) = head.ok_or_else(|| Status::invalid_argument("empty gradient stream"))?;
        let gradient = asm
            .finish()
            .map_err(|e| Status::invalid_argument(format!("malformed gradient from worker {worker}: {e}")))?;
        let loss = (!loss.is_nan()).then_some(loss);
        let events = match self.send(WorkerId(worker), ToServer::Push { step, gradient, loss }).await? {
            Ok(ev) => ev,
            Err(ProtocolError::Stopped) => {
                let _ = self.commands.send(Command::StopSeen(WorkerId(worker))).await;
                return Ok(Response::new(PushReply { outcome: "stopped".into(), step, stop: true }));
            }
            Err(e) => return Err(status(e)),
        };
        let outcome = events
            .iter()
            .find_map(|e| match e {
                Event::GradientAccepted { worker: w, .. } if w.0 == worker => Some("accepted".to_string()),
                Event::GradientDropped { worker: w, reason, .. } if w.0 == worker => Some(match reason {
                    quorum_core::DropReason::Late => "late".to_string(),
                    quorum_core::DropReason::TooStale { .. } => "too_stale".to_string(),
                }),
                _ => None,
            })
            .unwrap_or_else(|| "accepted".into());
        let p = self.published.borrow().clone();
        Ok(Response::new(PushReply { outcome, step: p.step, stop: p.stop }))
    }

    async fn heartbeat(&self, req: Request<HeartbeatRequest>) -> Result<Response<HeartbeatReply>, Status> {
        let w = req.into_inner().worker;
        match self.send(WorkerId(w), ToServer::Heartbeat).await? {
            Ok(_) | Err(ProtocolError::Stopped) => {}
            Err(e) => return Err(status(e)),
        }
        let p = self.published.borrow().clone();
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
    /// The gRPC transport failed.
    #[error("gRPC transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

#[derive(Default, Clone, Serialize)]
struct WorkerRow {
    worker: u32,
    accepted: u64,
    dropped: u64,
    mean_wait_seconds: f64,
}

/// Serves on `listener` until the run finishes (`max_steps`), stalls, or `shutdown` resolves.
pub async fn run_server(
    listener: tokio::net::TcpListener,
    mut opts: ServerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<TrainSummary, NetError> {
    let mut server = Server::new(opts.config.clone(), opts.layout.clone(), std::mem::take(&mut opts.init))?;
    let start = Instant::now();
    let (pub_tx, pub_rx) =
        watch::channel(Published { step: 0, params: Arc::new(server.params().to_vec()), stop: false });
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Command>(1024);
    let (grpc_stop_tx, grpc_stop_rx) = oneshot::channel::<()>();
    let service =
        Service { commands: cmd_tx, published: pub_rx, num_params: opts.layout.len(), workers: opts.config.workers };
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let grpc = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ParameterServerServer::new(service).max_decoding_message_size(8 << 20))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = grpc_stop_rx.await;
            }),
    );

    let mut events_file = match &opts.out {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            Some(std::io::BufWriter::new(std::fs::File::create(dir.join("events.jsonl"))?))
        }
        None => None,
    };
    // Evaluation runs on its own thread so the protocol loop never waits for it.
    let (eval_tx, eval_rx) = std::sync::mpsc::channel::<(u64, Arc<Vec<f32>>)>();
    let (eval_done_tx, eval_done_rx) = std::sync::mpsc::channel::<(u64, quorum_compute::Evaluation)>();
    let eval_thread = opts.evaluator.take().map(|mut ev| {
        std::thread::spawn(move || {
            while let Ok((step, params)) = eval_rx.recv() {
                if let Ok(e) = ev.evaluate(&params) {
                    let _ = eval_done_tx.send((step, e));
                }
            }
        })
    });
    let mut rows: Vec<(u64, f64, u64, Option<f32>)> = Vec::new();
    let mut evals: BTreeMap<u64, quorum_compute::Evaluation> = BTreeMap::new();
    let mut per_worker: Vec<WorkerRow> =
        (0..opts.config.workers).map(|w| WorkerRow { worker: w, ..Default::default() }).collect();
    let mut wait_sum = vec![0.0f64; opts.config.workers as usize];
    let (mut accepted, mut dropped, mut examples) = (0u64, 0u64, 0u64);
    let mut last_step_at = 0.0;
    let mut stop_reason: Option<String> = None;
    let mut stopped_at: Option<Instant> = None;
    let mut acks: BTreeSet<WorkerId> = BTreeSet::new();
    tokio::pin!(shutdown);

    loop {
        if let Some(t) = stopped_at {
            let joined = server.live_workers().len();
            if acks.len() >= joined || t.elapsed() > Duration::from_secs(5) {
                break;
            }
        }
        let wake =
            server.next_wakeup().map(|d| start + d).unwrap_or_else(|| Instant::now() + Duration::from_millis(200));
        let sleep_until = if stopped_at.is_some() { Instant::now() + Duration::from_millis(100) } else { wake };
        let mut outputs = None;
        tokio::select! {
            cmd = cmd_rx.recv() => match cmd {
                Some(Command::Message { worker, msg, reply }) => {
                    let now = start.elapsed();
                    match server.handle(now, worker, msg) {
                        Ok(out) => {
                            let _ = reply.send(Ok(out.events.clone()));
                            outputs = Some(out);
                        }
                        Err(e) => {
                            if e != ProtocolError::Stopped {
                                let ev = Event::Rejected { worker, reason: e.to_string(), time: now.as_secs_f64() };
                                if let Some(f) = events_file.as_mut() {
                                    serde_json::to_writer(&mut *f, &ev).map_err(std::io::Error::other)?;
                                    f.write_all(b"\n")?;
                                }
                            }
                            let _ = reply.send(Err(e));
                        }
                    }
                }
                Some(Command::StopSeen(w)) => { acks.insert(w); }
                None => break,
            },
            _ = tokio::time::sleep_until(sleep_until.into()) => {
                if stopped_at.is_none() {
                    outputs = Some(server.tick(start.elapsed()));
                }
            }
            _ = &mut shutdown, if stopped_at.is_none() => {
                stop_reason = Some("interrupted".into());
                stopped_at = Some(Instant::now());
                pub_tx.send_replace(Published { step: server.step(), params: Arc::new(server.params().to_vec()), stop: true });
            }
        }
        let Some(out) = outputs else { continue };
        for e in &out.events {
            if let Some(f) = events_file.as_mut() {
                serde_json::to_writer(&mut *f, e).map_err(std::io::Error::other)?;
                f.write_all(b"\n")?;
            }
            match e {
                Event::GradientAccepted { worker, since_open, .. } => {
                    accepted += 1;
                    per_worker[worker.index()].accepted += 1;
                    wait_sum[worker.index()] += since_open;
                }
                Event::GradientDropped { worker, .. } => {
                    dropped += 1;
                    per_worker[worker.index()].dropped += 1;
                }
                Event::StepApplied { step, contributors, loss, time, .. } => {
                    examples += contributors.len() as u64 * opts.batch;
                    last_step_at = *time;
                    rows.push((step + 1, *time, examples, *loss));
                    let done = step + 1;
                    if opts.eval_every.is_some_and(|k| done % k == 0) {
                        let _ = eval_tx.send((done, Arc::new(server.ema().unwrap_or(server.params()).to_vec())));
                    }
                    while let Ok((s, ev)) = eval_done_rx.try_recv() {
                        evals.insert(s, ev);
                    }
                    if let Some(cb) = opts.progress.as_mut() {
                        let slowest = per_worker.iter().min_by_key(|w| w.accepted).map(|w| w.worker);
                        cb(&Progress {
                            step: done,
                            seconds: *time,
                            examples_per_second: examples as f64 / time.max(1e-9),
                            loss: *loss,
                            accuracy: evals.values().last().and_then(|e| e.accuracy),
                            dropped,
                            slowest,
                        });
                    }
                }
                _ => {}
            }
        }
        for a in out.actions {
            match a {
                Action::SendParams { step, .. } | Action::BroadcastParams { step } => {
                    if pub_tx.borrow().step != step {
                        pub_tx.send_replace(Published {
                            step,
                            params: Arc::new(server.params().to_vec()),
                            stop: false,
                        });
                    }
                }
                Action::Stop { reason } => {
                    if let quorum_core::server::StopReason::TooFewWorkers { live, needed, missing } = &reason {
                        let names: Vec<String> = missing.iter().map(|w| w.to_string()).collect();
                        stop_reason = Some(format!(
                            "only {live} of the {needed} workers a step needs are alive; missing: {}",
                            names.join(", ")
                        ));
                    }
                    stopped_at = Some(Instant::now());
                    pub_tx.send_replace(Published {
                        step: server.step(),
                        params: Arc::new(server.params().to_vec()),
                        stop: true,
                    });
                }
            }
        }
    }
    let _ = grpc_stop_tx.send(());
    let _ = grpc.await;

    // Final evaluation, then collect every evaluation the thread made.
    let final_params = Arc::new(server.ema().unwrap_or(server.params()).to_vec());
    let has_eval = eval_thread.is_some();
    if has_eval {
        let _ = eval_tx.send((server.step(), final_params));
    }
    drop(eval_tx);
    if let Some(t) = eval_thread {
        let _ = t.join();
    }
    while let Ok((s, ev)) = eval_done_rx.try_recv() {
        evals.insert(s, ev);
    }
    let last_eval = evals.get(&server.step()).copied();
    let cfg = &opts.config;
    let summary = TrainSummary {
        steps: server.step(),
        wall_seconds: last_step_at,
        steps_per_second: if last_step_at > 0.0 { server.step() as f64 / last_step_at } else { 0.0 },
        dropped,
        accepted,
        policy: cfg.policy.name().into(),
        workers: cfg.workers,
        backups: cfg.policy.backups(),
        final_test_accuracy: last_eval.and_then(|e| e.accuracy),
        final_test_loss: last_eval.map(|e| e.loss),
        stop_reason,
    };
    if let Some(dir) = &opts.out {
        if let Some(mut f) = events_file {
            f.flush()?;
        }
        let mut m = std::io::BufWriter::new(std::fs::File::create(dir.join("metrics.csv"))?);
        writeln!(m, "step,seconds,examples,train_loss,test_loss,test_accuracy")?;
        let opt = |v: Option<f32>| v.map(|x| x.to_string()).unwrap_or_default();
        for (step, secs, ex, loss) in &rows {
            let e = evals.get(step);
            writeln!(
                m,
                "{step},{secs},{ex},{},{},{}",
                opt(*loss),
                opt(e.map(|e| e.loss)),
                opt(e.and_then(|e| e.accuracy))
            )?;
        }
        m.flush()?;
        let mut w = std::io::BufWriter::new(std::fs::File::create(dir.join("workers.csv"))?);
        writeln!(w, "worker,accepted,dropped,mean_wait_seconds")?;
        for (r, s) in per_worker.iter().zip(&wait_sum) {
            let mean = if r.accepted > 0 { s / r.accepted as f64 } else { 0.0 };
            writeln!(w, "{},{},{},{mean}", r.worker, r.accepted, r.dropped)?;
        }
        w.flush()?;
        std::fs::write(
            dir.join("summary.json"),
            serde_json::to_string_pretty(&summary).map_err(std::io::Error::other)? + "\n",
        )?;
    }
    Ok(summary)
}
