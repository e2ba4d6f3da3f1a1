//! `quorum sim`: run the deterministic simulator from flags and/or a TOML file.

use crate::opts;
use anyhow::{bail, Context, Result};
use clap::Args;
use quorum_compute::{GradientSource, LeastSquares};
use quorum_core::{OnNewerParams, OptimizerConfig, Policy, ServerConfig};
use quorum_sim::{simulate, sweep_backups, DelayModel, EvalOn, NetworkModel, Restart, SimConfig, SimReport};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// Flags of `quorum sim`. Every flag can also be a key of the `--config` TOML file
/// (same name, e.g. `workers = 100`, `delay = "paper"`); flags win over the file. A run's
/// `config.toml` is these settings (file and flags merged), so it reads back with `--config`.
#[derive(Args, Deserialize, Serialize, Default, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct SimArgs {
    /// TOML file with any of these settings.
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// Workers in the cluster (N + b).
    #[arg(long)]
    workers: Option<u32>,
    /// Backup workers b (sync policy): N = workers − b.
    #[arg(long)]
    backups: Option<u32>,
    /// sync | async | deadline.
    #[arg(long)]
    policy: Option<String>,
    /// Async: drop gradients more than this many updates old.
    #[arg(long)]
    max_staleness: Option<u64>,
    /// Deadline: fewest gradients a step may close with.
    #[arg(long)]
    deadline_min: Option<u32>,
    /// Deadline: seconds to wait for the rest.
    #[arg(long)]
    deadline_timeout: Option<f64>,
    /// Compute-time model: paper, const:S, exp:MEAN, lognormal:MEDIAN,SIGMA,
    /// pareto:BASE,XM,ALPHA, slow:K,FACTOR[,MODEL], replay:FILE.csv.
    #[arg(long)]
    delay: Option<String>,
    /// One-way network latency, seconds.
    #[arg(long)]
    latency: Option<f64>,
    /// Network bandwidth, bytes per second (default: infinite).
    #[arg(long)]
    bandwidth: Option<f64>,
    /// Updates to simulate.
    #[arg(long)]
    steps: Option<u64>,
    /// Seed of every random stream.
    #[arg(long)]
    seed: Option<u64>,
    /// Learning rate (synthetic model).
    #[arg(long)]
    lr: Option<f32>,
    /// No gradient math: time only (for big sweeps).
    #[arg(long)]
    #[serde(default)]
    timing_only: bool,
    /// Timing-only: charge messages for a model of this many parameters.
    #[arg(long)]
    virtual_params: Option<usize>,
    /// Synthetic least-squares model: dimension.
    #[arg(long)]
    dim: Option<usize>,
    /// Examples per mini-batch.
    #[arg(long)]
    batch: Option<usize>,
    /// What a worker does when newer parameters arrive mid-computation:
    /// finish_and_send (default; what a real worker does) | abandon | finish_and_discard.
    #[arg(long)]
    on_newer: Option<String>,
    /// Sweep b over a range (e.g. 0..10) with N = budget − b; prints a table.
    #[arg(long)]
    sweep_backups: Option<String>,
    /// Machines for --sweep-backups (default: --workers).
    #[arg(long)]
    budget: Option<u32>,
    /// Model: synthetic (least squares), mlp, mlp:W1,W2,..., cnn, cnn:C1,C2,C3,C4.
    #[arg(long)]
    model: Option<String>,
    /// Dataset for mlp/cnn: mnist, fashion-mnist, cifar10.
    #[arg(long)]
    dataset: Option<String>,
    /// Data root holding <dataset>/ directories (default: data).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Training examples held out as a validation split (default 5000 for image data).
    #[arg(long)]
    validation: Option<usize>,
    /// Train for this many epochs (sets --steps from the gradients used per step).
    #[arg(long)]
    epochs: Option<f64>,
    /// sgd, momentum:M, nesterov:M, rmsprop[:DECAY,MOMENTUM,EPS], adam[:B1,B2,EPS].
    #[arg(long)]
    optimizer: Option<String>,
    /// Learning-rate decay: constant, exp:RATE,EVERY[,staircase], linear:START,END.
    #[arg(long)]
    lr_decay: Option<String>,
    /// Linear warm-up steps.
    #[arg(long)]
    warmup: Option<u64>,
    /// Scale the learning rate by N (the paper's rule for averaged gradients).
    #[arg(long)]
    #[serde(default)]
    scale_lr: bool,
    /// Keep a parameter EMA with this decay (e.g. 0.999).
    #[arg(long)]
    ema: Option<f32>,
    /// Clip the averaged gradient to this global norm.
    #[arg(long)]
    clip: Option<f32>,
    /// Evaluate on the test set every this many steps (and at the end).
    #[arg(long)]
    eval_every: Option<u64>,
    /// Evaluate the parameters `ema` (default when --ema is set) or `params`.
    #[arg(long)]
    eval_on: Option<String>,
    /// Compute threads for gradient math (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Workers join one by one over this many virtual seconds (async with a constant delay:
    /// a staleness ramp from 0 to workers − 1).
    #[arg(long)]
    join_ramp: Option<f64>,
    /// Stop an attempt as diverged once a mini-batch loss is non-finite or above this.
    #[arg(long)]
    divergence_loss: Option<f32>,
    /// Random restarts: run this many attempts from different random weights (diverged ones
    /// stop early) and keep the one with the best validation accuracy.
    #[arg(long)]
    restarts: Option<u32>,
    /// Test accuracy to reach (0..1): summary.json records the step, time and examples when
    /// the run first reached it.
    #[arg(long)]
    target: Option<f32>,
    /// End the run as soon as --target is reached.
    #[arg(long)]
    #[serde(default)]
    stop_at_target: bool,
    /// Seconds of silence after which a worker is declared gone (workers heartbeat every
    /// quarter of it); default: never.
    #[arg(long)]
    worker_timeout: Option<f64>,
    /// Seconds with fewer than N live workers before the run stops (or N is lowered).
    #[arg(long)]
    stall_timeout: Option<f64>,
    /// A fault to inject (repeatable): crash:W@T, crash:W@T+RESTART, freeze:W@T+SECONDS,
    /// slow:W@T+SECONDS*FACTOR (worker W at T virtual seconds).
    #[arg(long = "fault")]
    #[serde(default)]
    fault: Vec<String>,
    /// Directory for summary.json, events.jsonl, arrivals.csv, metrics.csv, workers.csv.
    #[arg(long)]
    out: Option<PathBuf>,
}

macro_rules! merge {
    ($cli:expr, $file:expr, $($f:ident),*) => { $( if $cli.$f.is_none() { $cli.$f = $file.$f.take(); } )* };
}

fn parse_range(s: &str) -> Result<std::ops::RangeInclusive<u32>> {
    let (a, b) = s.split_once("..").with_context(|| format!("--sweep-backups takes a range like 0..10, got `{s}`"))?;
    let b = b.trim_start_matches('=');
    let a: u32 = a.trim().parse().with_context(|| format!("bad range start in `{s}`"))?;
    let b: u32 = b.trim().parse().with_context(|| format!("bad range end in `{s}`"))?;
    if b < a {
        bail!("--sweep-backups range `{s}` is empty");
    }
    Ok(a..=b)
}

impl SimArgs {
    fn with_file(mut self) -> Result<Self> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read config {}", path.display()))?;
        let mut file: SimArgs = toml::from_str(&text).with_context(|| format!("invalid config {}", path.display()))?;
        merge!(
            self,
            file,
            workers,
            backups,
            policy,
            max_staleness,
            deadline_min,
            deadline_timeout,
            delay,
            latency,
            bandwidth
        );
        merge!(self, file, threads);
        merge!(self, file, steps, seed, lr, virtual_params, dim, batch, on_newer, sweep_backups, budget, out);
        merge!(
            self, file, model, dataset, data, validation, epochs, optimizer, lr_decay, warmup, ema, clip, eval_every,
            eval_on
        );
        merge!(self, file, join_ramp, divergence_loss, restarts, target, worker_timeout, stall_timeout);
        if self.fault.is_empty() {
            self.fault = std::mem::take(&mut file.fault);
        }
        self.stop_at_target |= file.stop_at_target;
        self.scale_lr |= file.scale_lr;
        self.timing_only |= file.timing_only;
        Ok(self)
    }

    fn policy(&self, workers: u32) -> Result<Policy> {
        Ok(match self.policy.as_deref().unwrap_or("sync") {
            "sync" => {
                let b = self.backups.unwrap_or(0);
                if b >= workers {
                    bail!("--backups ({b}) must be smaller than --workers ({workers})");
                }
                Policy::Sync { aggregate: workers - b, backups: b }
            }
            "async" => Policy::Async { max_staleness: self.max_staleness },
            "deadline" => Policy::Deadline {
                min: self.deadline_min.unwrap_or(1),
                timeout: Duration::try_from_secs_f64(
                    self.deadline_timeout.context("--policy deadline needs --deadline-timeout SECONDS")?,
                )
                .context("--deadline-timeout must be a non-negative number of seconds")?,
            },
            other => bail!("unknown policy `{other}`: use sync, async or deadline"),
        })
    }

    fn sim_config(&self) -> Result<SimConfig> {
        let workers = self.workers.unwrap_or(4);
        let delay: DelayModel = self.delay.as_deref().unwrap_or("paper").parse().map_err(anyhow::Error::msg)?;
        let mut server = ServerConfig::new(workers, self.policy(workers)?, self.lr.unwrap_or(0.1));
        server.optimizer = self.optimizer.as_deref().map_or(Ok(OptimizerConfig::Sgd), opts::optimizer)?;
        if let Some(d) = &self.lr_decay {
            server.schedule.decay = opts::decay(d)?;
        }
        server.schedule.warmup_steps = self.warmup.unwrap_or(0);
        server.schedule.scale_by_aggregate = self.scale_lr;
        server.ema_decay = self.ema;
        server.clip_norm = self.clip;
        let secs = |v: Option<f64>, what: &str| -> Result<Option<Duration>> {
            v.map(|v| {
                Duration::try_from_secs_f64(v)
                    .with_context(|| format!("--{what} must be a non-negative number of seconds"))
            })
            .transpose()
        };
        server.liveness.worker_timeout = secs(self.worker_timeout, "worker-timeout")?;
        server.liveness.stall_timeout = secs(self.stall_timeout, "stall-timeout")?;
        let on_newer = match self.on_newer.as_deref() {
            None => OnNewerParams::default(),
            Some(name) => name.parse::<OnNewerParams>().map_err(|e| anyhow::anyhow!("--on-newer: {e}"))?,
        };
        let cfg = SimConfig {
            server,
            steps: self.steps.unwrap_or(1000),
            seed: self.seed.unwrap_or(1),
            delay,
            network: NetworkModel { latency: self.latency.unwrap_or(0.0), bandwidth: self.bandwidth },
            on_newer,
            virtual_params: self.virtual_params.unwrap_or(0),
            eval_every: self.eval_every,
            eval_on: match self.eval_on.as_deref() {
                None | Some("ema") => EvalOn::Ema,
                Some("params") => EvalOn::Params,
                Some(other) => bail!("unknown --eval-on `{other}`: use ema or params"),
            },
            record_events: true,
            record_arrivals: true,
            // A non-finite loss always counts as divergence (and names it as such).
            divergence_loss: Some(self.divergence_loss.unwrap_or(f32::INFINITY)),
            join_ramp: self.join_ramp.unwrap_or(0.0),
            target: self.target,
            stop_at_target: self.stop_at_target,
            faults: self.fault.iter().map(|f| f.parse()).collect::<Result<_, String>>().map_err(anyhow::Error::msg)?,
        };
        if self.stop_at_target && self.target.is_none() {
            bail!("--stop-at-target needs --target ACCURACY (e.g. 0.95)");
        }
        if self.target.is_some_and(|t| !(0.0..=1.0).contains(&t)) {
            bail!("--target is an accuracy between 0 and 1, e.g. 0.95");
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Runs `quorum sim`.
pub fn run(args: SimArgs) -> Result<()> {
    let args = args.with_file()?;
    let mut cfg = args.sim_config()?;
    // Without an output directory nothing reads the per-event records: skip them.
    cfg.record_events = args.out.is_some();
    cfg.record_arrivals = args.out.is_some();
    if let Some(range) = &args.sweep_backups {
        return sweep(&args, &cfg, parse_range(range)?);
    }
    if let Some(n) = args.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global().context("setting --threads")?;
    }
    let model = args.model.clone().unwrap_or_else(|| "synthetic".into());
    let report = if args.timing_only {
        let r = simulate(&cfg, None)?;
        print_summary(&cfg, &r);
        r
    } else if let Some(dim) = opts::synthetic_dim(&model)? {
        // `synthetic:DIM`, as `quorum train` names it, or `synthetic` with --dim.
        let dim = dim.or(args.dim).unwrap_or(32);
        let mut src = LeastSquares::new(dim, args.batch.unwrap_or(32), 0.1, cfg.seed);
        let r = attempts(&args, &cfg, &mut src)?;
        print_summary(&cfg, &r);
        println!("  distance to optimum   {:.5}", src.distance(&r.final_params));
        r
    } else {
        let batch = args.batch.unwrap_or(128);
        let data = args.data.clone().unwrap_or_else(|| PathBuf::from("data"));
        let dataset = args.dataset.as_deref().unwrap_or("mnist");
        let mut clf = opts::classifier(
            &model,
            dataset,
            &data,
            args.validation.unwrap_or(5000),
            batch,
            cfg.server.workers,
            cfg.seed,
        )?;
        if let Some(e) = args.epochs {
            cfg.steps = opts::steps_for_epochs(e, clf.train_set().len(), &cfg.server.policy, batch);
        }
        println!(
            "model {model} on {dataset}: {} parameters, {} training examples, batch {batch}, {} steps",
            clf.layout().len(),
            clf.train_set().len(),
            cfg.steps
        );
        let r = attempts(&args, &cfg, &mut clf)?;
        print_summary(&cfg, &r);
        r
    };
    if let Some(dir) = &args.out {
        report.write_to(dir)?;
        if !report.restarts.is_empty() {
            quorum_sim::report::write_restarts(&dir.join("restarts.csv"), &report.restarts)?;
        }
        std::fs::write(dir.join("config.toml"), toml::to_string(&args).context("serialising config")?)?;
        println!(
            "  wrote {}/{{summary.json,events.jsonl,arrivals.csv,metrics.csv,workers.csv,config.toml}}",
            dir.display()
        );
    }
    Ok(())
}

/// Runs `--restarts K` attempts (one without the flag) and keeps the attempt with the best
/// validation accuracy (lowest validation loss where there is no accuracy). Attempt `a`
/// starts from the random weights of seed `seed + a`; the data order stays the same.
fn attempts(args: &SimArgs, cfg: &SimConfig, src: &mut dyn GradientSource) -> Result<SimReport> {
    let k = args.restarts.unwrap_or(1);
    if k == 0 {
        bail!("--restarts must be at least 1 (the number of attempts)");
    }
    if k == 1 {
        let r = simulate(cfg, Some(src))?;
        if r.summary.diverged {
            bail!(
                "training diverged at step {} (a loss was non-finite or above --divergence-loss); lower --lr, \
                 add --warmup or --join-ramp, clip with --clip, or try --restarts 3",
                r.summary.steps
            );
        }
        return Ok(r);
    }
    let mut rows = Vec::new();
    let mut best: Option<(f32, SimReport)> = None;
    for a in 0..k {
        let mut c = cfg.clone();
        c.seed = cfg.seed + u64::from(a);
        let mut r = simulate(&c, Some(&mut *src))?;
        let mut row = Restart {
            attempt: a,
            seed: c.seed,
            diverged: r.summary.diverged,
            steps: r.summary.steps,
            validation_loss: None,
            validation_accuracy: None,
            test_accuracy: r.summary.final_test_accuracy,
            chosen: false,
        };
        if !r.summary.diverged {
            let v = src.validate(&r.final_eval_params)?;
            row.validation_loss = Some(v.loss);
            row.validation_accuracy = v.accuracy;
            r.summary.validation_accuracy = v.accuracy;
            let score = v.accuracy.unwrap_or(-v.loss);
            if best.as_ref().is_none_or(|(b, _)| score > *b) {
                best = Some((score, r));
            }
        }
        println!(
            "attempt {a} (seed {}): {}",
            c.seed,
            if row.diverged {
                format!("diverged at step {}", row.steps)
            } else {
                format!(
                    "validation loss {:.4}{}",
                    row.validation_loss.unwrap_or(f32::NAN),
                    row.validation_accuracy.map_or(String::new(), |a| format!(", accuracy {:.2}%", 100.0 * a))
                )
            }
        );
        rows.push(row);
    }
    let Some((_, mut r)) = best else {
        bail!(
            "all {k} attempts diverged (a loss was non-finite or above --divergence-loss); lower --lr, add \
             --warmup or --join-ramp, or clip with --clip"
        );
    };
    for row in &mut rows {
        row.chosen = row.seed == r.summary.seed;
    }
    println!("kept attempt with seed {} (best validation)", r.summary.seed);
    r.restarts = rows;
    Ok(r)
}

fn print_summary(cfg: &SimConfig, r: &SimReport) {
    let s = &r.summary;
    let shape = match &cfg.server.policy {
        Policy::Sync { aggregate, backups } => format!("sync N={aggregate} b={backups}"),
        Policy::Async { max_staleness } => {
            format!("async max_staleness={}", max_staleness.map_or("none".into(), |m| m.to_string()))
        }
        Policy::Deadline { min, timeout } => {
            format!("deadline min={min} timeout={}s", timeout.as_secs_f64())
        }
    };
    println!("sim: {shape}, {} workers, delay {}, seed {}", s.workers, s.delay, s.seed);
    println!("  steps                 {}", s.steps);
    println!("  virtual time          {:.2} s", s.virtual_seconds);
    println!(
        "  step time             mean {:.4} s, p50 {:.4} s, p99 {:.4} s",
        s.mean_step_seconds, s.p50_step_seconds, s.p99_step_seconds
    );
    println!("  gradients             {} accepted, {} dropped", s.accepted, s.dropped);
    if s.policy == "async" {
        println!("  mean staleness        {:.2}", s.mean_staleness);
    }
    // The straggler is the worker whose work was wasted most often (abandoned or dropped late).
    if let Some(w) = r.workers.iter().max_by_key(|w| (w.abandoned + w.dropped, std::cmp::Reverse(w.worker))) {
        let wasted = w.abandoned + w.dropped;
        println!(
            "  straggler             w{}: {} of {} computations wasted (abandoned or late), mean compute {:.3} s",
            w.worker,
            wasted,
            w.accepted + wasted,
            w.mean_compute().unwrap_or(f64::NAN)
        );
    }
    if let Some(l) = s.final_test_loss {
        println!("  final test loss       {l:.5}");
    }
    if let Some(a) = s.final_test_accuracy {
        println!("  final test accuracy   {:.2}%", 100.0 * a);
    }
    if let Some(t) = cfg.target {
        match (s.target_step, s.target_seconds) {
            (Some(step), Some(secs)) => {
                println!("  reached {:.2}%         at step {step}, {secs:.1} virtual s", 100.0 * t)
            }
            _ => println!("  target {:.2}%          not reached", 100.0 * t),
        }
    }
}

fn sweep(args: &SimArgs, cfg: &SimConfig, range: std::ops::RangeInclusive<u32>) -> Result<()> {
    let budget = args.budget.or(args.workers).unwrap_or(100);
    let rows = sweep_backups(cfg, budget, range)?;
    let base = rows.first().map(|r| r.gradients_per_second).unwrap_or(1.0);
    println!("sweep: {budget} machines, delay {}, {} steps each, seed {}", cfg.delay, cfg.steps, cfg.seed);
    println!(
        "{:>5} {:>4} {:>12} {:>10} {:>10} {:>14} {:>9}",
        "N", "b", "mean step s", "p50 s", "p99 s", "gradients/s", "vs first"
    );
    for r in &rows {
        println!(
            "{:>5} {:>4} {:>12.4} {:>10.4} {:>10.4} {:>14.2} {:>8.2}x",
            r.aggregate,
            r.backups,
            r.mean_step_seconds,
            r.p50_step_seconds,
            r.p99_step_seconds,
            r.gradients_per_second,
            r.gradients_per_second / base
        );
    }
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("sweep.csv");
        let mut w = csv::Writer::from_path(&path)?;
        for r in &rows {
            w.serialize(r)?;
        }
        w.flush()?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
