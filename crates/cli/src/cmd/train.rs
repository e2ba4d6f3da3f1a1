//! `quorum train`: a parameter server and its workers in one process over loopback.

use crate::cluster::{
    interrupted, print_summary, print_worker, resolve, runtime, server_options, stopped_early, worker_options, Served,
};
use crate::config::{RunConfig, RunFlags};
use crate::restarts;
use anyhow::{bail, Context, Result};
use clap::Args;
use quorum_compute::GradientSource;
use quorum_net::worker::{WorkerError, WorkerReport};
use quorum_net::{run_server, run_worker, TrainSummary};
use quorum_record::Restart;
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

/// Runs `quorum train`: one run, or with `restarts = K` K attempts (each in
/// `<out>/attempt-<k>`), the best on validation kept (see [`restarts::best_of`]).
pub fn train(a: TrainArgs) -> Result<()> {
    let Some(cfg) = resolve(&a.flags)? else { return Ok(()) };
    if cfg.restarts <= 1 {
        let summary = train_once(&cfg, a.resume)?;
        return print_summary(&cfg, &summary);
    }
    if a.resume {
        bail!("--resume continues one run; it cannot be combined with restarts = {}", cfg.restarts);
    }
    let dir = cfg.run_dir();
    let (_, k) = restarts::best_of(cfg.restarts, cfg.seed, Some(&dir), |k, seed| {
        let mut attempt = cfg.clone();
        attempt.seed = seed;
        attempt.out = Some(dir.join(format!("attempt-{k}")));
        println!("== attempt {k} of {} (seed {seed}) in {}", cfg.restarts, attempt.run_dir().display());
        let s = train_once(&attempt, false)?;
        let _ = print_summary(&attempt, &s);
        if !s.diverged {
            // Interrupted, stalled: not an attempt to compare, an error to report.
            stopped_early(&s)?;
        }
        let row = Restart {
            attempt: k,
            seed,
            diverged: s.diverged,
            steps: s.steps,
            validation_loss: s.final_validation_loss,
            validation_accuracy: s.final_validation_accuracy,
            test_accuracy: s.final_test_accuracy,
            chosen: false,
        };
        Ok((row, ()))
    })?;
    println!("the kept run is {}", dir.join(format!("attempt-{k}")).display());
    Ok(())
}

/// One training run: server and workers in this process over loopback.
fn train_once(cfg: &RunConfig, resume: bool) -> Result<TrainSummary> {
    // The data is loaded once and shared by the workers and the evaluator.
    // (A sharded run evaluates twice over: an evaluator during the run, the model put
    // together at the end.)
    let extra = if cfg.shards > 1 { 2 } else { 1 };
    let mut sources = cfg.sources(cfg.workers as usize + extra)?;
    let evaluator = sources.pop().expect("workers + 1 sources");
    if cfg.shards > 1 {
        let during = sources.pop().expect("workers + 2 sources");
        return train_sharded(cfg, resume, sources, evaluator, during);
    }
    let opts = server_options(cfg, Served::model(cfg, evaluator)?, resume, true)?;
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
        report_workers(workers).await;
        anyhow::Ok(summary)
    })
}

/// A sharded run in this process: `shards` servers on loopback (shard `k` > 0 writing its
/// record into `<out>/shard-<k>`), the workers pushing to all of them, an evaluator pulling
/// every shard's part every `eval-every` steps (`during`), and the model put together from
/// the shards' final parts for the validation split at the end.
fn train_sharded(
    cfg: &RunConfig,
    resume: bool,
    sources: Vec<Box<dyn GradientSource + Send>>,
    evaluator: Box<dyn GradientSource + Send>,
    mut during: Box<dyn GradientSource + Send>,
) -> Result<TrainSummary> {
    let mut served = Served::model(cfg, evaluator)?;
    let mut evaluator = served.take_evaluator().expect("a built-in model has an evaluator");
    let rt = runtime()?;
    rt.block_on(async {
        let mut listeners = Vec::new();
        for _ in 0..cfg.shards {
            listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.context("cannot listen on 127.0.0.1")?);
        }
        let addrs: Vec<String> =
            listeners.iter().map(|l| l.local_addr().map(|a| a.to_string())).collect::<Result<_, _>>()?;
        let resume_step = match (resume, cfg.resume_step) {
            (true, None) => Some(common_checkpoint(cfg)?),
            (_, step) => step,
        };
        let mut servers = Vec::new();
        let mut steps = 0;
        for (k, listener) in listeners.into_iter().enumerate() {
            let mut shard = cfg.clone();
            shard.shard = k as u32;
            shard.coordinator = Some(addrs[0].clone());
            shard.out = Some(shard_dir(cfg, k as u32));
            shard.resume_step = resume_step;
            let opts = server_options(&shard, served.share(), resume, k == 0)?;
            steps = opts.config.max_steps.unwrap_or(0);
            servers.push(tokio::spawn(run_server(listener, opts, interrupted())));
        }
        println!(
            "quorum train: {} on {}, {} workers ({}), {} servers {}, {steps} steps",
            cfg.model,
            cfg.dataset,
            cfg.workers,
            cfg.shape(),
            cfg.shards,
            addrs.join(" ")
        );
        let every = addrs.join(",");
        let mut workers = Vec::new();
        for (i, src) in sources.into_iter().enumerate() {
            workers.push(tokio::spawn(run_worker(worker_options(cfg, i as u32, &every)?, src)));
        }
        // No one shard holds the model: an evaluator pulls every shard's part and reports to
        // shard 0, which records it as its own evaluations (metrics.csv, the progress line).
        let eval_task = (cfg.eval_every > 0).then(|| {
            let num_params = during.layout().len();
            let f: quorum_net::evaluate::EvaluateFn = Box::new(move |_, params| during.evaluate(params));
            worker_options(cfg, 0, &every)
                .map(|o| tokio::spawn(quorum_net::evaluate::run_evaluator(o, num_params, cfg.eval_every, f)))
        });
        let eval_task = eval_task.transpose()?;
        let mut summaries = Vec::new();
        for s in servers {
            summaries.push(s.await.context("server task")??);
        }
        eprintln!();
        report_workers(workers).await;
        if let Some(t) = eval_task {
            if let Ok(Ok(Err(e))) = tokio::time::timeout(Duration::from_secs(10), t).await {
                println!("  evaluator: failed: {e}");
            }
        }
        let model: Vec<f32> = summaries.iter_mut().flat_map(|s| s.shard_params.take().unwrap_or_default()).collect();
        let mut summary = summaries.swap_remove(0);
        if !summary.diverged && model.len() == evaluator.layout().len() {
            // The evaluator's figures for the final step stand; without it, evaluate here.
            if summary.final_test_loss.is_none() {
                let e = evaluator.evaluate(&model)?;
                summary.final_test_loss = Some(e.loss);
                summary.final_test_accuracy = e.accuracy;
            }
            if let Ok(v) = evaluator.validate(&model) {
                summary.final_validation_loss = Some(v.loss);
                summary.final_validation_accuracy = v.accuracy;
            }
            std::fs::write(cfg.run_dir().join("summary.json"), serde_json::to_string_pretty(&summary)? + "\n")?;
        }
        anyhow::Ok(summary)
    })
}

/// Where shard `k` of a sharded `train` writes its record and checkpoints.
fn shard_dir(cfg: &RunConfig, k: u32) -> std::path::PathBuf {
    match k {
        0 => cfg.run_dir(),
        k => cfg.run_dir().join(format!("shard-{k}")),
    }
}

/// The newest step every shard of a sharded `train` wrote a checkpoint of: where the run
/// resumes (a shard killed mid-write, or a run stopped by a lost shard, leaves some shards
/// with newer checkpoints than others).
fn common_checkpoint(cfg: &RunConfig) -> Result<u64> {
    let lists: Vec<Vec<u64>> = (0..cfg.shards)
        .map(|k| {
            quorum_net::checkpoint::list(&shard_dir(cfg, k).join("checkpoints")).into_iter().map(|(s, _)| s).collect()
        })
        .collect();
    quorum_net::server::agree::newest_common(lists.iter().map(Vec::as_slice)).with_context(|| {
        format!(
            "nothing to resume: no step has a checkpoint from every one of the {} shards under {}; run without \
             --resume to start afresh",
            cfg.shards,
            cfg.run_dir().display()
        )
    })
}

/// Waits (at most 10 s each) for the workers of a local run and prints what each did.
async fn report_workers(workers: Vec<tokio::task::JoinHandle<Result<WorkerReport, WorkerError>>>) {
    for (i, w) in workers.into_iter().enumerate() {
        match tokio::time::timeout(Duration::from_secs(10), w).await {
            Ok(Ok(Ok(r))) => print_worker(i as u32, &r),
            Ok(Ok(Err(e))) => println!("  w{i}: failed: {e}"),
            Ok(Err(e)) => println!("  w{i}: crashed: {e}"),
            Err(_) => println!("  w{i}: did not stop within 10 s"),
        }
    }
}
