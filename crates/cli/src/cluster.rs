//! What the commands that run a cluster share (`train`, `ps`, `worker`, `node`): resolving
//! the configuration, the server's and a worker's options, the progress line, the summary.

use crate::config::{RunConfig, RunFlags};
use crate::topology::Topology;
use anyhow::{bail, Context, Result};
use quorum_compute::GradientSource;
use quorum_core::ParamLayout;
use quorum_net::checkpoint::{self, CheckpointError};
use quorum_net::server::{CheckpointOptions, Progress, ShardOptions};
use quorum_net::worker::WorkerReport;
use quorum_net::{ServerOptions, TrainSummary, WorkerOptions};
use std::time::Duration;

/// The live status line, for people: on a terminal an `indicatif` line rewritten in place;
/// otherwise (a log file, a pipe) no status line, but a `tracing` info line every 30 s so a
/// long unattended run still shows it is alive.
pub(crate) fn progress_printer() -> impl FnMut(&Progress) + Send {
    use std::io::IsTerminal;
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.set_style(indicatif::ProgressStyle::with_template("{msg}").expect("a valid template"));
        bar
    });
    let mut last = f64::NEG_INFINITY;
    move |p: &Progress| {
        let every = if bar.is_some() { 0.25 } else { 30.0 };
        if p.seconds - last < every {
            return;
        }
        last = p.seconds;
        let acc = p.accuracy.map_or("-".into(), |a| format!("{:.2}%", 100.0 * a));
        let loss = p.loss.map_or("-".into(), |l| format!("{l:.4}"));
        let slow = p.slowest.map_or("-".into(), |(w, s)| format!("w{w} ({:.0} ms)", 1000.0 * s));
        let line = format!(
            "step {:>6} | {:>7.0} ex/s | loss {loss} | test acc {acc} | dropped {} | slowest {slow}",
            p.step, p.examples_per_second, p.dropped
        );
        match &bar {
            Some(bar) => bar.set_message(line),
            None => tracing::info!("{line}"),
        }
    }
}

/// Resolves the flags; `None` when `--print-config` printed it.
pub(crate) fn resolve(flags: &RunFlags) -> Result<Option<RunConfig>> {
    let cfg = flags.resolve()?;
    if flags.print_config {
        print!("{}", cfg.to_toml()?);
        return Ok(None);
    }
    if let Some(n) = cfg.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global().context("setting threads")?;
    }
    Ok(Some(cfg))
}

/// The model a server serves: its layout and starting values, the steps of the run, and
/// who evaluates it.
pub(crate) struct Served {
    layout: ParamLayout,
    init: Vec<f32>,
    steps: u64,
    evaluator: Option<Box<dyn GradientSource + Send>>,
}

impl Served {
    /// A built-in model, which the server also evaluates.
    pub(crate) fn model(cfg: &RunConfig, evaluator: Box<dyn GradientSource + Send>) -> Result<Self> {
        Ok(Served {
            layout: evaluator.layout().clone(),
            init: evaluator.init_params(cfg.seed),
            steps: cfg.total_steps(cfg.train_examples(&*evaluator))?,
            evaluator: Some(evaluator),
        })
    }

    /// The model of a parameter file (`params`), computed by the workers alone (PyTorch).
    pub(crate) fn params_file(cfg: &RunConfig, path: &std::path::Path) -> Result<Self> {
        let Some(steps) = cfg.steps else {
            bail!(
                "params = {} serves a model the server does not compute, so it cannot count epochs of data it \
                 never sees: give steps (--steps N)",
                path.display()
            );
        };
        let (layout, init) = quorum_net::params_file::read(path)
            .with_context(|| format!("cannot read the parameter file {}", path.display()))?;
        Ok(Served { layout, init, steps, evaluator: None })
    }

    /// The evaluator, taken out (a sharded run evaluates the model once its shards are put
    /// together, not in any one server).
    pub(crate) fn take_evaluator(&mut self) -> Option<Box<dyn GradientSource + Send>> {
        self.evaluator.take()
    }

    /// The same model for another shard's server (no evaluator).
    pub(crate) fn share(&self) -> Self {
        Served { layout: self.layout.clone(), init: self.init.clone(), steps: self.steps, evaluator: None }
    }

    /// `params` when set, else the configured built-in model.
    pub(crate) fn from_config(cfg: &RunConfig) -> Result<Self> {
        match &cfg.params {
            Some(p) => Self::params_file(cfg, p),
            None => Self::model(cfg, cfg.source()?),
        }
    }

    /// What to print for the model: its name or its file.
    pub(crate) fn describe(&self, cfg: &RunConfig) -> String {
        match &cfg.params {
            Some(p) => format!("the model of {} ({} parameters)", p.display(), self.layout.len()),
            None => format!("{} on {}", cfg.model, cfg.dataset),
        }
    }
}

/// Everything the parameter server needs for `served` and, for `--resume`, the newest valid
/// checkpoint restored.
pub(crate) fn server_options(cfg: &RunConfig, served: Served, resume: bool, progress: bool) -> Result<ServerOptions> {
    let Served { layout, init, steps, evaluator } = served;
    let server_cfg = cfg.server_config(steps)?;
    let shard = shard_options(cfg, &server_cfg, &layout)?;
    let ckpt_dir = cfg.run_dir().join("checkpoints");
    // A shard's checkpoints hold its range, under a layout that names the shard and the split.
    let ckpt_layout = shard.as_ref().map_or_else(|| layout.clone(), |s| s.plan.layout_of(&layout, s.index));
    let mut opts = ServerOptions::new(server_cfg, layout, init);
    if resume {
        let (meta, snap) = restore(cfg, &ckpt_dir, &ckpt_layout, &opts.config)?;
        if meta.step >= steps {
            bail!(
                "the checkpoint of step {} already completes this run of {steps} steps; raise `steps` or `epochs` \
                 to train further",
                meta.step
            );
        }
        println!("resuming from step {} ({})", meta.step, ckpt_dir.display());
        opts.restore = Some(snap);
    }
    opts.out = Some(cfg.run_dir());
    opts.evaluator = evaluator;
    opts.eval_every = (cfg.eval_every > 0).then_some(cfg.eval_every);
    opts.batch = cfg.batch as u64;
    opts.encoding = cfg.encoding()?;
    opts.checkpoint = Some(CheckpointOptions {
        dir: ckpt_dir,
        every_steps: (cfg.checkpoint_every > 0).then_some(cfg.checkpoint_every),
        // Shards checkpoint by steps only, so that they all write the same steps.
        every_seconds: (cfg.checkpoint_seconds > 0.0 && cfg.shards <= 1).then_some(cfg.checkpoint_seconds),
        keep: cfg.keep_checkpoints,
    });
    opts.run_config = Some(cfg.to_toml()?);
    opts.token = cfg.token()?;
    opts.tls = cfg.tls();
    opts.window = cfg.window()?;
    opts.shared_memory = cfg.shared_memory;
    opts.divergence_loss = Some(cfg.divergence_loss.map_or(f32::INFINITY, |l| l as f32));
    if progress {
        opts.progress = Some(Box::new(progress_printer()));
    }
    if shard.is_some() {
        // Each shard holds a part of the model: no one server can evaluate it.
        opts.evaluator = None;
        opts.shard = shard;
    }
    cfg.write_to(&cfg.run_dir())?;
    Ok(opts)
}

/// The checkpoint to resume from in `dir`: of step `resume-step` when given, else the newest
/// that loads and matches.
fn restore(
    cfg: &RunConfig,
    dir: &std::path::Path,
    layout: &ParamLayout,
    config: &quorum_core::ServerConfig,
) -> Result<(checkpoint::CheckpointMeta, quorum_core::ServerSnapshot)> {
    if let Some(step) = cfg.resume_step {
        let listed = checkpoint::list(dir);
        let Some((_, json)) = listed.iter().find(|(s, _)| *s == step) else {
            let have: Vec<String> = listed.iter().map(|(s, _)| s.to_string()).collect();
            bail!(
                "no checkpoint of step {step} in {} (it has: {}); --resume-step names a step a checkpoint was written at",
                dir.display(),
                if have.is_empty() { "none".to_string() } else { have.join(", ") }
            );
        };
        return Ok(checkpoint::load(json, layout, config)?);
    }
    match checkpoint::load_latest(dir, layout, config) {
        Ok((meta, snap, skipped)) => {
            for s in skipped {
                eprintln!("warning: skipped checkpoint: {s}");
            }
            Ok((meta, snap))
        }
        Err(CheckpointError::NoneUsable { skipped, .. }) if skipped.is_empty() => {
            bail!("nothing to resume: no checkpoint in {}; run without --resume to start afresh", dir.display())
        }
        Err(e) => Err(e.into()),
    }
}

/// A sharded run (`shards` > 1): which shard this server is and how the model is split.
fn shard_options(
    cfg: &RunConfig,
    server: &quorum_core::ServerConfig,
    layout: &ParamLayout,
) -> Result<Option<ShardOptions>> {
    if cfg.shards <= 1 {
        return Ok(None);
    }
    quorum_core::check_shardable(server, cfg.shards)?;
    if cfg.shard > 0 && cfg.coordinator.is_none() {
        bail!("shard {} needs shard 0's address, which runs the coordinator: --coordinator HOST:PORT", cfg.shard);
    }
    Ok(Some(ShardOptions {
        index: cfg.shard,
        plan: quorum_core::ShardPlan::new(layout, cfg.shards)?,
        coordinator: cfg.coordinator.as_ref().map(|a| format!("http://{a}")),
    }))
}

/// A worker's options. `server`: the server's HOST:PORT, or in a sharded run every shard's,
/// comma-separated, shard 0 first.
pub(crate) fn worker_options(cfg: &RunConfig, index: u32, server: &str) -> Result<WorkerOptions> {
    let servers: Vec<String> = server.split(',').map(|a| format!("http://{}", a.trim())).collect();
    if servers.len() != cfg.shards as usize {
        bail!(
            "{} server address(es) for a run of shards = {}: give every shard's HOST:PORT, comma-separated, shard 0 first",
            servers.len(),
            cfg.shards
        );
    }
    let mut wo = WorkerOptions::new(index, servers[0].clone());
    wo.shards = servers[1..].to_vec();
    wo.connect_timeout = Duration::from_secs_f64(cfg.connect_timeout);
    wo.heartbeat_every = Duration::from_secs_f64((cfg.worker_timeout / 4.0).max(0.05));
    // A server silent for three of its worker time-outs is frozen or cut off.
    wo.rpc_timeout = Duration::from_secs_f64((3.0 * cfg.worker_timeout).max(1.0));
    wo.delay = cfg.delay_sampler()?;
    wo.seed = cfg.seed;
    wo.token = cfg.token()?;
    wo.tls = cfg.tls();
    wo.window = cfg.window()?;
    wo.shared_memory = cfg.shared_memory;
    wo.abandon = cfg.abandon;
    Ok(wo)
}

/// Ctrl-C or SIGTERM.
pub(crate) async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

pub(crate) fn print_summary(cfg: &RunConfig, s: &TrainSummary) -> Result<()> {
    println!(
        "  steps                 {}{}",
        s.steps,
        if s.start_step > 0 { format!(" (resumed at {})", s.start_step) } else { String::new() }
    );
    println!("  wall time             {:.2} s ({:.1} steps/s)", s.wall_seconds, s.steps_per_second);
    println!("  gradients             {} accepted, {} dropped, {} rejected", s.accepted, s.dropped, s.rejected);
    if let Some(acc) = s.final_test_accuracy {
        println!("  final test accuracy   {:.2}%", 100.0 * acc);
    } else if let Some(l) = s.final_test_loss {
        println!("  final test loss       {l:.5}");
    }
    if let Some(c) = &s.checkpoint {
        println!("  checkpoint            {}", c.display());
    }
    println!(
        "  wrote {}/{{summary.json,events.jsonl,metrics.csv,arrivals.csv,workers.csv,timings.csv,config.toml,tensorboard/}}",
        cfg.run_dir().display()
    );
    stopped_early(s)
}

/// The error for a run that stopped before its last step.
pub(crate) fn stopped_early(s: &TrainSummary) -> Result<()> {
    let Some(reason) = &s.stop_reason else { return Ok(()) };
    if s.diverged {
        bail!(
            "{reason}, at step {}; random restarts (restarts = 3) run new attempts and keep the one with \
             the best validation accuracy",
            s.steps
        );
    }
    match &s.checkpoint {
        Some(c) => {
            bail!("training stopped early at step {}: {reason}; saved {}; continue with --resume", s.steps, c.display())
        }
        None => bail!("training stopped early at step {}: {reason}", s.steps),
    }
}

pub(crate) fn print_worker(i: u32, r: &WorkerReport) {
    let used = match r.held {
        0 => format!("{} used", r.accepted),
        held => format!("{held} taken by every shard"),
    };
    println!(
        "  w{i}: {} gradients sent, {used}, {} dropped{}, {:.1} s computing{}{}",
        r.sent,
        r.dropped,
        match (r.unsent_late, r.abandoned) {
            (0, _) => String::new(),
            (late, 0) => format!(" ({late} known late, not sent)"),
            (late, stopped) => format!(" ({late} known late, not sent; {stopped} of them stopped half-way)"),
        },
        r.compute_seconds,
        match (r.shm_pushes, r.awaited) {
            (0, _) => String::new(),
            (pushes, 0) => format!(", {pushes} through shared memory"),
            (pushes, awaited) =>
                format!(", {pushes} through shared memory ({awaited} steps awaited there, not pulled)"),
        },
        if r.reconnects > 0 { format!(", {} reconnects", r.reconnects) } else { String::new() }
    );
}

pub(crate) fn check_workers(cfg: &RunConfig, t: &Topology) -> Result<()> {
    if t.workers != cfg.workers {
        bail!(
            "{} describes {} workers but the configuration says workers = {}; make them agree",
            t.source,
            t.workers,
            cfg.workers
        );
    }
    if t.ps.len() != cfg.shards as usize {
        bail!(
            "{} lists {} parameter server(s) but the configuration says shards = {}; make them agree (each ps \
             entry is one shard)",
            t.source,
            t.ps.len(),
            cfg.shards
        );
    }
    Ok(())
}

/// The configuration of a server whose place the topology gives: which shard it is, where
/// the coordinator (shard 0) is, and (shard k > 0) the run directory `<out>/shard-<k>`, as
/// `quorum train --shards` lays them out, so that every shard can share one volume.
pub(crate) fn as_shard(cfg: &RunConfig, t: &Topology, k: u32) -> RunConfig {
    let mut cfg = cfg.clone();
    cfg.shard = k;
    if k > 0 {
        cfg.coordinator = t.ps.first().cloned();
        cfg.out = Some(cfg.run_dir().join(format!("shard-{k}")));
    }
    cfg
}

/// The cluster spec names the server's port: listen on it on every interface.
pub(crate) fn all_interfaces(t: &Topology) -> String {
    let mine = match t.role {
        crate::topology::Role::Ps(k) => t.ps.get(k as usize),
        crate::topology::Role::Worker(_) => t.ps.first(),
    };
    format!("0.0.0.0:{}", mine.and_then(|a| crate::config::port_of(a)).unwrap_or(7070))
}
