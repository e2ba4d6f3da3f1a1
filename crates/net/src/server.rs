//! The parameter server: gRPC handlers that translate, and one loop that owns the state machine.

use crate::checkpoint;
use crate::framing::{CONNECTION_WINDOW, FRAME, STREAM_WINDOW};
use crate::proto::parameter_server_server::ParameterServerServer;
use quorum_compute::Evaluation;
use quorum_core::server::StopReason;
use quorum_core::{Action, Event, ProtocolError, Server, WorkerId};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;

mod checkpointer;
mod options;
mod record;
mod service;

use checkpointer::Checkpointer;
pub use options::{CheckpointOptions, Progress, ProgressFn, ServerOptions, TrainSummary};
use record::Recorder;
pub use service::PushAssembler;
use service::*;

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
        late_notices: opts.config.policy.late_notices(),
        heartbeat: opts.config.liveness.worker_timeout.map(|t| t / 4),
        certificates_name_workers: opts.tls.ca.is_some(),
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
                            (worker, server.handle_from(now, worker, session, msg), Answer::Message(reply))
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
                                rec.event(&Event::Rejected { worker, reason: e.to_string(), time: now.as_secs_f64() })?;
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
            if let Event::StepApplied { step, loss: Some(l), .. } = e {
                if quorum_core::diverged(*l, opts.divergence_loss) && stopped_at.is_none() {
                    let limit = opts.divergence_loss.unwrap_or(f32::INFINITY);
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
                let (seconds, dropped) = (rec.run.last_step_at, rec.run.dropped);
                cb(&Progress {
                    step: done,
                    seconds,
                    examples_per_second: rec.run.examples as f64 / seconds.max(1e-9),
                    loss: rec.run.updates.last().and_then(|u| u.loss),
                    accuracy: rec.evals.values().last().and_then(|e| e.accuracy),
                    dropped,
                    slowest: rec.run.slowest(),
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
        wall_seconds: rec.run.last_step_at,
        steps_per_second: if rec.run.last_step_at > 0.0 { run_steps as f64 / rec.run.last_step_at } else { 0.0 },
        dropped: rec.run.dropped,
        accepted: rec.run.accepted,
        rejected: rec.run.rejected,
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
