//! What `run_server` is given (options, checkpoint and progress settings) and what it
//! reports (the run's summary).

use crate::encoding::Encoding;
use quorum_compute::GradientSource;
use quorum_core::{ParamLayout, ServerConfig, ServerSnapshot, ShardPlan};
use serde::Serialize;
use std::path::PathBuf;

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
    /// The HTTP/2 flow-control windows (default: sized to the link).
    pub window: crate::framing::Window,
    /// Stop as diverged once a step's mean loss is non-finite or above this, or a gradient is
    /// refused for non-finite values (use `f32::INFINITY` for "non-finite only"); `None`: the
    /// refused gradients are only counted.
    pub divergence_loss: Option<f32>,
    /// A sharded run: which shard this server is (`None`: the one server of the run).
    pub shard: Option<ShardOptions>,
    /// Offer workers on this host shared memory for parameters and gradients ([`crate::shm`];
    /// one server, `f32` values); workers elsewhere use gRPC either way.
    pub shared_memory: bool,
}

/// One shard of a sharded run.
#[derive(Debug, Clone)]
pub struct ShardOptions {
    /// This server's shard, `0..plan.shards()`; shard 0 runs the coordinator.
    pub index: u32,
    /// How the parameters are split over the shards.
    pub plan: ShardPlan,
    /// Every shard but 0: shard 0's address, e.g. `http://10.0.0.1:7070`.
    pub coordinator: Option<String>,
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
            window: crate::framing::Window::default(),
            divergence_loss: None,
            shard: None,
            shared_memory: true,
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
    /// A sharded run: this shard's final parameters (its range; the EMA where kept), for a
    /// caller that puts the model together. Not in summary.json.
    #[serde(skip)]
    pub shard_params: Option<Vec<f32>>,
}
