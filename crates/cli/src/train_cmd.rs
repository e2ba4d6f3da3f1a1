//! `quorum train` (server and workers in one process over loopback), and the same job split
//! across machines: `quorum ps`, `quorum worker`, and `quorum node` (role from `TF_CONFIG`
//! or Slurm).

use crate::run_config::{RunConfig, RunFlags};
use crate::topology::{self, Role, Topology};
use anyhow::{bail, Context, Result};
use clap::Args;
use quorum_compute::GradientSource;
use quorum_net::checkpoint::{self, CheckpointError};
use quorum_net::server::{CheckpointOptions, Progress};
use quorum_net::worker::WorkerReport;
use quorum_net::{run_server, run_worker, ServerOptions, TrainSummary, WorkerOptions};
use std::io::Write;
use std::time::Duration;

/// Flags of `quorum train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    #[command(flatten)]
    flags: RunFlags,
    /// Continue from the newest valid checkpoint in <out>/checkpoints.
    #[arg(long)]
    resume: bool,
}

/// Flags of `quorum ps`.
#[derive(Args, Debug)]
pub struct PsArgs {
    #[command(flatten)]
    flags: RunFlags,
    /// Continue from the newest valid checkpoint in <out>/checkpoints.
    #[arg(long)]
    resume: bool,
}

/// Flags of `quorum worker`.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    flags: RunFlags,
    /// The parameter server, HOST:PORT (default: from TF_CONFIG or Slurm).
    #[arg(long)]
    ps: Option<String>,
    /// This worker's index, 0..workers (default: from TF_CONFIG or Slurm).
    #[arg(long)]
    index: Option<u32>,
}

/// Flags of `quorum node`.
#[derive(Args, Debug)]
pub struct NodeArgs {
    #[command(flatten)]
    flags: RunFlags,
    /// (Parameter server) continue from the newest valid checkpoint.
    #[arg(long)]
    resume: bool,
}

/// The live status line: rewritten in place on a terminal, one line every 5 s otherwise.
fn progress_printer() -> impl FnMut(&Progress) + Send {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let every = if tty { 0.25 } else { 5.0 };
    let mut last = f64::NEG_INFINITY;
    move |p: &Progress| {
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
        if tty {
            eprint!("\r{line}   ");
        } else {
            eprintln!("{line}");
        }
        let _ = std::io::stderr().flush();
    }
}

/// Resolves the flags; `None` when `--print-config` printed it.
fn resolve(flags: &RunFlags) -> Result<Option<RunConfig>> {
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

/// Everything the parameter server needs, with `evaluator` and, for `--resume`, the newest
/// valid checkpoint restored.
fn server_options(
    cfg: &RunConfig,
    evaluator: Box<dyn GradientSource + Send>,
    resume: bool,
    progress: bool,
) -> Result<ServerOptions> {
    let steps = cfg.total_steps(cfg.train_examples(&*evaluator))?;
    let server_cfg = cfg.server_config(steps)?;
    let layout = evaluator.layout().clone();
    let init = evaluator.init_params(cfg.seed);
    let ckpt_dir = cfg.out.join("checkpoints");
    let mut opts = ServerOptions::new(server_cfg, layout, init);
    if resume {
        match checkpoint::load_latest(&ckpt_dir, &opts.layout, &opts.config) {
            Ok((meta, snap, skipped)) => {
                for s in skipped {
                    eprintln!("warning: skipped checkpoint: {s}");
                }
                if meta.step >= steps {
                    bail!(
                        "the newest checkpoint (step {}) already completes this run of {steps} steps; \
                         raise `steps` or `epochs` to train further",
                        meta.step
                    );
                }
                println!("resuming from step {} ({})", meta.step, ckpt_dir.display());
                opts.restore = Some(snap);
            }
            Err(CheckpointError::NoneUsable { skipped, .. }) if skipped.is_empty() => {
                bail!(
                    "nothing to resume: no checkpoint in {}; run without --resume to start afresh",
                    ckpt_dir.display()
                )
            }
            Err(e) => return Err(e.into()),
        }
    }
    opts.out = Some(cfg.out.clone());
    opts.evaluator = Some(evaluator);
    opts.eval_every = (cfg.eval_every > 0).then_some(cfg.eval_every);
    opts.batch = cfg.batch as u64;
    opts.encoding = cfg.encoding()?;
    opts.checkpoint = Some(CheckpointOptions {
        dir: ckpt_dir,
        every_steps: (cfg.checkpoint_every > 0).then_some(cfg.checkpoint_every),
        every_seconds: (cfg.checkpoint_seconds > 0.0).then_some(cfg.checkpoint_seconds),
        keep: cfg.keep_checkpoints,
    });
    opts.run_config = Some(cfg.to_toml()?);
    opts.token = cfg.token()?;
    opts.tls = cfg.tls();
    opts.divergence_loss = Some(cfg.divergence_loss.map_or(f32::INFINITY, |l| l as f32));
    if progress {
        opts.progress = Some(Box::new(progress_printer()));
    }
    cfg.write_to(&cfg.out)?;
    Ok(opts)
}

fn worker_options(cfg: &RunConfig, index: u32, server: &str) -> Result<WorkerOptions> {
    let mut wo = WorkerOptions::new(index, format!("http://{server}"));
    wo.connect_timeout = Duration::from_secs_f64(cfg.connect_timeout);
    wo.heartbeat_every = Duration::from_secs_f64((cfg.worker_timeout / 4.0).max(0.05));
    // A server silent for three of its worker time-outs is frozen or cut off.
    wo.rpc_timeout = Duration::from_secs_f64((3.0 * cfg.worker_timeout).max(1.0));
    wo.delay = cfg.delay_sampler()?;
    wo.seed = cfg.seed;
    wo.token = cfg.token()?;
    wo.tls = cfg.tls();
    Ok(wo)
}

/// Ctrl-C or SIGTERM.
async fn interrupted() {
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

fn print_summary(cfg: &RunConfig, s: &TrainSummary) -> Result<()> {
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
        "  wrote {}/{{summary.json,events.jsonl,metrics.csv,arrivals.csv,workers.csv,config.toml,tensorboard/}}",
        cfg.out.display()
    );
    stopped_early(s)
}

/// The error for a run that stopped before its last step.
fn stopped_early(s: &TrainSummary) -> Result<()> {
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

fn print_worker(i: u32, r: &WorkerReport) {
    println!(
        "  w{i}: {} gradients sent, {} used, {} dropped{}, {:.1} s computing{}",
        r.sent,
        r.accepted,
        r.dropped,
        if r.unsent_late > 0 { format!(" ({} known late, not sent)", r.unsent_late) } else { String::new() },
        r.compute_seconds,
        if r.reconnects > 0 { format!(", {} reconnects", r.reconnects) } else { String::new() }
    );
}

/// Runs `quorum train`: one run, or with `restarts = K` K attempts from the random weights of
/// seeds seed, seed+1, ... (each in `<out>/attempt-<k>`), keeping the best on validation.
pub fn train(a: TrainArgs) -> Result<()> {
    let Some(cfg) = resolve(&a.flags)? else { return Ok(()) };
    if cfg.restarts <= 1 {
        let summary = train_once(&cfg, a.resume)?;
        return print_summary(&cfg, &summary);
    }
    if a.resume {
        bail!("--resume continues one run; it cannot be combined with restarts = {}", cfg.restarts);
    }
    std::fs::create_dir_all(&cfg.out).with_context(|| format!("cannot create {}", cfg.out.display()))?;
    let mut rows = Vec::new();
    let mut best: Option<(f32, u32)> = None;
    for k in 0..cfg.restarts {
        let mut attempt = cfg.clone();
        attempt.seed = cfg.seed + u64::from(k);
        attempt.out = cfg.out.join(format!("attempt-{k}"));
        println!("== attempt {k} of {} (seed {}) in {}", cfg.restarts, attempt.seed, attempt.out.display());
        let s = train_once(&attempt, false)?;
        let _ = print_summary(&attempt, &s);
        let score = s.final_validation_accuracy.or(s.final_validation_loss.map(|l| -l));
        match (s.diverged, score) {
            (true, _) => println!("attempt {k}: diverged at step {}", s.steps),
            (false, Some(v)) if s.stop_reason.is_none() => {
                println!("attempt {k}: validation {}", describe_validation(&s));
                if best.is_none_or(|(b, _)| v > b) {
                    best = Some((v, k));
                }
            }
            _ => stopped_early(&s)?,
        }
        rows.push(quorum_sim::Restart {
            attempt: k,
            seed: attempt.seed,
            diverged: s.diverged,
            steps: s.steps,
            validation_loss: s.final_validation_loss,
            validation_accuracy: s.final_validation_accuracy,
            test_accuracy: s.final_test_accuracy,
            chosen: false,
        });
    }
    for r in &mut rows {
        r.chosen = best.is_some_and(|(_, b)| b == r.attempt);
    }
    let path = cfg.out.join("restarts.csv");
    quorum_sim::report::write_restarts(&path, &rows)?;
    let Some((_, k)) = best else {
        bail!("all {} attempts diverged (see {}); lower lr, add warmup or clip", cfg.restarts, path.display());
    };
    println!(
        "kept attempt {k}: {} (best validation; all attempts in {})",
        cfg.out.join(format!("attempt-{k}")).display(),
        path.display()
    );
    Ok(())
}

fn describe_validation(s: &TrainSummary) -> String {
    match (s.final_validation_accuracy, s.final_validation_loss) {
        (Some(a), _) => format!("accuracy {:.2}%", 100.0 * a),
        (None, Some(l)) => format!("loss {l:.5}"),
        _ => "-".into(),
    }
}

/// One training run: server and workers in this process over loopback.
fn train_once(cfg: &RunConfig, resume: bool) -> Result<TrainSummary> {
    // The data is loaded once and shared by the workers and the evaluator.
    let mut sources = cfg.sources(cfg.workers as usize + 1)?;
    let evaluator = sources.pop().expect("workers + 1 sources");
    let opts = server_options(cfg, evaluator, resume, true)?;
    let steps = opts.config.max_steps.unwrap_or(0);
    let rt = runtime()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("cannot listen on 127.0.0.1")?;
        let addr = listener.local_addr()?;
        println!(
            "quorum train: {} on {}, {} workers ({}), server {addr}, {steps} steps",
            cfg.model,
            cfg.dataset,
            cfg.workers,
            cfg.shape()
        );
        let server = tokio::spawn(run_server(listener, opts, interrupted()));
        let mut workers = Vec::new();
        for (i, src) in sources.into_iter().enumerate() {
            workers.push(tokio::spawn(run_worker(worker_options(cfg, i as u32, &addr.to_string())?, src)));
        }
        let summary = server.await.context("server task")??;
        eprintln!();
        for (i, w) in workers.into_iter().enumerate() {
            match tokio::time::timeout(Duration::from_secs(10), w).await {
                Ok(Ok(Ok(r))) => print_worker(i as u32, &r),
                Ok(Ok(Err(e))) => println!("  w{i}: failed: {e}"),
                Ok(Err(e)) => println!("  w{i}: crashed: {e}"),
                Err(_) => println!("  w{i}: did not stop within 10 s"),
            }
        }
        anyhow::Ok(summary)
    })
}

fn check_workers(cfg: &RunConfig, t: &Topology) -> Result<()> {
    if t.workers != cfg.workers {
        bail!(
            "{} describes {} workers but the configuration says workers = {}; make them agree",
            t.source,
            t.workers,
            cfg.workers
        );
    }
    Ok(())
}

fn serve(cfg: &RunConfig, listen: &str, resume: bool) -> Result<()> {
    if cfg.restarts > 1 {
        bail!(
            "restarts = {} is a `quorum train` option; a multi-host run restarts by running `quorum ps` again \
             with another seed",
            cfg.restarts
        );
    }
    let loopback =
        listen.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_loopback()) || listen.starts_with("localhost:");
    if !loopback && cfg.token()?.is_none() {
        bail!(
            "the parameter server on {listen} is reachable from other machines, so it needs a join token: \
             set QUORUM_TOKEN (or token-file) to the same long random secret for the server and every worker"
        );
    }
    let opts = server_options(cfg, cfg.source()?, resume, true)?;
    let steps = opts.config.max_steps.unwrap_or(0);
    let rt = runtime()?;
    let summary = rt.block_on(async {
        let listener =
            tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
        println!(
            "quorum ps: listening on {} for {} workers ({}), {} on {}, {steps} steps",
            listener.local_addr()?,
            cfg.workers,
            cfg.shape(),
            cfg.model,
            cfg.dataset
        );
        let _ = std::io::stdout().flush();
        anyhow::Ok(run_server(listener, opts, interrupted()).await?)
    })?;
    eprintln!();
    print_summary(cfg, &summary)
}

fn work(cfg: &RunConfig, index: u32, ps: &str) -> Result<()> {
    if index >= cfg.workers {
        bail!("worker index {index} is out of range: the configuration has workers = {}", cfg.workers);
    }
    let src = cfg.source()?;
    let wo = worker_options(cfg, index, ps)?;
    println!("quorum worker {index}: server {ps}, {} ({} parameters)", cfg.model, src.layout().len());
    let _ = std::io::stdout().flush();
    let report = runtime()?.block_on(run_worker(wo, src))?;
    print_worker(index, &report);
    Ok(())
}

/// The cluster spec names the server's port: listen on it on every interface.
fn all_interfaces(t: &Topology) -> String {
    format!("0.0.0.0:{}", crate::run_config::port_of(&t.ps).unwrap_or(7070))
}

/// Runs `quorum ps`.
pub fn ps(a: PsArgs) -> Result<()> {
    let Some(cfg) = resolve(&a.flags)? else { return Ok(()) };
    let mut listen = cfg.listen.clone();
    if let Some(t) = topology::from_env(cfg.listen_port())? {
        println!("{t}");
        check_workers(&cfg, &t)?;
        if t.role != Role::Ps {
            bail!(
                "{} says this process is not the parameter server ({t}); run `quorum worker` or `quorum node`",
                t.source
            );
        }
        listen = all_interfaces(&t);
    }
    serve(&cfg, &listen, a.resume)
}

/// Runs `quorum worker`.
pub fn worker(a: WorkerArgs) -> Result<()> {
    let Some(cfg) = resolve(&a.flags)? else { return Ok(()) };
    let (ps, index) = match (a.ps, a.index) {
        (Some(ps), Some(i)) => (ps, i),
        (ps, index) => {
            let t = topology::from_env(7070)?
                .context("give --ps HOST:PORT and --index I, or run under TF_CONFIG or Slurm")?;
            println!("{t}");
            check_workers(&cfg, &t)?;
            let Role::Worker(i) = t.role else {
                bail!("{} says this process is the parameter server; run `quorum ps` or `quorum node`", t.source)
            };
            (ps.unwrap_or(t.ps), index.unwrap_or(i))
        }
    };
    work(&cfg, index, &ps)
}

/// Runs `quorum node`: the role `TF_CONFIG` or Slurm gives this process.
pub fn node(a: NodeArgs) -> Result<()> {
    let Some(cfg) = resolve(&a.flags)? else { return Ok(()) };
    let t = topology::from_env(cfg.listen_port())?
        .context("quorum node needs TF_CONFIG or Slurm variables (SLURM_PROCID, ...); use `quorum ps` / `quorum worker` otherwise")?;
    println!("{t}");
    check_workers(&cfg, &t)?;
    match t.role {
        Role::Ps => serve(&cfg, &all_interfaces(&t), a.resume),
        Role::Worker(i) => work(&cfg, i, &t.ps),
    }
}
