//! Learning-rate schedules.

use crate::error::ConfigError;
use crate::ids::Step;
use serde::{Deserialize, Serialize};

/// How the rate decays after warm-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum Decay {
    /// No decay.
    Constant,
    /// lr·rate^(step/every) — smooth — or rate^⌊step/every⌋ with `staircase`.
    /// The paper's schedule γ0·0.94^(t·N/(2T)) is `rate = 0.94, every = 2T/N`.
    Exponential {
        /// Multiplier per `every` steps.
        rate: f32,
        /// Steps per multiplication.
        every: f64,
        /// Decay in whole jumps.
        #[serde(default)]
        staircase: bool,
    },
    /// Linear annealing from full rate at `start` to zero at `end` (the paper's MNIST runs).
    Linear {
        /// Step where the decay begins.
        start: Step,
        /// Step where the rate reaches zero.
        end: Step,
    },
}

/// A learning rate as a function of the step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrSchedule {
    /// γ0, the base rate.
    pub base: f32,
    /// Decay after warm-up.
    #[serde(default = "constant")]
    pub decay: Decay,
    /// Linear warm-up from 0 to the full rate over this many steps.
    #[serde(default)]
    pub warmup_steps: Step,
    /// Multiply the rate by N, the gradients averaged per step (the paper's linear scaling
    /// for sync training with averaged gradients).
    #[serde(default)]
    pub scale_by_aggregate: bool,
}

/// The short form used by flags and config files: `constant`, `exp:RATE,EVERY[,staircase]`,
/// `linear:START,END` (steps).
impl std::str::FromStr for Decay {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = |what: &str| ConfigError::invalid(format!("bad {what} in learning-rate decay `{s}`"));
        let (kind, args) = s.trim().split_once(':').unwrap_or((s.trim(), ""));
        let parts: Vec<&str> = args.split(',').map(str::trim).collect();
        Ok(match (kind, parts.as_slice()) {
            ("constant", [""]) => Decay::Constant,
            ("exp", [rate, every, rest @ ..]) if rest.is_empty() || rest == ["staircase"] => Decay::Exponential {
                rate: rate.parse().map_err(|_| bad("rate"))?,
                every: every.parse().map_err(|_| bad("interval"))?,
                staircase: !rest.is_empty(),
            },
            ("linear", [start, end]) => Decay::Linear {
                start: start.parse().map_err(|_| bad("start"))?,
                end: end.parse().map_err(|_| bad("end"))?,
            },
            _ => {
                return Err(ConfigError::invalid(format!(
                    "unknown learning-rate decay `{s}`: use constant, exp:RATE,EVERY[,staircase] or linear:START,END"
                )))
            }
        })
    }
}

/// The short form [`FromStr`](std::str::FromStr) reads.
impl std::fmt::Display for Decay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Decay::Constant => write!(f, "constant"),
            Decay::Exponential { rate, every, staircase: false } => write!(f, "exp:{rate},{every}"),
            Decay::Exponential { rate, every, staircase: true } => write!(f, "exp:{rate},{every},staircase"),
            Decay::Linear { start, end } => write!(f, "linear:{start},{end}"),
        }
    }
}

fn constant() -> Decay {
    Decay::Constant
}

impl LrSchedule {
    /// A constant rate.
    pub fn constant(base: f32) -> Self {
        LrSchedule { base, decay: Decay::Constant, warmup_steps: 0, scale_by_aggregate: false }
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.base.is_finite() && self.base > 0.0) {
            return Err(ConfigError::invalid(format!("learning rate must be positive, got {}", self.base)));
        }
        match self.decay {
            Decay::Constant => Ok(()),
            Decay::Exponential { rate, every, .. } => {
                if !(rate > 0.0 && rate <= 1.0) || every.is_nan() || every <= 0.0 {
                    Err(ConfigError::invalid(format!(
                        "exponential decay needs 0 < rate <= 1 and every > 0, got rate {rate}, every {every}"
                    )))
                } else {
                    Ok(())
                }
            }
            Decay::Linear { start, end } => {
                if end <= start {
                    Err(ConfigError::invalid(format!("linear decay needs end ({end}) > start ({start})")))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// The rate at `step` when each update averages `aggregate` gradients.
    pub fn lr(&self, step: Step, aggregate: u32) -> f32 {
        let mut lr = self.base as f64;
        if self.scale_by_aggregate {
            lr *= aggregate.max(1) as f64;
        }
        lr *= match self.decay {
            Decay::Constant => 1.0,
            Decay::Exponential { rate, every, staircase } => {
                let mut e = step as f64 / every;
                if staircase {
                    e = e.floor();
                }
                (rate as f64).powf(e)
            }
            Decay::Linear { start, end } => {
                if step <= start {
                    1.0
                } else if step >= end {
                    0.0
                } else {
                    (end - step) as f64 / (end - start) as f64
                }
            }
        };
        if self.warmup_steps > 0 && step < self.warmup_steps {
            lr *= (step + 1) as f64 / self.warmup_steps as f64;
        }
        lr as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_short_form_of_every_decay_reads_back_to_the_same_decay() {
        for text in ["constant", "exp:0.94,50", "exp:0.5,100,staircase", "linear:1720,3440"] {
            let d: Decay = text.parse().unwrap();
            assert_eq!(d.to_string(), text);
        }
        for (text, want) in [
            ("cosine", "unknown learning-rate decay `cosine`"),
            ("exp:fast,10", "bad rate"),
            ("linear:1", "unknown learning-rate decay"),
            ("exp:0.9,10,stairs", "unknown learning-rate decay"),
        ] {
            let e = text.parse::<Decay>().unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-6 * (1.0 + b.abs())
    }

    #[test]
    fn constant_rate_is_the_base() {
        assert_eq!(LrSchedule::constant(0.1).lr(1234, 7), 0.1);
    }

    #[test]
    fn linear_scaling_multiplies_by_aggregate() {
        let s = LrSchedule { scale_by_aggregate: true, ..LrSchedule::constant(0.045) };
        assert!(close(s.lr(0, 100), 4.5));
    }

    #[test]
    fn exponential_decay_smooth_and_staircase() {
        let smooth = LrSchedule {
            decay: Decay::Exponential { rate: 0.94, every: 10.0, staircase: false },
            ..LrSchedule::constant(1.0)
        };
        assert!(close(smooth.lr(5, 1), 0.94f32.powf(0.5)));
        assert!(close(smooth.lr(20, 1), 0.94 * 0.94));
        let stairs = LrSchedule {
            decay: Decay::Exponential { rate: 0.94, every: 10.0, staircase: true },
            ..LrSchedule::constant(1.0)
        };
        assert_eq!(stairs.lr(9, 1), 1.0);
        assert!(close(stairs.lr(10, 1), 0.94));
    }

    #[test]
    fn paper_schedule_gives_the_same_rate_after_the_same_examples() {
        // γ0·0.94^(t·N/(2T)) with T = 100 batches per epoch: N=10 at step t equals N=1 at step 10t
        // once the N factor of the base is divided out.
        let t_epoch = 100.0;
        let sched = |n: u32| LrSchedule {
            base: 0.045,
            decay: Decay::Exponential { rate: 0.94, every: 2.0 * t_epoch / n as f64, staircase: false },
            warmup_steps: 0,
            scale_by_aggregate: true,
        };
        assert!(close(sched(10).lr(30, 10) / 10.0, sched(1).lr(300, 1)));
    }

    #[test]
    fn linear_decay_reaches_zero_at_end() {
        let s = LrSchedule { decay: Decay::Linear { start: 10, end: 20 }, ..LrSchedule::constant(0.1) };
        assert_eq!(s.lr(10, 1), 0.1);
        assert!(close(s.lr(15, 1), 0.05));
        assert_eq!(s.lr(20, 1), 0.0);
    }

    #[test]
    fn warmup_ramps_linearly_to_the_full_rate() {
        let s = LrSchedule { warmup_steps: 4, ..LrSchedule::constant(1.0) };
        assert_eq!(s.lr(0, 1), 0.25);
        assert_eq!(s.lr(3, 1), 1.0);
        assert_eq!(s.lr(4, 1), 1.0);
    }

    #[test]
    fn invalid_schedules_are_rejected() {
        assert!(LrSchedule::constant(0.0).validate().is_err());
        let s = LrSchedule { decay: Decay::Linear { start: 5, end: 5 }, ..LrSchedule::constant(0.1) };
        assert!(s.validate().is_err());
    }
}
