//! `quorum node`: whatever role `TF_CONFIG` or Slurm gives this process.

use super::{ps::serve, worker::work};
use crate::cluster::{all_interfaces, as_shard, check_workers, resolve};
use crate::config::RunFlags;
use crate::topology::{self, Role};
use anyhow::{Context, Result};
use clap::Args;

/// Flags of `quorum node`.
#[derive(Args, Debug)]
pub struct NodeArgs {
    #[command(flatten)]
    flags: RunFlags,
    /// (Parameter server) continue from the newest valid checkpoint.
    #[arg(long)]
    resume: bool,
    /// Print the role `TF_CONFIG` or Slurm gives this process, after checking it against the
    /// configuration, and exit (to check a cluster's manifests without running it).
    #[arg(long)]
    print_topology: bool,
}

/// Runs `quorum node`: the role `TF_CONFIG` or Slurm gives this process.
pub fn node(a: NodeArgs) -> Result<()> {
    let Some(cfg) = resolve(&a.flags)? else { return Ok(()) };
    let t = topology::from_env(cfg.listen_port(), cfg.shards)?
        .context("quorum node needs TF_CONFIG or Slurm variables (SLURM_PROCID, ...); use `quorum ps` / `quorum worker` otherwise")?;
    println!("{t}");
    check_workers(&cfg, &t)?;
    if a.print_topology {
        match t.role {
            Role::Ps(k) => {
                let shard = as_shard(&cfg, &t, k);
                let coordinator = shard.coordinator.as_deref().map_or(String::new(), |c| format!(", coordinator {c}"));
                println!(
                    "would run: quorum ps, shard {k} of {}{coordinator}, listening on {}, run directory {}",
                    cfg.shards,
                    all_interfaces(&t),
                    shard.run_dir().display()
                );
            }
            Role::Worker(i) => println!("would run: quorum worker {i}, servers {}", t.ps.join(",")),
        }
        return Ok(());
    }
    match t.role {
        Role::Ps(k) => serve(&as_shard(&cfg, &t, k), &all_interfaces(&t), a.resume),
        Role::Worker(i) => work(&cfg, i, &t.ps.join(",")),
    }
}
