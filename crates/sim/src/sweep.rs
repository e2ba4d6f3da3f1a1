//! For a fixed budget of machines, how fast is each split into N aggregated + b backups?
//! (The paper's Figures 4 and 6 calculation, done by simulating every split.)

use crate::config::SimConfig;
use crate::engine::{simulate, SimError};
use quorum_core::Policy;
use serde::Serialize;

/// One split of the budget.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SweepRow {
    /// N, gradients averaged per step.
    pub aggregate: u32,
    /// b, backups.
    pub backups: u32,
    /// Mean seconds per step (time to collect N gradients).
    pub mean_step_seconds: f64,
    /// Median step.
    pub p50_step_seconds: f64,
    /// 99th percentile step.
    pub p99_step_seconds: f64,
    /// Examples per virtual second relative to the b = 0 row's throughput per gradient:
    /// N / mean_step_seconds, gradients used per second.
    pub gradients_per_second: f64,
}

/// Simulates sync training (timing only) for each b in `backups` with N = `budget` − b.
pub fn sweep_backups(
    base: &SimConfig,
    budget: u32,
    backups: impl IntoIterator<Item = u32>,
) -> Result<Vec<SweepRow>, SimError> {
    let mut rows = Vec::new();
    for b in backups {
        if b >= budget {
            break;
        }
        let mut cfg = base.clone();
        cfg.server.workers = budget;
        cfg.server.policy = Policy::Sync { aggregate: budget - b, backups: b };
        cfg.record_events = false;
        cfg.record_arrivals = false;
        let r = simulate(&cfg, None)?;
        rows.push(SweepRow {
            aggregate: budget - b,
            backups: b,
            mean_step_seconds: r.summary.mean_step_seconds,
            p50_step_seconds: r.summary.p50_step_seconds,
            p99_step_seconds: r.summary.p99_step_seconds,
            gradients_per_second: (budget - b) as f64 / r.summary.mean_step_seconds,
        });
    }
    Ok(rows)
}
