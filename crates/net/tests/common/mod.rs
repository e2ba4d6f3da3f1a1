//! Gradient sources and cluster set-ups the network tests share.
// Each test crate uses part of this module.
#![allow(dead_code)]

use quorum_compute::{BatchId, ComputeError, Evaluation, GradientSource, LeastSquares};
use quorum_core::{Policy, ServerConfig};
use quorum_net::{run_worker, ServerOptions, WorkerOptions};
use std::sync::Arc;
use std::time::Duration;

type Before = Arc<dyn Fn(BatchId) -> Result<(), ComputeError> + Send + Sync>;
type After = Arc<dyn Fn(BatchId, &mut [f32]) + Send + Sync>;

/// The synthetic model with hooks the test runs around each gradient: before it (to signal,
/// arm a fault, or panic as broken user code would), and after it, on its values (to make
/// them diverge).
#[derive(Clone)]
pub struct Hooked {
    inner: LeastSquares,
    before: Before,
    after: Option<After>,
    /// Stops half-way when told its step closed ([`Hooked::stoppable`]).
    stoppable: bool,
    /// Each computation first takes this long, unless stopped (a slow machine's gradient).
    stuck: std::time::Duration,
}

impl Hooked {
    /// `before` runs before each gradient; an `Err` is the gradient's.
    pub fn new(
        inner: &LeastSquares,
        before: impl Fn(BatchId) -> Result<(), ComputeError> + Send + Sync + 'static,
    ) -> Self {
        Hooked {
            inner: inner.clone(),
            before: Arc::new(before),
            after: None,
            stoppable: false,
            stuck: Default::default(),
        }
    }

    /// `after` rewrites each gradient's values.
    pub fn altering(inner: &LeastSquares, after: impl Fn(BatchId, &mut [f32]) + Send + Sync + 'static) -> Self {
        Hooked {
            inner: inner.clone(),
            before: Arc::new(|_| Ok(())),
            after: Some(Arc::new(after)),
            stoppable: false,
            stuck: Default::default(),
        }
    }

    /// Stops half-way when told its step closed; each computation first takes `stuck` unless
    /// stopped (zero: not stuck).
    pub fn stoppable(self, stuck: std::time::Duration) -> Self {
        Hooked { stoppable: true, stuck, ..self }
    }
}

impl GradientSource for Hooked {
    fn layout(&self) -> &quorum_core::ParamLayout {
        self.inner.layout()
    }
    fn init_params(&self, seed: u64) -> Vec<f32> {
        self.inner.init_params(seed)
    }
    fn batch_size(&self) -> usize {
        self.inner.batch_size()
    }
    fn gradient(&mut self, params: &[f32], batch: BatchId, out: &mut Vec<f32>) -> Result<f32, ComputeError> {
        (self.before)(batch)?;
        let loss = self.inner.gradient(params, batch, out)?;
        if let Some(after) = &self.after {
            after(batch, out);
        }
        Ok(loss)
    }
    fn gradient_into_unless(
        &mut self,
        params: &[f32],
        batch: BatchId,
        out: &mut [f32],
        overtaken: &dyn Fn() -> bool,
    ) -> Result<f32, ComputeError> {
        let until = std::time::Instant::now() + self.stuck;
        while self.stoppable && std::time::Instant::now() < until {
            if overtaken() {
                return Err(ComputeError::Abandoned);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.gradient_into(params, batch, out)
    }
    fn can_abandon(&self) -> bool {
        self.stoppable
    }
    fn evaluate(&mut self, params: &[f32]) -> Result<Evaluation, ComputeError> {
        self.inner.evaluate(params)
    }
}

/// A server's options for `workers` workers of the synthetic model (64 values) under `policy`
/// for `steps` steps, time-outs short enough for tests, the record in `out` if given; and the
/// model, for the workers.
pub fn options(
    workers: u32,
    policy: Policy,
    steps: u64,
    out: Option<std::path::PathBuf>,
) -> (ServerOptions, LeastSquares) {
    let src = LeastSquares::new(64, 16, 0.1, 1);
    let mut cfg = ServerConfig::new(workers, policy, 0.2);
    cfg.max_steps = Some(steps);
    cfg.liveness.stall_timeout = Some(Duration::from_secs(10));
    cfg.liveness.worker_timeout = Some(Duration::from_secs(2));
    let mut opts = ServerOptions::new(cfg, src.layout().clone(), src.init_params(0));
    opts.out = out;
    opts.evaluator = Some(Box::new(src.clone()));
    opts.batch = 16;
    (opts, src)
}

/// A server with `opts` on a free loopback port, running until its run ends: its task and
/// its address.
pub async fn serve(
    opts: ServerOptions,
) -> (tokio::task::JoinHandle<Result<quorum_net::TrainSummary, quorum_net::server::NetError>>, std::net::SocketAddr) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (tokio::spawn(quorum_net::run_server(listener, opts, std::future::pending())), addr)
}

/// Worker `i` of the synthetic model, started against the server at `addr`.
pub fn worker(
    i: u32,
    addr: std::net::SocketAddr,
    src: &LeastSquares,
) -> tokio::task::JoinHandle<Result<quorum_net::worker::WorkerReport, quorum_net::worker::WorkerError>> {
    let mut wo = WorkerOptions::new(i, format!("http://{addr}"));
    wo.connect_timeout = Duration::from_secs(5);
    tokio::spawn(run_worker(wo, Box::new(src.clone()) as Box<dyn GradientSource + Send>))
}
