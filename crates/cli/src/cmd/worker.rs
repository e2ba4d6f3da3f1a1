//! `quorum worker`: one worker of a job split across machines.

use crate::cluster::{check_workers, print_worker, resolve, runtime, worker_options};
use crate::config::{RunConfig, RunFlags};
use crate::topology::{self, Role};
use anyhow::{bail, Context, Result};
use clap::Args;
use quorum_net::run_worker;
use std::io::Write;

/// Flags of `quorum worker`.
#[derive(Args, Debug)]
pub struct WorkerArgs {
    #[command(flatten)]
    flags: RunFlags,
    /// The parameter server, HOST:PORT; in a sharded run every shard's, comma-separated,
    /// shard 0 first (default: from TF_CONFIG or Slurm).
    #[arg(long)]
    ps: Option<String>,
    /// This worker's index, 0..workers (default: from TF_CONFIG or Slurm).
    #[arg(long)]
    index: Option<u32>,
}

/// Runs `quorum worker`.
pub fn worker(a: WorkerArgs) -> Result<()> {
    let Some(cfg) = resolve(&a.flags)? else { return Ok(()) };
    let (ps, index) = match (a.ps, a.index) {
        (Some(ps), Some(i)) => (ps, i),
        (ps, index) => {
            let t = topology::from_env(cfg.listen_port(), cfg.shards)?
                .context("give --ps HOST:PORT and --index I, or run under TF_CONFIG or Slurm")?;
            println!("{t}");
            check_workers(&cfg, &t)?;
            let Role::Worker(i) = t.role else {
                bail!("{} says this process is the parameter server; run `quorum ps` or `quorum node`", t.source)
            };
            (ps.unwrap_or(t.ps.join(",")), index.unwrap_or(i))
        }
    };
    work(&cfg, index, &ps)
}

pub(crate) fn work(cfg: &RunConfig, index: u32, ps: &str) -> Result<()> {
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
