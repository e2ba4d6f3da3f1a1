//! `quorum train`: a parameter server and N+b workers on this machine, over loopback gRPC.

use crate::opts;
use anyhow::{bail, Context, Result};
use clap::Args;
use quorum_compute::GradientSource;
use quorum_core::{OptimizerConfig, Policy, ServerConfig};
use quorum_net::server::Progress;
use quorum_net::{run_server, run_worker, ServerOptions, WorkerOptions};
use quorum_sim::DelayModel;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Flags of `quorum train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Workers (N + b).
    #[arg(long, default_value_t = 4)]
    workers: u32,
    /// Backup workers b (sync policy).
    #[arg(long, default_value_t = 1)]
    backups: u32,
    /// sync | async.
    #[arg(long, default_value = "sync")]
    policy: String,
    /// Async: drop gradients more than this many updates old.
    #[arg(long)]
    max_staleness: Option<u64>,
    /// mlp, mlp:W1,W2,..., cnn, cnn:C1,C2,C3,C4.
    #[arg(long, default_value = "mlp")]
    model: String,
    /// mnist, fashion-mnist, cifar10.
    #[arg(long, default_value = "mnist")]
    dataset: String,
    /// Data root holding <dataset>/.
    #[arg(long, default_value = "data")]
    data: PathBuf,
    /// Training examples held out for validation.
    #[arg(long, default_value_t = 5000)]
    validation: usize,
    /// Examples per worker mini-batch.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Epochs to train (sets the number of steps).
    #[arg(long, default_value_t = 2.0)]
    epochs: f64,
    /// Updates to run (overrides --epochs).
    #[arg(long)]
    steps: Option<u64>,
    /// Optimizer: sgd, momentum:M, nesterov:M, rmsprop[...], adam[...].
    #[arg(long, default_value = "momentum:0.9")]
    optimizer: String,
    /// Learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f32,
    /// Evaluate on the test set every this many steps.
    #[arg(long, default_value_t = 100)]
    eval_every: u64,
    /// Injected straggling before each gradient, a delay model as in `quorum sim --delay`.
    #[arg(long)]
    delay: Option<String>,
    /// Declare a worker gone after this many seconds without a message from it.
    #[arg(long, default_value_t = 10.0)]
    worker_timeout: f64,
    /// Stop if fewer than N workers are alive for this many seconds.
    #[arg(long, default_value_t = 30.0)]
    stall_timeout: f64,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Port on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Run directory.
    #[arg(long, default_value = "runs/train")]
    out: PathBuf,
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
        let slow = p.slowest.map_or("-".into(), |w| format!("w{w}"));
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

/// Runs `quorum train`.
pub fn run(a: TrainArgs) -> Result<()> {
    let policy = match a.policy.as_str() {
        "sync" => {
            if a.backups >= a.workers {
                bail!("--backups ({}) must be smaller than --workers ({})", a.backups, a.workers);
            }
            Policy::Sync { aggregate: a.workers - a.backups, backups: a.backups }
        }
        "async" => Policy::Async { max_staleness: a.max_staleness },
        other => bail!("unknown policy `{other}` for train: use sync or async"),
    };
    let delay = match &a.delay {
        Some(d) => Some(d.parse::<DelayModel>().map_err(anyhow::Error::msg)?.sampler().map_err(anyhow::Error::msg)?),
        None => None,
    };
    let make = || opts::classifier(&a.model, &a.dataset, &a.data, a.validation, a.batch, a.workers, a.seed);
    let evaluator = make()?;
    let steps = a.steps.unwrap_or_else(|| {
        let per_step = policy.aggregate_hint().max(1) as f64 * a.batch as f64;
        ((a.epochs * evaluator.train_set().len() as f64) / per_step).ceil().max(1.0) as u64
    });
    let mut cfg = ServerConfig::new(a.workers, policy, a.lr);
    cfg.optimizer = if a.optimizer == "sgd" { OptimizerConfig::Sgd } else { opts::optimizer(&a.optimizer)? };
    cfg.max_steps = Some(steps);
    cfg.liveness.worker_timeout = Some(Duration::from_secs_f64(a.worker_timeout));
    cfg.liveness.stall_timeout = Some(Duration::from_secs_f64(a.stall_timeout));
    cfg.validate()?;
    let layout = evaluator.layout().clone();
    let init = evaluator.init_params(a.seed);
    let mut sources = Vec::new();
    for _ in 0..a.workers {
        sources.push(make()?);
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    std::fs::write(a.out.join("config.toml"), toml::to_string(&cfg).context("serialising config")?)?;

    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let started = Instant::now();
    let summary = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", a.port))
            .await
            .with_context(|| format!("cannot listen on 127.0.0.1:{}", a.port))?;
        let addr = listener.local_addr()?;
        println!(
            "quorum train: {} on {}, {} workers ({}), server {addr}, {steps} steps",
            a.model,
            a.dataset,
            a.workers,
            match &cfg.policy {
                Policy::Sync { aggregate, backups } => format!("sync N={aggregate} b={backups}"),
                other => other.name().to_string(),
            }
        );
        let opts = ServerOptions {
            config: cfg.clone(),
            layout,
            init,
            out: Some(a.out.clone()),
            evaluator: Some(Box::new(evaluator)),
            eval_every: Some(a.eval_every),
            batch: a.batch as u64,
            progress: Some(Box::new(progress_printer())),
        };
        let server = tokio::spawn(run_server(listener, opts, async {
            let _ = tokio::signal::ctrl_c().await;
        }));
        let mut workers = Vec::new();
        for (i, src) in sources.into_iter().enumerate() {
            let wo = WorkerOptions {
                index: i as u32,
                server: format!("http://{addr}"),
                connect_timeout: Duration::from_secs(10),
                delay: delay.clone(),
                seed: a.seed,
            };
            workers.push(tokio::spawn(run_worker(wo, Box::new(src) as Box<dyn GradientSource + Send>)));
        }
        let summary = server.await.context("server task")??;
        eprintln!();
        for (i, w) in workers.into_iter().enumerate() {
            match tokio::time::timeout(Duration::from_secs(10), w).await {
                Ok(Ok(Ok(r))) => println!(
                    "  w{i}: {} gradients sent, {} used, {} dropped, {:.1} s computing",
                    r.sent, r.accepted, r.dropped, r.compute_seconds
                ),
                Ok(Ok(Err(e))) => println!("  w{i}: failed: {e}"),
                Ok(Err(e)) => println!("  w{i}: crashed: {e}"),
                Err(_) => println!("  w{i}: did not stop within 10 s"),
            }
        }
        anyhow::Ok(summary)
    })?;
    println!("  steps                 {}", summary.steps);
    println!("  wall time             {:.2} s ({:.1} steps/s)", summary.wall_seconds, summary.steps_per_second);
    println!("  gradients             {} accepted, {} dropped", summary.accepted, summary.dropped);
    if let Some(acc) = summary.final_test_accuracy {
        println!("  final test accuracy   {:.2}%", 100.0 * acc);
    }
    println!(
        "  wrote {}/{{summary.json,events.jsonl,metrics.csv,workers.csv,config.toml}} in {:.1} s",
        a.out.display(),
        started.elapsed().as_secs_f64()
    );
    if let Some(reason) = summary.stop_reason {
        bail!("training stopped early: {reason}");
    }
    Ok(())
}
