//! What the server state machine is configured with: workers, policy, optimizer, schedule,
//! liveness rules.

use crate::error::ConfigError;
use crate::ids::Step;
use crate::optim::OptimizerConfig;
use crate::policy::Policy;
use crate::schedule::LrSchedule;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What to do when fewer workers are alive than a step needs for longer than the stall timeout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStall {
    /// Stop the run (the driver checkpoints and exits with an error naming the missing workers).
    #[default]
    Stop,
    /// Lower N to the number of live workers and go on; N returns when workers come back.
    #[serde(alias = "lower")]
    LowerAggregate,
}

/// Liveness rules: how long silence means "gone", and how long a stall may last.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Liveness {
    /// A worker not heard from for this long is declared gone.
    #[serde(default, with = "opt_secs")]
    pub worker_timeout: Option<Duration>,
    /// Fewer than N live workers for this long triggers `on_stall`.
    #[serde(default, with = "opt_secs")]
    pub stall_timeout: Option<Duration>,
    /// What a stall leads to.
    #[serde(default)]
    pub on_stall: OnStall,
}

/// Everything the server state machine needs to know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Workers in the cluster, ids `0..workers`.
    pub workers: u32,
    /// Aggregation policy.
    pub policy: Policy,
    /// Optimizer applied to each update.
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    /// Learning rate schedule.
    pub schedule: LrSchedule,
    /// Clip the averaged gradient to this global norm.
    #[serde(default)]
    pub clip_norm: Option<f32>,
    /// Keep an exponential moving average of the parameters with this α.
    #[serde(default)]
    pub ema_decay: Option<f32>,
    /// Liveness rules.
    #[serde(default)]
    pub liveness: Liveness,
    /// Stop after this many updates.
    #[serde(default)]
    pub max_steps: Option<Step>,
}

impl ServerConfig {
    /// A plain configuration: SGD at a constant rate, no clipping, no EMA.
    pub fn new(workers: u32, policy: Policy, lr: f32) -> Self {
        ServerConfig {
            workers,
            policy,
            optimizer: OptimizerConfig::Sgd,
            schedule: LrSchedule::constant(lr),
            clip_norm: None,
            ema_decay: None,
            liveness: Liveness::default(),
            max_steps: None,
        }
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.policy.validate(self.workers)?;
        self.optimizer.validate()?;
        self.schedule.validate()?;
        if let Some(c) = self.clip_norm {
            if !(c > 0.0 && c.is_finite()) {
                return Err(ConfigError::invalid(format!("clip_norm must be positive, got {c}")));
            }
        }
        if let Some(a) = self.ema_decay {
            if !(0.0..1.0).contains(&a) {
                return Err(ConfigError::invalid(format!("ema_decay must be in [0, 1), got {a}")));
            }
        }
        Ok(())
    }

    /// The N the learning rate is scaled by: sync's aggregate, deadline's worker count,
    /// adaptive's most, 1 for async.
    pub(crate) fn nominal_aggregate(&self) -> u32 {
        match self.policy {
            Policy::Sync { aggregate, .. } => aggregate,
            Policy::Adaptive { max, .. } => max,
            Policy::Deadline { .. } => self.workers,
            Policy::Async { .. } => 1,
        }
    }
}

mod opt_secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&d.as_secs_f64()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Option::<f64>::deserialize(d)?
            .map(|v| {
                Duration::try_from_secs_f64(v)
                    .map_err(|_| serde::de::Error::custom(format!("{v} is not a valid number of seconds")))
            })
            .transpose()
    }
}
