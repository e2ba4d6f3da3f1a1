//! `quorum train`: a parameter server and its workers in one process over loopback.

use crate::cluster::{
    interrupted, print_summary, print_worker, resolve, runtime, server_options, stopped_early, worker_options,
};
use crate::run_config::{RunConfig, RunFlags};
use anyhow::{bail, Context, Result};
use clap::Args;
use quorum_net::{run_server, run_worker, TrainSummary};
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
