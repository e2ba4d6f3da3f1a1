//! Simulation configuration.

use crate::network::NetworkModel;
use quorum_compute::DelayModel;
use quorum_core::{ConfigError, OnNewerParams, Policy, ServerConfig};
use serde::{Deserialize, Serialize};

/// Which parameters evaluation reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalOn {
    /// The moving average (falls back to the raw parameters when no EMA is kept).
    #[default]
    Ema,
    /// The raw parameters.
    Params,
}

/// Everything a simulated run needs besides the gradient source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SimConfig {
    /// The server: workers, policy, optimizer, schedule. `max_steps` is set from `steps`.
    pub server: ServerConfig,
    /// Updates to run.
    pub steps: u64,
    /// Seed of every random stream.
    pub seed: u64,
    /// Per-gradient compute time.
    pub delay: DelayModel,
    /// Message delays.
    #[serde(default)]
    pub network: NetworkModel,
    /// What a worker does when newer parameters overtake its computation.
    #[serde(default)]
    pub on_newer: OnNewerParams,
    /// In timing-only runs, the model size (parameters) that messages are charged for.
    #[serde(default)]
    pub virtual_params: usize,
    /// Evaluate every this many steps (and at the end); `None`: only at the end.
    #[serde(default)]
    pub eval_every: Option<u64>,
    /// Evaluate the EMA or the raw parameters.
    #[serde(default)]
    pub eval_on: EvalOn,
    /// Keep every event (for events.jsonl). Off for big sweeps.
    #[serde(default = "yes")]
    pub record_events: bool,
    /// Keep every arrival (for arrivals.csv).
    #[serde(default = "yes")]
    pub record_arrivals: bool,
    /// Stop a run once its loss is non-finite or above this (divergence; see restarts).
    #[serde(default)]
    pub divergence_loss: Option<f32>,
    /// Workers join one after another, spread evenly over this many virtual seconds (worker
    /// 0 at once, the last at the end). With async and a constant compute time the staleness
    /// is the number of joined workers minus one, so this ramps the staleness up.
    #[serde(default)]
    pub join_ramp: f64,
    /// Test accuracy to reach: the summary records when the run first reached it.
    #[serde(default)]
    pub target: Option<f32>,
    /// End the run once `target` is reached (for experiments that only ask how long it takes).
    #[serde(default)]
    pub stop_at_target: bool,
    /// Crashes, freezes and slow links to inject (see [`crate::fault`]).
    #[serde(default)]
    pub faults: Vec<crate::fault::Fault>,
}

fn yes() -> bool {
    true
}

impl SimConfig {
    /// A timing-oriented default: `workers` workers under `policy`, SGD at `lr`.
    pub fn new(workers: u32, policy: Policy, steps: u64, delay: DelayModel, seed: u64) -> Self {
        SimConfig {
            server: ServerConfig::new(workers, policy, 0.1),
            steps,
            seed,
            delay,
            network: NetworkModel::default(),
            on_newer: OnNewerParams::default(),
            virtual_params: 0,
            eval_every: None,
            eval_on: EvalOn::default(),
            record_events: true,
            record_arrivals: true,
            divergence_loss: None,
            join_ramp: 0.0,
            target: None,
            stop_at_target: false,
            faults: Vec::new(),
        }
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        if self.steps == 0 {
            return Err(ConfigError::invalid("steps must be at least 1"));
        }
        if self.eval_every == Some(0) {
            return Err(ConfigError::invalid("eval_every must be at least 1"));
        }
        if self.network.latency < 0.0 || self.network.bandwidth.is_some_and(|b| b <= 0.0) {
            return Err(ConfigError::invalid("network latency must be >= 0 and bandwidth > 0"));
        }
        if !(self.network.jitter.is_finite() && self.network.jitter >= 0.0) {
            return Err(ConfigError::invalid("jitter must be a finite number of seconds >= 0"));
        }
        for f in &self.faults {
            f.validate(self.server.workers)?;
        }
        if !(self.join_ramp.is_finite() && self.join_ramp >= 0.0) {
            return Err(ConfigError::invalid("join_ramp must be a finite number of seconds >= 0"));
        }
        Ok(())
    }
}
