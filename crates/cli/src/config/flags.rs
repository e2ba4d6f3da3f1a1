//! Flags: the same keys as the configuration file, and the one way the two merge (the file,
//! then the flags over it, then the defaults for the rest).

use super::RunConfig;
use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;
use std::path::PathBuf;

/// The flags that set [`RunConfig`] keys (same names, kebab-case), plus `--config`.
#[derive(Args, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RunFlags {
    /// TOML file with any of these settings (flags win over the file).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Print the resolved configuration as TOML and exit.
    #[arg(long)]
    #[serde(skip)]
    pub print_config: bool,
    /// Workers in the cluster, N + b [default: 4].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    workers: Option<u32>,
    /// Backup workers b (sync policy) [default: 1, or 0 with one worker].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    backups: Option<u32>,
    /// sync | async | deadline | adaptive [default: sync].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    policy: Option<String>,
    /// Async: drop gradients more than this many updates old.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    max_staleness: Option<u64>,
    /// Deadline: fewest gradients a step may close with.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    deadline_min: Option<u32>,
    /// Deadline: seconds to wait for the rest.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    deadline_timeout: Option<f64>,
    /// Adaptive: fewest gradients a step may take [default: 1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    adaptive_min: Option<u32>,
    /// Adaptive: most gradients a step may take [default: workers].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    adaptive_max: Option<u32>,
    /// synthetic[:DIM], mlp, mlp:W1,W2,..., cnn, cnn:C1,C2,C3,C4 [default: mlp].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<String>,
    /// `quorum ps`: serve the model of this parameter file instead of a built-in one (for
    /// workers in PyTorch; `quorum.torch.save_params` writes it). Needs --steps.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    params: Option<PathBuf>,
    /// mnist | fashion-mnist | cifar10 [default: mnist].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    dataset: Option<String>,
    /// Data root holding <dataset>/ [default: data].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<PathBuf>,
    /// Training examples held out for validation [default: 5000].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    validation: Option<usize>,
    /// native | burn | wgpu: who computes the built-in models' gradients (burn and wgpu: builds with `--features burn` / `--features wgpu`) [default: native].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    engine: Option<String>,
    /// Examples per worker mini-batch [default: 128].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    batch: Option<usize>,
    /// Epochs to train [default: 2].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    epochs: Option<f64>,
    /// Updates to run (overrides --epochs).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    steps: Option<u64>,
    /// sgd, momentum:M, nesterov:M, rmsprop[...], adam[...] [default: momentum:0.9].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    optimizer: Option<String>,
    /// Learning rate [default: 0.05].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    lr: Option<f64>,
    /// constant, exp:RATE,EVERY[,staircase], linear:START,END [default: constant].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    lr_decay: Option<String>,
    /// Linear warm-up steps [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    warmup: Option<u64>,
    /// Multiply the learning rate by N (the paper's rule for averaged gradients).
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    scale_lr: bool,
    /// Keep a parameter EMA with this decay.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    ema: Option<f64>,
    /// Clip the averaged gradient to this global norm.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    clip: Option<f64>,
    /// `quorum train`: run this many attempts from different random weights (seed, seed+1, ...),
    /// stop diverged ones, keep the best on the validation split [default: 1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    restarts: Option<u32>,
    /// A step whose mean loss is above this counts as divergence (non-finite always does).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    divergence_loss: Option<f64>,
    /// Evaluate every this many steps [default: 100].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_every: Option<u64>,
    /// Seed [default: 1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    /// Injected straggling (`sim`: the compute-time model, default paper): paper, const:S, exp:MEAN, lognormal:M,S, pareto:B,XM,A, slow:K,F[,M], replay:FILE.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    delay: Option<String>,
    /// Seconds of silence before a worker is declared gone [default: 10].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    worker_timeout: Option<f64>,
    /// Seconds with fewer than N live workers before --on-stall [default: 30].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    stall_timeout: Option<f64>,
    /// stop | lower [default: stop].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    on_stall: Option<String>,
    /// Seconds a worker tries to reach the server [default: 60].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    connect_timeout: Option<f64>,
    /// Parameter servers the model is split over (`train` runs them all; `ps` is one of them,
    /// see --shard; `sim` charges each server's link its share) [default: 1].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    shards: Option<u32>,
    /// `quorum ps` of a sharded run: which shard this server is, 0..shards (shard 0 runs the
    /// coordinator) [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    shard: Option<u32>,
    /// `quorum ps --shard K` with K > 0: shard 0's HOST:PORT.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    coordinator: Option<String>,
    /// `--resume` from the checkpoint of exactly this step [default: the newest; a sharded
    /// `train` finds the newest every shard wrote].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    resume_step: Option<u64>,
    /// Address `quorum ps` listens on [default: 0.0.0.0:7070].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
    /// f32 | bf16 [default: f32].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    wire: Option<String>,
    /// HTTP/2 flow-control window per stream, bytes (about the link's bandwidth times its
    /// round trip), or `adaptive` (grown to each link's measured bandwidth-delay product)
    /// [default: 2097152].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    http2_window: Option<String>,
    /// Workers on the server's host move parameters and gradients through shared memory;
    /// `false`: every value over gRPC [default: true].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    shared_memory: Option<bool>,
    /// Workers stop a gradient half-way once its step closed without it (built-in models,
    /// one server); `false`: every gradient runs to the end [default: true].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    abandon: Option<bool>,
    /// Checkpoint every this many steps, 0 = only at the end [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint_every: Option<u64>,
    /// Also checkpoint every this many seconds, 0 = off [default: 600].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    checkpoint_seconds: Option<f64>,
    /// Checkpoints kept [default: 3].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    keep_checkpoints: Option<usize>,
    /// Compute threads.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    threads: Option<usize>,
    /// Run directory [default: runs/train; `sim` writes files only when given].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    out: Option<PathBuf>,
    /// File holding the join token (or set QUORUM_TOKEN).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    token_file: Option<PathBuf>,
    /// TLS certificate (PEM) of this process.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) of this process.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_key: Option<PathBuf>,
    /// TLS CA (PEM) the other side must chain to (on the server: require client certificates).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_ca: Option<PathBuf>,
}

impl RunFlags {
    /// The file (if any) with the flags laid over it, defaults for the rest, validated.
    pub fn resolve(&self) -> Result<RunConfig> {
        self.resolve_with(&SimFlags::default())
    }

    /// [`RunFlags::resolve`] with `quorum sim`'s own flags laid over the `[sim]` table.
    pub fn resolve_with(&self, sim: &SimFlags) -> Result<RunConfig> {
        let mut table = match &self.config {
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
                text.parse::<toml::Table>().with_context(|| format!("{} is not valid TOML", path.display()))?
            }
            None => toml::Table::new(),
        };
        let mut flags = toml::Table::try_from(self).context("collecting flags")?;
        let sim = toml::Table::try_from(sim).context("collecting flags")?;
        if !sim.is_empty() {
            flags.insert("sim".into(), toml::Value::Table(sim));
        }
        overlay(&mut table, flags);
        // One backup by default, none when there is one worker (N must stay at least 1).
        if !table.contains_key("backups") {
            let workers = table.get("workers").and_then(toml::Value::as_integer).unwrap_or(4);
            table.insert("backups".into(), toml::Value::Integer(i64::from(workers > 1)));
        }
        let where_ = self.config.as_ref().map_or("flags".to_string(), |p| p.display().to_string());
        let cfg: RunConfig = table.try_into().with_context(|| format!("invalid configuration in {where_}"))?;
        cfg.validate().with_context(|| format!("invalid configuration in {where_}"))?;
        Ok(cfg)
    }
}

/// The flags only `quorum sim` has: the keys of the `[sim]` table.
#[derive(Args, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SimFlags {
    /// One-way network latency, seconds [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    latency: Option<f64>,
    /// Network bandwidth of each worker's link, bytes per second [default: infinite].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    bandwidth: Option<f64>,
    /// Each parameter server's link, bytes per second each way; pulls and pushes queue on it
    /// [default: infinite].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    server_bandwidth: Option<f64>,
    /// Extra delay of each message to or from a parameter server: exponential with this mean,
    /// seconds, drawn per message and server (so shards see workers in different orders)
    /// [default: 0].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    jitter: Option<f64>,
    /// No gradient math: time only (for big sweeps).
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    timing_only: bool,
    /// Timing-only: charge messages for a model of this many parameters.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    virtual_params: Option<usize>,
    /// When newer parameters arrive mid-computation: finish_and_send (what a real worker
    /// does) | abandon | finish_and_discard [default: finish_and_send].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    on_newer: Option<String>,
    /// Evaluate the parameters `ema` (when --ema is set) or `params` [default: ema].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_on: Option<String>,
    /// Workers join one by one over this many virtual seconds (async with a constant delay:
    /// a staleness ramp from 0 to workers − 1).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    join_ramp: Option<f64>,
    /// Test accuracy to reach (0..1): summary.json records the step, time and examples when
    /// the run first reached it.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<f32>,
    /// End the run as soon as --target is reached.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    stop_at_target: bool,
    /// A fault to inject (repeatable): crash:W@T, crash:W@T+RESTART, freeze:W@T+SECONDS,
    /// slow:W@T+SECONDS*FACTOR (a slow link), lag:W@T+SECONDS*FACTOR (slow computing)
    /// (worker W at T virtual seconds).
    #[arg(long)]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    fault: Vec<String>,
    /// Sweep b over a range (e.g. 0..10) with N = budget − b; prints a table.
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    sweep_backups: Option<String>,
    /// Machines for --sweep-backups [default: --workers].
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    budget: Option<u32>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// Lays `top` over `base`: a key in both takes `top`'s value, except tables, which merge key
/// by key (so `--latency` sets one key of the file's `[sim]` table and keeps the others).
fn overlay(base: &mut toml::Table, top: toml::Table) {
    for (key, value) in top {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => overlay(b, t),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}
