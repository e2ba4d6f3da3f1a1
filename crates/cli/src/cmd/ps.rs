//! `quorum ps`: the parameter server of a job split across machines.

use crate::cluster::{
    all_interfaces, as_shard, check_workers, interrupted, print_summary, resolve, runtime, server_options, Served,
};
use crate::config::{RunConfig, RunFlags};
use crate::topology::{self, Role};
use anyhow::{bail, Context, Result};
use clap::Args;
use quorum_net::run_server;
use std::io::Write;

/// Flags of `quorum ps`.
#[derive(Args, Debug)]
pub struct PsArgs {
    #[command(flatten)]
    flags: RunFlags,
    /// Continue from the newest valid checkpoint in <out>/checkpoints.
    #[arg(long)]
    resume: bool,
}

/// Runs `quorum ps`.
pub fn ps(a: PsArgs) -> Result<()> {
    let Some(mut cfg) = resolve(&a.flags)? else { return Ok(()) };
    let mut listen = cfg.listen.clone();
    if let Some(t) = topology::from_env(cfg.listen_port())? {
        println!("{t}");
        check_workers(&cfg, &t)?;
        let Role::Ps(k) = t.role else {
            bail!(
                "{} says this process is not the parameter server ({t}); run `quorum worker` or `quorum node`",
                t.source
            );
        };
        cfg = as_shard(&cfg, &t, k);
        listen = all_interfaces(&t);
    }
    serve(&cfg, &listen, a.resume)
}

pub(crate) fn serve(cfg: &RunConfig, listen: &str, resume: bool) -> Result<()> {
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
    let served = Served::from_config(cfg)?;
    let model = served.describe(cfg);
    let opts = server_options(cfg, served, resume, true)?;
    let steps = opts.config.max_steps.unwrap_or(0);
    let rt = runtime()?;
    let summary = rt.block_on(async {
        let listener =
            tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
        let shard = match cfg.shards {
            1 => String::new(),
            s if cfg.shard == 0 => format!(", shard 0 of {s} (the coordinator)"),
            s => format!(", shard {} of {s} (coordinator {})", cfg.shard, cfg.coordinator.as_deref().unwrap_or("?")),
        };
        println!(
            "quorum ps: listening on {} for {} workers ({}), {model}, {steps} steps{shard}",
            listener.local_addr()?,
            cfg.workers,
            cfg.shape(),
        );
        let _ = std::io::stdout().flush();
        anyhow::Ok(run_server(listener, opts, interrupted()).await?)
    })?;
    eprintln!();
    print_summary(cfg, &summary)
}
