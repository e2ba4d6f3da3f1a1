//! The one configuration of a run, for every command (`quorum train`, `ps`, `worker`,
//! `node`, `sim`): a TOML file (`--config`) and/or flags of the same names (flags win), one
//! set of defaults. Unknown keys and invalid values are refused with the key named. A run's
//! `config.toml` is this, resolved, and reads back with `--config`.

mod flags;
mod sim;
mod text;

use crate::opts;
use anyhow::{bail, Context, Result};
pub use flags::{RunFlags, SimFlags};
use quorum_compute::{Engine, GradientSource, LeastSquares};
use quorum_core::{Decay, OnStall, OptimizerConfig, Policy, ServerConfig};
use quorum_net::Encoding;
use quorum_sim::{DelayModel, DelaySampler};
use serde::{Deserialize, Serialize};
pub use sim::SimKeys;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The synthetic model's dimension when `model = "synthetic"` names none.
const SYNTHETIC_DIM: usize = 64;

/// The aggregation rule by name (its numbers are their own keys: backups, max-staleness,
/// deadline-min, deadline-timeout, adaptive-min, adaptive-max).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// Sync with `backups` backup workers (plain sync with 0).
    #[default]
    Sync,
    /// Every gradient applied on arrival.
    Async,
    /// Close a step at a time-out once `deadline-min` gradients are in.
    Deadline,
    /// Choose N before each step, between `adaptive-min` and `adaptive-max`.
    Adaptive,
}

/// Every setting of a run, resolved (defaults filled in). Serialised as the run's `config.toml`
/// and printed by `--print-config`; the same file can be passed back as `--config`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RunConfig {
    /// Workers in the cluster, N + b.
    pub workers: u32,
    /// Backup workers b (sync policy).
    pub backups: u32,
    /// sync | async | deadline | adaptive.
    pub policy: PolicyKind,
    /// Async: drop gradients more than this many updates old.
    pub max_staleness: Option<u64>,
    /// Deadline: fewest gradients a step may close with.
    pub deadline_min: Option<u32>,
    /// Deadline: seconds to wait for the rest.
    pub deadline_timeout: Option<f64>,
    /// Adaptive: fewest gradients a step may take (default 1).
    pub adaptive_min: Option<u32>,
    /// Adaptive: most gradients a step may take (default: workers); the learning rate is
    /// the rate at this N and scales linearly with the N of each step.
    pub adaptive_max: Option<u32>,
    /// synthetic[:DIM], mlp, mlp:W1,W2,..., cnn, cnn:C1,C2,C3,C4.
    pub model: String,
    /// `quorum ps`: serve the model of this parameter file (safetensors with the tensors'
    /// order, written by `quorum.torch.save_params`) instead of `model`: the layout and the
    /// starting values come from it, the workers compute the gradients (PyTorch), and the
    /// server evaluates nothing. `steps` must be given (the server does not see the data).
    pub params: Option<PathBuf>,
    /// mnist | fashion-mnist | cifar10.
    pub dataset: String,
    /// Data root holding <dataset>/.
    pub data: PathBuf,
    /// Training examples held out as a validation split.
    pub validation: usize,
    /// Who computes the built-in models' gradients: native (hand-written passes on the
    /// `gemm` kernels) | burn (burn's autodiff; slower, the reference).
    pub engine: Engine,
    /// Examples per worker mini-batch.
    pub batch: usize,
    /// Epochs to train (sets the number of steps).
    pub epochs: f64,
    /// Updates to run (overrides epochs).
    pub steps: Option<u64>,
    /// sgd, momentum:M, nesterov:M, rmsprop[:DECAY,MOMENTUM,EPS], adam[:B1,B2,EPS].
    #[serde(with = "text")]
    pub optimizer: OptimizerConfig,
    /// Learning rate.
    pub lr: f64,
    /// constant, exp:RATE,EVERY[,staircase], linear:START,END.
    #[serde(with = "text")]
    pub lr_decay: Decay,
    /// Linear warm-up steps.
    pub warmup: u64,
    /// Multiply the learning rate by N (the paper's rule for averaged gradients).
    pub scale_lr: bool,
    /// Keep a parameter EMA with this decay and evaluate it.
    pub ema: Option<f64>,
    /// Clip the averaged gradient to this global norm.
    pub clip: Option<f64>,
    /// Random restarts (`quorum train`): attempts from different random weights; the one with
    /// the best validation accuracy is kept.
    pub restarts: u32,
    /// Stop as diverged once a step's mean loss is above this (a non-finite gradient always is).
    pub divergence_loss: Option<f64>,
    /// Evaluate on the test set every this many steps (0: only at the end).
    pub eval_every: u64,
    /// Seed of initial weights, batches and injected delays.
    pub seed: u64,
    /// Injected straggling before each gradient: a delay model as in `quorum sim --delay`.
    pub delay: Option<DelayModel>,
    /// Declare a worker gone after this many seconds without a message from it.
    pub worker_timeout: f64,
    /// When fewer than N workers are alive for this many seconds: `on-stall`.
    pub stall_timeout: f64,
    /// stop (checkpoint and exit naming the missing workers) | lower_aggregate (go on with
    /// fewer; `lower` is read as the same).
    pub on_stall: OnStall,
    /// Seconds a worker keeps trying to reach the server before giving up.
    pub connect_timeout: f64,
    /// Parameter servers the model is split over: `train` runs them all; `ps` is one of them
    /// (`shard`); a worker is given every shard's address; `sim` charges each server's link
    /// its share of every message.
    pub shards: u32,
    /// `quorum ps` of a sharded run: which shard this server is, 0..shards (shard 0 runs the
    /// coordinator that decides every step's contributors for all shards).
    pub shard: u32,
    /// `quorum ps --shard K` with K > 0: shard 0's HOST:PORT.
    pub coordinator: Option<String>,
    /// Address `quorum ps` listens on.
    pub listen: String,
    /// f32 | bf16: how parameters and gradients travel.
    pub wire: Encoding,
    /// HTTP/2 flow-control windows: bytes per stream, or "adaptive" (grown to each link).
    pub http2_window: String,
    /// Workers on the server's host move parameters and gradients through shared memory
    /// (false: every value over gRPC).
    pub shared_memory: bool,
    /// A worker stops a gradient half-way once its step closed without it, where it hears
    /// of the closing as it happens (shared memory, or the next step's pull; one server) and
    /// the model can stop (the built-in models); false: every gradient runs to the end, as in
    /// the paper.
    pub abandon: bool,
    /// Checkpoint every this many steps (0: only at the end and on Ctrl-C / SIGTERM).
    pub checkpoint_every: u64,
    /// Also checkpoint every this many seconds (0: off; default 600, as TensorFlow's).
    pub checkpoint_seconds: f64,
    /// Checkpoints kept.
    pub keep_checkpoints: usize,
    /// `--resume` from the checkpoint of exactly this step (default: the newest). Every shard
    /// of a sharded run must resume from the same step; `quorum train --shards S --resume`
    /// finds the newest step every shard wrote.
    pub resume_step: Option<u64>,
    /// Compute threads per process (default: all cores; `quorum train` splits them among workers).
    pub threads: Option<usize>,
    /// Run directory (`train`, `ps`: `runs/train` when unset; `sim` writes files only when set).
    pub out: Option<PathBuf>,
    /// File holding the join token (the `QUORUM_TOKEN` environment variable wins).
    pub token_file: Option<PathBuf>,
    /// The join token itself; never written to config.toml or printed.
    #[serde(skip_serializing)]
    pub token: Option<String>,
    /// TLS: this process's certificate chain (PEM). With `tls-key`, the server serves TLS and a
    /// worker presents it as its client certificate (mutual TLS).
    pub tls_cert: Option<PathBuf>,
    /// TLS: the private key of `tls-cert` (PEM).
    pub tls_key: Option<PathBuf>,
    /// TLS: the CA (PEM) the other side's certificate must chain to. On a worker: whom to trust
    /// as the server (turns TLS on). On the server: require client certificates signed by it.
    pub tls_ca: Option<PathBuf>,
    /// Keys only `quorum sim` reads (the `[sim]` table).
    #[serde(skip_serializing_if = "SimKeys::is_default")]
    pub sim: SimKeys,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            workers: 4,
            backups: 1,
            policy: PolicyKind::Sync,
            max_staleness: None,
            deadline_min: None,
            deadline_timeout: None,
            adaptive_min: None,
            adaptive_max: None,
            model: "mlp".into(),
            params: None,
            dataset: "mnist".into(),
            data: "data".into(),
            validation: 5000,
            engine: Engine::Native,
            batch: 128,
            epochs: 2.0,
            steps: None,
            optimizer: OptimizerConfig::Momentum { momentum: 0.9, nesterov: false },
            lr: 0.05,
            lr_decay: Decay::Constant,
            warmup: 0,
            scale_lr: false,
            ema: None,
            clip: None,
            restarts: 1,
            divergence_loss: None,
            eval_every: 100,
            seed: 1,
            delay: None,
            worker_timeout: 10.0,
            stall_timeout: 30.0,
            on_stall: OnStall::Stop,
            connect_timeout: 60.0,
            shards: 1,
            shard: 0,
            coordinator: None,
            listen: "0.0.0.0:7070".into(),
            wire: Encoding::F32,
            http2_window: quorum_net::framing::STREAM_WINDOW.to_string(),
            shared_memory: true,
            abandon: true,
            checkpoint_every: 0,
            checkpoint_seconds: 600.0,
            keep_checkpoints: 3,
            resume_step: None,
            threads: None,
            out: None,
            token_file: None,
            tls_cert: None,
            tls_key: None,
            tls_ca: None,
            token: None,
            sim: SimKeys::default(),
        }
    }
}

impl RunConfig {
    /// Checks every value that can be checked without loading data.
    pub fn validate(&self) -> Result<()> {
        if self.workers == 0 {
            bail!("workers must be at least 1");
        }
        if self.restarts == 0 {
            bail!("restarts must be at least 1 (the number of attempts)");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            bail!("tls-cert and tls-key go together: give both or neither");
        }
        if self.batch == 0 {
            bail!("batch must be at least 1");
        }
        if self.steps.is_none() && (self.epochs.is_nan() || self.epochs <= 0.0) {
            bail!("epochs must be positive (or set steps)");
        }
        self.policy()?;
        self.synthetic_dim()?;
        self.engine.check_built()?;
        self.encoding()?;
        self.window()?;
        self.delay_sampler()?;
        self.server_config(1)?;
        if self.shards == 0 {
            bail!("shards must be at least 1");
        }
        if self.shard >= self.shards {
            bail!(
                "shard {} is out of range: with shards = {} the shards are numbered 0 to {}",
                self.shard,
                self.shards,
                self.shards - 1
            );
        }
        for (key, v) in [
            ("worker-timeout", self.worker_timeout),
            ("stall-timeout", self.stall_timeout),
            ("connect-timeout", self.connect_timeout),
        ] {
            if v.is_nan() || v <= 0.0 || v.is_infinite() {
                bail!("{key} must be a positive number of seconds, got {v}");
            }
        }
        if self.keep_checkpoints == 0 {
            bail!("keep-checkpoints must be at least 1");
        }
        Ok(())
    }

    /// The aggregation policy.
    pub fn policy(&self) -> Result<Policy> {
        Ok(match self.policy {
            PolicyKind::Sync => {
                if self.backups >= self.workers {
                    bail!(
                        "backups ({}) must be smaller than workers ({}): N = workers - backups must be at least 1",
                        self.backups,
                        self.workers
                    );
                }
                Policy::Sync { aggregate: self.workers - self.backups, backups: self.backups }
            }
            PolicyKind::Async => Policy::Async { max_staleness: self.max_staleness },
            PolicyKind::Deadline => {
                let t = self.deadline_timeout.context("policy deadline needs deadline-timeout (seconds)")?;
                Policy::Deadline {
                    min: self.deadline_min.unwrap_or(1),
                    timeout: Duration::try_from_secs_f64(t).context("deadline-timeout must be non-negative seconds")?,
                }
            }
            PolicyKind::Adaptive => {
                let p = Policy::Adaptive {
                    min: self.adaptive_min.unwrap_or(1),
                    max: self.adaptive_max.unwrap_or(self.workers),
                };
                p.validate(self.workers)
                    .with_context(|| "set adaptive-min and adaptive-max within 1..=workers".to_string())?;
                p
            }
        })
    }

    /// `Some(dim)` for the synthetic model, `None` for an image model (checked).
    pub fn synthetic_dim(&self) -> Result<Option<usize>> {
        if let Some(dim) = opts::synthetic_dim(&self.model)? {
            return Ok(Some(dim.unwrap_or(SYNTHETIC_DIM)));
        }
        quorum_compute::ModelSpec::parse(&self.model)?;
        self.dataset.parse::<quorum_compute::data::DatasetName>()?;
        Ok(None)
    }

    /// The TLS files (none set: plain text).
    pub fn tls(&self) -> quorum_net::tls::TlsFiles {
        quorum_net::tls::TlsFiles { cert: self.tls_cert.clone(), key: self.tls_key.clone(), ca: self.tls_ca.clone() }
    }

    /// The join token: `QUORUM_TOKEN`, else `token-file`, else `token`.
    pub fn token(&self) -> Result<Option<quorum_net::auth::Token>> {
        let secret = match (std::env::var("QUORUM_TOKEN").ok(), &self.token_file, &self.token) {
            (Some(t), _, _) => t,
            (None, Some(path), _) => {
                std::fs::read_to_string(path).with_context(|| format!("cannot read token-file {}", path.display()))?
            }
            (None, None, Some(t)) => t.clone(),
            (None, None, None) => return Ok(None),
        };
        quorum_net::auth::Token::new(secret).map(Some).map_err(anyhow::Error::from)
    }

    /// The port of `listen` (7070 when it names none).
    pub fn listen_port(&self) -> u16 {
        port_of(&self.listen).unwrap_or(7070)
    }

    /// The HTTP/2 windows.
    pub fn window(&self) -> Result<quorum_net::framing::Window> {
        quorum_net::framing::Window::parse(&self.http2_window).map_err(anyhow::Error::msg)
    }

    /// The wire encoding.
    pub fn encoding(&self) -> Result<Encoding> {
        Ok(self.wire)
    }

    /// The injected-delay sampler, if any.
    pub fn delay_sampler(&self) -> Result<Option<DelaySampler>> {
        match &self.delay {
            Some(m) => Ok(Some(m.sampler().context("delay")?)),
            None => Ok(None),
        }
    }

    /// Builds the gradient source of a worker process or the evaluator (loads the data).
    pub fn source(&self) -> Result<Box<dyn GradientSource + Send>> {
        Ok(self.sources(1)?.pop().expect("one source"))
    }

    /// `n` gradient sources for one process (`quorum train`'s workers and evaluator), the
    /// data loaded once and shared.
    pub fn sources(&self, n: usize) -> Result<Vec<Box<dyn GradientSource + Send>>> {
        fn boxed(s: impl GradientSource + Send + Clone + 'static, n: usize) -> Vec<Box<dyn GradientSource + Send>> {
            (0..n).map(|_| Box::new(s.clone()) as Box<dyn GradientSource + Send>).collect()
        }
        if let Some(p) = &self.params {
            bail!(
                "params = {} is for `quorum ps` serving workers that compute the model themselves \
                 (PyTorch); this command computes gradients with a built-in model: remove params and set model",
                p.display()
            );
        }
        Ok(match self.synthetic_dim()? {
            Some(dim) => boxed(LeastSquares::new(dim, self.batch, 0.1, self.seed), n),
            None => boxed(
                opts::classifier(
                    &self.model,
                    &self.dataset,
                    &self.data,
                    self.validation,
                    self.batch,
                    self.workers,
                    self.seed,
                )?
                .with_engine(self.engine)?,
                n,
            ),
        })
    }

    /// Updates to run: `steps`, or `epochs` over `train_examples`.
    pub fn total_steps(&self, train_examples: usize) -> Result<u64> {
        if let Some(s) = self.steps {
            return Ok(s);
        }
        Ok(opts::steps_for_epochs(self.epochs, train_examples, &self.policy()?, self.batch))
    }

    /// The state machine's configuration for a run of `steps` updates.
    pub fn server_config(&self, steps: u64) -> Result<ServerConfig> {
        let mut cfg = ServerConfig::new(self.workers, self.policy()?, self.lr as f32);
        cfg.optimizer = self.optimizer.clone();
        cfg.schedule.decay = self.lr_decay.clone();
        cfg.schedule.warmup_steps = self.warmup;
        cfg.schedule.scale_by_aggregate = self.scale_lr;
        cfg.ema_decay = self.ema.map(|e| e as f32);
        cfg.clip_norm = self.clip.map(|c| c as f32);
        cfg.max_steps = Some(steps);
        cfg.liveness.worker_timeout = Some(Duration::from_secs_f64(self.worker_timeout));
        cfg.liveness.stall_timeout = Some(Duration::from_secs_f64(self.stall_timeout));
        cfg.liveness.on_stall = self.on_stall;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Training examples (for epochs → steps) of `source`.
    pub fn train_examples(&self, source: &dyn GradientSource) -> usize {
        self.epoch_examples(source.train_examples())
    }

    /// Examples in one epoch of a training set of `known` examples; without one (the synthetic
    /// model's endless stream, a timing-only simulation) one "epoch" is 1000 batches of one
    /// worker.
    pub fn epoch_examples(&self, known: Option<usize>) -> usize {
        known.unwrap_or(1000 * self.batch)
    }

    /// One line describing the cluster shape.
    pub fn shape(&self) -> String {
        match self.policy() {
            Ok(p) => p.to_string(),
            Err(e) => format!("invalid policy: {e}"),
        }
    }

    /// The run directory.
    pub fn run_dir(&self) -> PathBuf {
        self.out.clone().unwrap_or_else(|| PathBuf::from("runs/train"))
    }

    /// The resolved configuration as TOML.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).context("serialising the configuration")
    }

    /// Writes `config.toml` into the run directory.
    pub fn write_to(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(dir.join("config.toml"), self.to_toml()?)
            .with_context(|| format!("cannot write {}", dir.join("config.toml").display()))
    }
}

/// The port of a `host:port` address.
pub fn port_of(addr: &str) -> Option<u16> {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags_from(args: &[&str]) -> RunFlags {
        use clap::Parser;
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            f: RunFlags,
        }
        let mut v = vec!["quorum"];
        v.extend_from_slice(args);
        P::parse_from(v).f
    }

    fn with_file(text: &str, args: &[&str]) -> Result<RunConfig> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.toml");
        std::fs::write(&p, text).unwrap();
        let mut f = flags_from(args);
        f.config = Some(p);
        f.resolve()
    }

    #[test]
    fn runs_checkpoint_every_ten_minutes_unless_told_otherwise() {
        // A `kill -9` after an hour of training must not lose the hour.
        assert_eq!(with_file("", &[]).unwrap().checkpoint_seconds, 600.0);
        assert_eq!(with_file("", &["--checkpoint-seconds", "0"]).unwrap().checkpoint_seconds, 0.0);
    }

    #[test]
    fn flags_win_over_the_file_and_defaults_fill_the_rest() {
        let c = with_file("workers = 8\nbackups = 2\nlr = 0.1\n", &["--backups", "3"]).unwrap();
        assert_eq!((c.workers, c.backups, c.lr), (8, 3, 0.1));
        assert_eq!(c.model, "mlp");
        assert_eq!(c.shape(), "sync N=5 b=3");
    }

    #[test]
    fn the_printed_config_reads_back_to_the_same_config() {
        let c = with_file("workers = 6\npolicy = \"async\"\nmax-staleness = 4\ndelay = \"exp:0.02\"\n", &[]).unwrap();
        let again = with_file(&c.to_toml().unwrap(), &[]).unwrap();
        assert_eq!(c, again);
    }

    fn sim_flags_from(args: &[&str]) -> (RunFlags, SimFlags) {
        use clap::Parser;
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            f: RunFlags,
            #[command(flatten)]
            s: SimFlags,
        }
        let mut v = vec!["quorum"];
        v.extend_from_slice(args);
        let p = P::parse_from(v);
        (p.f, p.s)
    }

    #[test]
    fn a_sim_flag_sets_one_key_of_the_files_sim_table_and_keeps_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.toml");
        std::fs::write(&p, "workers = 10\n[sim]\nlatency = 0.01\nfault = [\"crash:3@5+2\"]\n").unwrap();
        let (mut f, s) = sim_flags_from(&["--bandwidth", "1e9", "--timing-only"]);
        f.config = Some(p);
        let c = f.resolve_with(&s).unwrap();
        assert_eq!((c.sim.latency, c.sim.bandwidth, c.sim.timing_only), (0.01, Some(1e9), true));
        assert_eq!(c.sim.fault.len(), 1);
        assert_eq!(c.sim.fault[0].to_string(), "crash:3@5+2");
    }

    #[test]
    fn a_config_with_a_sim_table_reads_back_to_the_same_config() {
        let text = "workers = 12\nbackups = 2\noptimizer = \"adam:0.8,0.99,0.000001\"\nlr-decay = \"exp:0.94,50\"\n\
                    [sim]\nlatency = 0.001\nsweep-backups = \"0..4\"\non-newer = \"abandon\"\n\
                    fault = [\"freeze:1@2+3\", \"slow:2@0+30*10\"]\n";
        let c = with_file(text, &[]).unwrap();
        assert_eq!(c.optimizer, OptimizerConfig::Adam { beta1: 0.8, beta2: 0.99, epsilon: 1e-6 });
        assert_eq!(c.sim.sweep_backups.as_ref().map(|r| r.0.clone()), Some(0..=4));
        let again = with_file(&c.to_toml().unwrap(), &[]).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn one_worker_gets_no_backup_by_default_and_more_workers_get_one() {
        assert_eq!(with_file("workers = 1\n", &[]).unwrap().backups, 0);
        assert_eq!(with_file("workers = 6\n", &[]).unwrap().backups, 1);
        assert_eq!(with_file("", &["--workers", "1"]).unwrap().shape(), "sync N=1 b=0");
    }

    #[test]
    fn tls_files_come_from_the_file_or_flags() {
        let c = with_file("tls-cert = \"a.pem\"\ntls-key = \"a.key\"\n", &["--tls-ca", "ca.pem"]).unwrap();
        let t = c.tls();
        assert!(t.enabled());
        assert_eq!(t.ca.as_deref(), Some(std::path::Path::new("ca.pem")));
        assert_eq!(t.cert.as_deref(), Some(std::path::Path::new("a.pem")));
        assert!(!RunConfig::default().tls().enabled());
    }

    #[test]
    fn an_unknown_key_is_named() {
        let e = format!("{:#}", with_file("wokers = 3\n", &[]).unwrap_err());
        assert!(e.contains("unknown field `wokers`"), "{e}");
    }

    #[test]
    fn invalid_values_are_named() {
        let cases = [
            ("workers = 0\n", "workers must be at least 1"),
            ("workers = 3\nbackups = 3\n", "backups (3) must be smaller than workers (3)"),
            ("policy = \"fast\"\n", "unknown variant `fast`, expected one of `sync`, `async`, `deadline`"),
            ("model = \"resnet\"\n", "resnet"),
            ("dataset = \"imagenet\"\n", "imagenet"),
            ("wire = \"fp8\"\n", "unknown variant `fp8`, expected `f32` or `bf16`"),
            ("http2-window = \"1024\"\n", "give a window in bytes, at least 65535"),
            ("on-stall = \"panic\"\n", "unknown variant `panic`, expected one of `stop`, `lower`, `lower_aggregate`"),
            ("policy = \"deadline\"\n", "needs deadline-timeout"),
            ("delay = \"weibull:1\"\n", "weibull"),
            ("optimizer = \"lbfgs\"\n", "unknown optimizer `lbfgs`"),
            ("workers = \"four\"\n", "invalid type"),
            ("tls-cert = \"server.pem\"\n", "tls-cert and tls-key go together"),
            ("lr-decay = \"cosine\"\n", "unknown learning-rate decay `cosine`"),
            ("engine = \"cuda\"\n", "unknown variant `cuda`, expected one of `native`, `burn`, `wgpu`"),
            ("[sim]\nlatncy = 1\n", "unknown field `latncy`"),
            ("[sim]\nfault = [\"melt:1@2\"]\n", "bad fault `melt:1@2`"),
            ("[sim]\nsweep-backups = \"5..2\"\n", "range `5..2` is empty"),
        ];
        for (text, want) in cases {
            let e = format!("{:#}", with_file(text, &[]).unwrap_err());
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
