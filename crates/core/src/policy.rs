//! Aggregation policies: when does the server apply an update, and with which gradients.

use crate::error::ConfigError;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How the server turns incoming gradients into updates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum Policy {
    /// The paper's Sync-Opt with backup workers: `aggregate + backups` workers; a step closes
    /// when `aggregate` distinct workers have pushed a gradient tagged with the current step;
    /// exactly those are averaged; later pushes for that step are dropped as late.
    /// `backups = 0` is plain synchronous SGD.
    Sync {
        /// N: gradients averaged per step.
        aggregate: u32,
        /// b: extra workers whose gradients may be dropped.
        backups: u32,
    },
    /// Async-Opt: every gradient is applied when it arrives.
    Async {
        /// Drop gradients more than this many updates old (a fair staleness cutoff).
        #[serde(default)]
        max_staleness: Option<u64>,
    },
    /// Time-outs instead of backup workers (the paper's future work): close the step when
    /// every live worker has pushed, or once `timeout` has passed since it opened and at
    /// least `min` gradients are in.
    Deadline {
        /// Fewest gradients a step may close with.
        min: u32,
        /// How long to wait for the rest, in seconds.
        #[serde(with = "secs")]
        timeout: Duration,
    },
    /// Sync with a number of gradients per step that the server chooses before each step,
    /// between `min` and `max`, to make the most progress per second from the workers'
    /// measured response times and the gradients' measured noise
    /// ([`crate::adaptive::AdaptiveRule`]). The learning rate scales linearly with the N
    /// each step averages; the configured rate is the rate at N = `max`.
    Adaptive {
        /// Fewest gradients a step may take.
        min: u32,
        /// Most gradients a step may take (at most the number of workers).
        max: u32,
    },
}

impl Policy {
    /// Short lower-case name: `sync`, `async`, `deadline` or `adaptive`.
    pub fn name(&self) -> &'static str {
        match self {
            Policy::Sync { .. } => "sync",
            Policy::Async { .. } => "async",
            Policy::Deadline { .. } => "deadline",
            Policy::Adaptive { .. } => "adaptive",
        }
    }

    /// Backup workers (only sync has them by that name).
    pub fn backups(&self) -> u32 {
        match self {
            Policy::Sync { backups, .. } => *backups,
            _ => 0,
        }
    }

    /// Gradients a step normally takes: N for sync, min for deadline, 1 for async, the
    /// most for adaptive.
    pub fn aggregate_hint(&self) -> u32 {
        match self {
            Policy::Sync { aggregate, .. } => *aggregate,
            Policy::Adaptive { max, .. } => *max,
            Policy::Deadline { min, .. } => *min,
            Policy::Async { .. } => 1,
        }
    }

    /// Whether a step can close without some live worker's gradient, so that workers should
    /// check whether their step closed while they computed and, if so, send a late notice
    /// instead of the gradient (sync with backups, deadline; not plain sync, not async).
    pub fn late_notices(&self) -> bool {
        !matches!(self, Policy::Async { .. } | Policy::Sync { backups: 0, .. })
    }

    /// Whether a worker may stop a computation half-way once its step closed without it: where
    /// steps close without some worker (late notices), except under the adaptive policy, whose
    /// rule times every worker's whole gradients (a stopped one would read as a fast one).
    pub fn abandon(&self) -> bool {
        self.late_notices() && !matches!(self, Policy::Adaptive { .. })
    }

    /// Checks the policy against the number of workers in the cluster.
    pub fn validate(&self, workers: u32) -> Result<(), ConfigError> {
        if workers == 0 {
            return Err(ConfigError::invalid("the cluster needs at least one worker"));
        }
        match self {
            Policy::Sync { aggregate, backups } => {
                if *aggregate == 0 {
                    return Err(ConfigError::invalid("sync policy: aggregate (N) must be at least 1"));
                }
                if aggregate + backups != workers {
                    return Err(ConfigError::invalid(format!(
                        "sync policy: aggregate ({aggregate}) + backups ({backups}) must equal the number of workers ({workers})"
                    )));
                }
            }
            Policy::Async { .. } => {}
            Policy::Adaptive { min, max } => {
                if *min == 0 || min > max || *max > workers {
                    return Err(ConfigError::invalid(format!(
                        "adaptive policy: needs 1 <= min ({min}) <= max ({max}) <= the number of workers ({workers})"
                    )));
                }
            }
            Policy::Deadline { min, timeout } => {
                if *min == 0 || *min > workers {
                    return Err(ConfigError::invalid(format!(
                        "deadline policy: min ({min}) must be between 1 and the number of workers ({workers})"
                    )));
                }
                if timeout.is_zero() {
                    return Err(ConfigError::invalid("deadline policy: timeout must be positive"));
                }
            }
        }
        Ok(())
    }
}

/// One line: `sync N=3 b=1`, `async`, `async (max staleness 4)`, `deadline min=2 timeout=0.5s`,
/// `adaptive N=1..4`.
impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Policy::Sync { aggregate, backups } => write!(f, "sync N={aggregate} b={backups}"),
            Policy::Async { max_staleness: None } => write!(f, "async"),
            Policy::Async { max_staleness: Some(m) } => write!(f, "async (max staleness {m})"),
            Policy::Deadline { min, timeout } => write!(f, "deadline min={min} timeout={}s", timeout.as_secs_f64()),
            Policy::Adaptive { min, max } => write!(f, "adaptive N={min}..{max}"),
        }
    }
}

/// Serde helper: a `Duration` as floating-point seconds.
pub mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Writes seconds as `f64`.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    /// Reads non-negative, finite seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v)
            .map_err(|_| serde::de::Error::custom(format!("{v} is not a valid number of seconds")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_requires_n_plus_b_to_equal_workers() {
        let p = Policy::Sync { aggregate: 3, backups: 1 };
        assert!(p.validate(4).is_ok());
        let err = p.validate(5).unwrap_err().to_string();
        assert!(err.contains("aggregate (3) + backups (1) must equal the number of workers (5)"), "{err}");
    }

    #[test]
    fn workers_may_abandon_overtaken_work_where_steps_close_without_them_but_not_under_adaptive() {
        assert!(Policy::Sync { aggregate: 3, backups: 1 }.abandon());
        assert!(Policy::Deadline { min: 2, timeout: Duration::from_secs(1) }.abandon());
        assert!(!Policy::Sync { aggregate: 4, backups: 0 }.abandon(), "no step closes without a worker");
        assert!(!Policy::Async { max_staleness: None }.abandon(), "every gradient is applied");
        let adaptive = Policy::Adaptive { min: 1, max: 4 };
        assert!(adaptive.late_notices() && !adaptive.abandon(), "its rule times whole gradients");
    }

    #[test]
    fn zero_aggregate_and_zero_workers_are_rejected() {
        assert!(Policy::Sync { aggregate: 0, backups: 1 }.validate(1).is_err());
        assert!(Policy::Async { max_staleness: None }.validate(0).is_err());
        assert!(Policy::Deadline { min: 5, timeout: Duration::from_secs(1) }.validate(4).is_err());
        assert!(Policy::Adaptive { min: 0, max: 2 }.validate(4).is_err());
        assert!(Policy::Adaptive { min: 3, max: 2 }.validate(4).is_err());
        let err = Policy::Adaptive { min: 1, max: 5 }.validate(4).unwrap_err().to_string();
        assert!(err.contains("max (5) <= the number of workers (4)"), "{err}");
        assert!(Policy::Adaptive { min: 1, max: 4 }.validate(4).is_ok());
    }
}
