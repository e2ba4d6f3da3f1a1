//! The keys only `quorum sim` reads (the `[sim]` table of a run's configuration), and the
//! simulator's configuration built from a [`RunConfig`].

use super::{text, RunConfig};
use anyhow::{bail, Context, Result};
use quorum_core::OnNewerParams;
use quorum_sim::{DelayModel, EvalOn, Fault, NetworkModel, SimConfig};
use serde::{Deserialize, Serialize};
use std::ops::RangeInclusive;

/// What only a simulation has: a network model, a virtual model size, faults to inject, a
/// target to stop at. `quorum train` and `quorum ps` accept the table and ignore it, so one
/// file describes a run and its simulated twin.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct SimKeys {
    /// One-way network latency, seconds.
    pub latency: f64,
    /// Network bandwidth, bytes per second (unset: infinite).
    pub bandwidth: Option<f64>,
    /// Each parameter server's link, bytes per second each way (unset: infinite): pulls and
    /// pushes queue on it.
    pub server_bandwidth: Option<f64>,
    /// Extra delay of each message to or from a parameter server: exponential with this mean,
    /// seconds, drawn per message and server.
    pub jitter: f64,
    /// No gradient math: time only (for big sweeps).
    pub timing_only: bool,
    /// Timing-only: charge messages for a model of this many parameters.
    pub virtual_params: usize,
    /// What a worker does when newer parameters arrive mid-computation: finish_and_send
    /// (what a real worker does) | abandon | finish_and_discard.
    pub on_newer: OnNewerParams,
    /// Evaluate the parameters' EMA (when `ema` is set) or the raw `params`.
    pub eval_on: EvalOn,
    /// Workers join one by one over this many virtual seconds.
    pub join_ramp: f64,
    /// Test accuracy to reach (0..1): the summary records when the run first reached it.
    pub target: Option<f32>,
    /// End the run as soon as `target` is reached.
    pub stop_at_target: bool,
    /// Faults to inject: crash:W@T, crash:W@T+RESTART, freeze:W@T+SECONDS, slow:W@T+SECONDS*FACTOR
    /// (a slow link), lag:W@T+SECONDS*FACTOR (slow computing).
    #[serde(with = "text::list")]
    pub fault: Vec<Fault>,
    /// Sweep b over a range (`0..10`) with N = budget − b; prints a table.
    #[serde(with = "text::option", skip_serializing_if = "Option::is_none")]
    pub sweep_backups: Option<BackupRange>,
    /// Machines for `sweep-backups` (default: `workers`).
    pub budget: Option<u32>,
}

impl SimKeys {
    /// Nothing set: the table is left out of a written configuration.
    pub fn is_default(&self) -> bool {
        *self == SimKeys::default()
    }
}

/// A range of backup counts, `A..B` or `A..=B` (both ends included).
#[derive(Debug, Clone, PartialEq)]
pub struct BackupRange(pub RangeInclusive<u32>);

impl std::str::FromStr for BackupRange {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        let (a, b) =
            s.split_once("..").with_context(|| format!("sweep-backups takes a range like 0..10, got `{s}`"))?;
        let a: u32 = a.trim().parse().with_context(|| format!("bad range start in `{s}`"))?;
        let b: u32 = b.trim_start_matches('=').trim().parse().with_context(|| format!("bad range end in `{s}`"))?;
        if b < a {
            bail!("sweep-backups range `{s}` is empty");
        }
        Ok(BackupRange(a..=b))
    }
}

impl std::fmt::Display for BackupRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}..{}", self.0.start(), self.0.end())
    }
}

impl RunConfig {
    /// The simulator's configuration for a run of `steps` updates. Without `delay` the
    /// simulator draws compute times from the paper's measured distribution (a real cluster
    /// has its own; a simulated one needs a model).
    pub fn sim_config(&self, steps: u64) -> Result<SimConfig> {
        let s = &self.sim;
        let delay = self.delay.clone().unwrap_or(DelayModel::Paper);
        if s.stop_at_target && s.target.is_none() {
            bail!("stop-at-target needs target = ACCURACY (e.g. --target 0.95)");
        }
        if s.target.is_some_and(|t| !(0.0..=1.0).contains(&t)) {
            bail!("target is an accuracy between 0 and 1, e.g. 0.95");
        }
        let mut cfg = SimConfig::new(self.workers, self.policy()?, steps, delay, self.seed);
        cfg.server = self.server_config(steps)?;
        if s.server_bandwidth.is_some_and(|b| !(b > 0.0 && b.is_finite())) {
            bail!("server-bandwidth must be a positive number of bytes per second");
        }
        cfg.network = NetworkModel {
            latency: s.latency,
            bandwidth: s.bandwidth,
            server_bandwidth: s.server_bandwidth,
            jitter: s.jitter,
            shards: self.shards,
        };
        cfg.on_newer = s.on_newer;
        cfg.virtual_params = s.virtual_params;
        cfg.eval_every = (self.eval_every > 0).then_some(self.eval_every);
        cfg.eval_on = s.eval_on;
        // A non-finite loss always counts as divergence (and names it as such).
        cfg.divergence_loss = Some(self.divergence_loss.map_or(f32::INFINITY, |l| l as f32));
        cfg.join_ramp = s.join_ramp;
        cfg.target = s.target;
        cfg.stop_at_target = s.stop_at_target;
        cfg.faults = s.fault.clone();
        cfg.validate()?;
        Ok(cfg)
    }
}
