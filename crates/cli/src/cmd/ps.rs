//! `quorum ps`: the parameter server of a job split across machines.

use crate::cluster::{
    all_interfaces, as_shard, check_workers, interrupted, print_summary, resolve, runtime, server_options, Served,
};
use crate::config::{RunConfig, RunFlags};
use crate::topology::{self, Role};
use anyhow::{bail, Context, Result};
use clap::Args;
use quorum_net::server::agree::{agree_as_coordinator, agree_as_follower, Agreement};
use quorum_net::{run_server, WorkerOptions};
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
    if let Some(t) = topology::from_env(cfg.listen_port(), cfg.shards)? {
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
    let rt = runtime()?;
    let listener =
        rt.block_on(tokio::net::TcpListener::bind(listen)).with_context(|| format!("cannot listen on {listen}"))?;
    let mut cfg = cfg.clone();
    let listener = if resume && cfg.shards > 1 && cfg.resume_step.is_none() {
        let (listener, step) = rt.block_on(agree_on_resume_step(&cfg, listener))?;
        println!("resuming at step {step}: the newest step every one of the {} shards has a checkpoint of", cfg.shards);
        cfg.resume_step = Some(step);
        listener
    } else {
        listener
    };
    let cfg = &cfg;
    let served = Served::from_config(cfg)?;
    let model = served.describe(cfg);
    let opts = server_options(cfg, served, resume, true)?;
    let steps = opts.config.max_steps.unwrap_or(0);
    let summary = rt.block_on(async {
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

/// A shard of a resumed run started on its own (`--resume` without `--resume-step`): the
/// shards agree on the newest step every one of them has a checkpoint of (shard 0 waits for
/// every other shard's list on its own address; the others offer theirs to it).
async fn agree_on_resume_step(
    cfg: &RunConfig,
    listener: tokio::net::TcpListener,
) -> Result<(tokio::net::TcpListener, u64)> {
    let dir = cfg.run_dir().join("checkpoints");
    let steps: Vec<u64> = quorum_net::checkpoint::list(&dir).into_iter().map(|(s, _)| s).collect();
    if steps.is_empty() {
        bail!("nothing to resume: no checkpoint in {}; run without --resume to start afresh", dir.display());
    }
    if cfg.shard == 0 {
        println!(
            "shard 0 of {}: waiting for the other shards to say which checkpoints they have (this shard has steps {})",
            cfg.shards,
            steps.iter().map(u64::to_string).collect::<Vec<_>>().join(", ")
        );
        let _ = std::io::stdout().flush();
        let a = Agreement { shards: cfg.shards, steps, token: cfg.token()?, tls: cfg.tls() };
        return Ok(agree_as_coordinator(listener, a).await?);
    }
    let coordinator = cfg.coordinator.as_deref().with_context(|| {
        format!("shard {} needs shard 0's address, which runs the coordinator: --coordinator HOST:PORT", cfg.shard)
    })?;
    let mut to = WorkerOptions::new(cfg.shard, format!("http://{coordinator}"));
    to.connect_timeout = std::time::Duration::from_secs_f64(cfg.connect_timeout);
    to.token = cfg.token()?;
    to.tls = cfg.tls();
    to.window = cfg.window()?;
    let step = agree_as_follower(&to, cfg.shard, cfg.shards, steps).await?;
    Ok((listener, step))
}
