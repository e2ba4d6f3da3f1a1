//! `quorum evaluate`: the evaluator of a multi-host job. It is not a worker: it pulls the
//! parameters every `eval-every` steps (from every shard of a sharded run, put together),
//! evaluates them on the test set, and reports to the server (shard 0), which records the
//! figures as its own evaluations. For runs whose servers cannot evaluate the model
//! themselves: separate shard processes, none of which holds the whole model.

use crate::cluster::{resolve, runtime, worker_options};
use crate::config::RunFlags;
use anyhow::{bail, Result};
use clap::Args;
use quorum_net::evaluate::{run_evaluator, EvaluateFn};
use std::io::Write;

/// Flags of `quorum evaluate`.
#[derive(Args, Debug)]
pub struct EvaluateArgs {
    #[command(flatten)]
    flags: RunFlags,
    /// The parameter server, HOST:PORT; in a sharded run every shard's, comma-separated,
    /// shard 0 first.
    #[arg(long)]
    ps: String,
}

/// Runs `quorum evaluate` until the server stops.
pub fn evaluate(a: EvaluateArgs) -> Result<()> {
    let Some(cfg) = resolve(&a.flags)? else { return Ok(()) };
    if cfg.eval_every == 0 {
        bail!("eval-every = 0: an evaluator evaluates every K steps; give --eval-every K");
    }
    let mut src = cfg.source()?;
    let num_params = src.layout().len();
    let opts = worker_options(&cfg, 0, &a.ps)?;
    println!(
        "quorum evaluate: server {}, {} ({num_params} parameters), every {} steps",
        a.ps, cfg.model, cfg.eval_every
    );
    let _ = std::io::stdout().flush();
    let f: EvaluateFn = Box::new(move |step, params| {
        let e = src.evaluate(params)?;
        let acc = e.accuracy.map_or(String::new(), |a| format!(", accuracy {:.2}%", 100.0 * a));
        println!("  step {step}: test loss {:.4}{acc}", e.loss);
        Ok(e)
    });
    let report = runtime()?.block_on(run_evaluator(opts, num_params, cfg.eval_every, f))?;
    println!(
        "  {} evaluations, the last of step {}{}",
        report.evaluations,
        report.last_step.map_or("-".to_string(), |s| s.to_string()),
        if report.reconnects > 0 { format!(", {} reconnects", report.reconnects) } else { String::new() }
    );
    Ok(())
}
