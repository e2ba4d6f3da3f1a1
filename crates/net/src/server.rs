//! The parameter server: gRPC handlers that translate, and one loop that owns the state machine.

use crate::checkpoint;
use crate::framing::FRAME;
use crate::proto::coordinator_server::CoordinatorServer;
use crate::proto::parameter_server_server::ParameterServerServer;
use quorum_core::{Coordinator, Server, Shard};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;

pub mod agree;
mod checkpointer;
mod driver;
mod evaluator;
mod follow;
mod options;
mod record;
mod rule;
mod service;

use driver::{Driver, StopCause};
pub use options::{CheckpointOptions, Progress, ProgressFn, ServerOptions, ShardOptions, TrainSummary};
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
    /// The shards could not agree on the step a resumed run starts from.
    #[error("{0}")]
    Agree(String),
}

/// Serves on `listener` until the run finishes (`max_steps`), stalls, or `shutdown` resolves.
/// Every way out writes the run directory and (when configured) a final checkpoint.
pub async fn run_server(
    listener: tokio::net::TcpListener,
    mut opts: ServerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<TrainSummary, NetError> {
    let (cmd_tx, mut cmd_rx) = mpsc::channel::<Command>(1024);
    let (rule, link) = rule(&mut opts)?;
    let driver_start = rule.step();
    let start = Instant::now();
    let shm = shared_memory(&opts);
    let (pub_tx, pub_rx) = watch::channel(Published::new(rule.step(), rule.params(), opts.encoding, shm.as_deref()));
    let shard = match &opts.shard {
        Some(s) => (s.index, s.plan.shards(), s.plan.range(s.index)),
        None => (0, 1, 0..opts.layout.len()),
    };
    if let (Some((hello, reports)), Some(s)) = (link, &opts.shard) {
        let mut to = crate::worker::WorkerOptions::new(s.index, s.coordinator.clone().unwrap_or_default());
        to.token = opts.token.clone();
        to.tls = opts.tls.clone();
        tokio::spawn(follow::follow_coordinator(to, hello, reports, cmd_tx.clone()));
    }
    let (grpc_stop_tx, grpc_stop_rx) = oneshot::channel::<()>();
    let service = Service {
        commands: cmd_tx.clone(),
        published: pub_rx,
        num_params: opts.layout.len(),
        push_len: shard.2.len(),
        shard,
        layout: opts.layout.clone(),
        workers: opts.config.workers,
        encoding: opts.encoding,
        buffers: Arc::new(GradientBuffers::new(push_permits())),
        chunk_timeout: opts.config.liveness.worker_timeout.unwrap_or(Duration::from_secs(30)),
        // Only when a step can close without some worker's gradient (not sync without backups).
        late_notices: opts.config.policy.late_notices(),
        abandon: opts.config.policy.abandon(),
        heartbeat: opts.config.liveness.worker_timeout.map(|t| t / 4),
        certificates_name_workers: opts.tls.ca.is_some(),
        shm: shm.clone(),
    };
    let service = Arc::new(service);
    let token = crate::auth::CheckToken(opts.token.clone());
    let coordinator = follow::CoordinatorService { commands: cmd_tx, start: driver_start };
    let routes = Routes {
        generated: InterceptedService::new(
            ParameterServerServer::from_arc(service.clone()).max_decoding_message_size(8 << 20),
            token.clone(),
        ),
        service,
        token: token.clone(),
    };
    // Small messages (replies, the last chunk) must not wait for Nagle's algorithm.
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|s| {
        let s = s?;
        s.set_nodelay(true)?;
        Ok::<_, std::io::Error>(s)
    });
    // Parameters and gradients are megabytes: HTTP/2's fixed 64 KiB default window would
    // make every transfer wait for window updates.
    let mut builder = opts.window.server(tonic::transport::Server::builder());
    if let Some(tls) = opts.tls.server()? {
        builder = builder.tls_config(tls)?;
    }
    let grpc = tokio::spawn(
        builder
            .max_frame_size(FRAME)
            .add_service(routes)
            .add_service(InterceptedService::new(CoordinatorServer::new(coordinator), token))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = grpc_stop_rx.await;
            }),
    );

    let mut driver = Driver::new(rule, opts, start, pub_tx, shm)?;
    tokio::pin!(shutdown);
    // The loop only selects and dispatches; the driver does the rest.
    loop {
        if driver.may_exit() {
            break;
        }
        let tick_at = driver.next_tick();
        let outputs = tokio::select! {
            cmd = cmd_rx.recv() => match cmd {
                Some(cmd) => driver.on_command(cmd)?,
                None => break,
            },
            _ = tokio::time::sleep_until(tick_at.into()) => driver.on_tick(),
            _ = &mut shutdown, if !driver.is_stopping() => {
                driver.begin_stop(StopCause::Interrupted);
                None
            }
        };
        if let Some(out) = outputs {
            driver.carry_out(out)?;
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
    driver.finish()
}

/// The shared memory this server offers the workers on its host: for one server (not a
/// shard) sending `f32` values, unless turned off; none (gRPC only) if it cannot be made.
fn shared_memory(opts: &ServerOptions) -> Option<Arc<crate::shm::SharedRegion>> {
    if !opts.shared_memory || opts.shard.is_some() || opts.encoding != crate::Encoding::F32 {
        return None;
    }
    match crate::shm::SharedRegion::create(opts.layout.len(), opts.config.workers as usize) {
        Ok(r) => {
            tracing::debug!("workers on this host move parameters and gradients through {}", r.path().display());
            Some(Arc::new(r))
        }
        Err(e) => {
            tracing::warn!("no shared memory for workers on this host ({e}): every worker uses gRPC alone");
            None
        }
    }
}

/// What a follower's link task starts with: its hello and the reports the loop sends it.
type Link = (crate::proto::ShardReport, mpsc::UnboundedReceiver<crate::proto::ShardReport>);

/// The state machine(s) this server runs: the one server, or its shard (shard 0 with the
/// coordinator; another shard with the link it reports over).
fn rule(opts: &mut ServerOptions) -> Result<(rule::Rule, Option<Link>), NetError> {
    let Some(s) = opts.shard.clone().filter(|s| s.plan.shards() > 1) else {
        opts.shard = None;
        let server = match opts.restore.take() {
            Some(snap) => Server::restore(opts.config.clone(), opts.layout.clone(), snap)?,
            None => Server::new(opts.config.clone(), opts.layout.clone(), std::mem::take(&mut opts.init))?,
        };
        return Ok((rule::Rule::One(Box::new(server)), None));
    };
    if s.plan.len() != opts.layout.len() {
        return Err(quorum_core::ConfigError::invalid("the shard plan does not cover the model's layout").into());
    }
    let range = s.plan.range(s.index);
    let aggregate = opts.restore.as_ref().map_or(opts.config.policy.aggregate_hint(), |r| r.aggregate);
    let shard = match opts.restore.take() {
        Some(snap) => Shard::restore(&opts.config, &s.plan, s.index, snap)?,
        None => Shard::new(&opts.config, &s.plan, s.index, opts.init[range.clone()].to_vec())?,
    };
    opts.init = Vec::new();
    let shards = s.plan.shards();
    if s.index == 0 {
        let coordinator = Coordinator::restore(opts.config.clone(), shards, shard.step(), aggregate)?;
        let followers = (0..shards).map(|_| None).collect();
        let role = rule::Role::Coordinator { coordinator: Box::new(coordinator), followers };
        return Ok((rule::Rule::Shard(Box::new(rule::Sharded { shard, role })), None));
    }
    if s.coordinator.is_none() {
        return Err(quorum_core::ConfigError::invalid(format!(
            "shard {} needs the coordinator's address (shard 0's)",
            s.index
        ))
        .into());
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let hello = crate::proto::ShardReport {
        shard: s.index,
        shards,
        step: shard.step(),
        start: range.start as u64,
        end: range.end as u64,
        total: s.plan.len() as u64,
        ..Default::default()
    };
    let sessions = vec![None; opts.config.workers as usize];
    let timeout = opts.config.liveness.worker_timeout.unwrap_or(Duration::from_secs(30));
    let role = rule::Role::Follower { link: tx, sessions, timeout, stopped: false };
    Ok((rule::Rule::Shard(Box::new(rule::Sharded { shard, role })), Some((hello, rx))))
}
