//! Optimizers on flat `f32` slices, applied on the server.
//!
//! Every optimizer takes the *sum* of the step's gradients and a `scale` (1/N) so that the
//! average is never materialised: one pass reads the sum and writes the parameters.

use crate::error::ConfigError;
use serde::{Deserialize, Serialize};

/// Which optimizer, with its hyper-parameters (the learning rate comes from the schedule).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum OptimizerConfig {
    /// θ ← θ − lr·g
    #[default]
    Sgd,
    /// v ← μ·v + g; θ ← θ − lr·v (Nesterov: θ ← θ − lr·(g + μ·v)).
    Momentum {
        /// μ
        momentum: f32,
        /// Use Nesterov's look-ahead form.
        #[serde(default)]
        nesterov: bool,
    },
    /// RMSProp with momentum exactly as TensorFlow computes it:
    /// ms ← ρ·ms + (1−ρ)·g²; mom ← μ·mom + lr·g/√(ms+ε); θ ← θ − mom; ms starts at 1.
    Rmsprop {
        /// ρ (decay of the mean square).
        decay: f32,
        /// μ
        momentum: f32,
        /// ε, inside the square root.
        epsilon: f32,
    },
    /// Adam with bias correction.
    Adam {
        /// β1
        beta1: f32,
        /// β2
        beta2: f32,
        /// ε, outside the square root.
        epsilon: f32,
    },
}

impl OptimizerConfig {
    /// The paper's Inception setting: RMSProp ρ = 0.9, μ = 0.9, ε = 1.0.
    pub fn paper_rmsprop() -> Self {
        OptimizerConfig::Rmsprop { decay: 0.9, momentum: 0.9, epsilon: 1.0 }
    }

    /// Checks ranges.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let unit = |name: &str, v: f32| {
            if (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(ConfigError::invalid(format!("optimizer: {name} must be in [0, 1), got {v}")))
            }
        };
        match *self {
            OptimizerConfig::Sgd => Ok(()),
            OptimizerConfig::Momentum { momentum, .. } => unit("momentum", momentum),
            OptimizerConfig::Rmsprop { decay, momentum, epsilon } => {
                unit("decay", decay)?;
                unit("momentum", momentum)?;
                positive("epsilon", epsilon)
            }
            OptimizerConfig::Adam { beta1, beta2, epsilon } => {
                unit("beta1", beta1)?;
                unit("beta2", beta2)?;
                positive("epsilon", epsilon)
            }
        }
    }
}

/// The short form used by flags and config files: `sgd`, `momentum:M`, `nesterov:M`,
/// `rmsprop[:DECAY,MOMENTUM,EPS]`, `adam[:B1,B2,EPS]` (omitted numbers take the usual
/// defaults: 0.9; 0.9, 0.9, 1.0; 0.9, 0.999, 1e-8). Checked with [`OptimizerConfig::validate`].
impl std::str::FromStr for OptimizerConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let usage = || {
            ConfigError::invalid(format!(
                "unknown optimizer `{s}`: use sgd, momentum:M, nesterov:M, rmsprop[:DECAY,MOMENTUM,EPS] or adam[:B1,B2,EPS]"
            ))
        };
        let (kind, args) = s.trim().split_once(':').unwrap_or((s.trim(), ""));
        let nums = if args.is_empty() {
            Vec::new()
        } else {
            args.split(',')
                .map(|x| {
                    x.trim()
                        .parse::<f32>()
                        .map_err(|_| ConfigError::invalid(format!("`{x}` in optimizer `{s}` is not a number")))
                })
                .collect::<Result<Vec<f32>, _>>()?
        };
        let most = match kind {
            "sgd" => 0,
            "momentum" | "nesterov" => 1,
            "rmsprop" | "adam" => 3,
            _ => return Err(usage()),
        };
        if nums.len() > most {
            return Err(ConfigError::invalid(format!("optimizer `{s}` takes at most {most} numbers")));
        }
        let get = |i: usize, d: f32| nums.get(i).copied().unwrap_or(d);
        let cfg = match kind {
            "sgd" => OptimizerConfig::Sgd,
            "momentum" => OptimizerConfig::Momentum { momentum: get(0, 0.9), nesterov: false },
            "nesterov" => OptimizerConfig::Momentum { momentum: get(0, 0.9), nesterov: true },
            "rmsprop" => OptimizerConfig::Rmsprop { decay: get(0, 0.9), momentum: get(1, 0.9), epsilon: get(2, 1.0) },
            _ => OptimizerConfig::Adam { beta1: get(0, 0.9), beta2: get(1, 0.999), epsilon: get(2, 1e-8) },
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The short form [`FromStr`](std::str::FromStr) reads, every number written out.
impl std::fmt::Display for OptimizerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            OptimizerConfig::Sgd => write!(f, "sgd"),
            OptimizerConfig::Momentum { momentum, nesterov: false } => write!(f, "momentum:{momentum}"),
            OptimizerConfig::Momentum { momentum, nesterov: true } => write!(f, "nesterov:{momentum}"),
            OptimizerConfig::Rmsprop { decay, momentum, epsilon } => write!(f, "rmsprop:{decay},{momentum},{epsilon}"),
            OptimizerConfig::Adam { beta1, beta2, epsilon } => write!(f, "adam:{beta1},{beta2},{epsilon}"),
        }
    }
}

fn positive(name: &str, v: f32) -> Result<(), ConfigError> {
    if v > 0.0 && v.is_finite() {
        Ok(())
    } else {
        Err(ConfigError::invalid(format!("optimizer: {name} must be positive, got {v}")))
    }
}

/// An optimizer with its state (slots sized like the parameters).
#[derive(Debug, Clone, PartialEq)]
pub struct Optimizer {
    config: OptimizerConfig,
    /// First slot: momentum / RMSProp mean square / Adam first moment.
    slot_a: Vec<f32>,
    /// Second slot: RMSProp momentum / Adam second moment.
    slot_b: Vec<f32>,
    /// Updates applied so far (Adam's bias correction).
    updates: u64,
}

impl Optimizer {
    /// Fresh state for `len` parameters.
    pub fn new(config: OptimizerConfig, len: usize) -> Self {
        let (a, b) = match config {
            OptimizerConfig::Sgd => (Vec::new(), Vec::new()),
            OptimizerConfig::Momentum { .. } => (vec![0.0; len], Vec::new()),
            // TensorFlow initialises the mean square to one, not zero.
            OptimizerConfig::Rmsprop { .. } => (vec![1.0; len], vec![0.0; len]),
            OptimizerConfig::Adam { .. } => (vec![0.0; len], vec![0.0; len]),
        };
        Optimizer { config, slot_a: a, slot_b: b, updates: 0 }
    }

    /// The configuration.
    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// The state slots by name, for checkpoints (empty slots omitted).
    pub fn slots(&self) -> Vec<(&'static str, &[f32])> {
        let mut out = Vec::new();
        if !self.slot_a.is_empty() {
            out.push(("slot_a", self.slot_a.as_slice()));
        }
        if !self.slot_b.is_empty() {
            out.push(("slot_b", self.slot_b.as_slice()));
        }
        out
    }

    /// The state slots by name, owned, as a checkpoint holds them.
    pub fn named_slots(&self) -> Vec<(String, Vec<f32>)> {
        self.slots().into_iter().map(|(n, v)| (n.to_string(), v.to_vec())).collect()
    }

    /// Restores state saved with [`Optimizer::named_slots`]; an unknown slot is an error.
    pub fn restore_named(&mut self, slots: Vec<(String, Vec<f32>)>, updates: u64) -> Result<(), ConfigError> {
        let (mut a, mut b) = (None, None);
        for (name, v) in slots {
            match name.as_str() {
                "slot_a" => a = Some(v),
                "slot_b" => b = Some(v),
                other => return Err(ConfigError::invalid(format!("unknown optimizer slot `{other}` in checkpoint"))),
            }
        }
        self.restore(a, b, updates)
    }

    /// Updates applied so far.
    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// Restores state saved with [`Optimizer::slots`]; lengths must match.
    pub fn restore(
        &mut self,
        slot_a: Option<Vec<f32>>,
        slot_b: Option<Vec<f32>>,
        updates: u64,
    ) -> Result<(), ConfigError> {
        for (name, cur, new) in [("slot_a", &mut self.slot_a, slot_a), ("slot_b", &mut self.slot_b, slot_b)] {
            match new {
                Some(v) if v.len() == cur.len() => *cur = v,
                None if cur.is_empty() => {}
                Some(v) => {
                    return Err(ConfigError::invalid(format!(
                        "optimizer state {name} has {} values, expected {}",
                        v.len(),
                        cur.len()
                    )))
                }
                None => return Err(ConfigError::invalid(format!("optimizer state {name} is missing"))),
            }
        }
        self.updates = updates;
        Ok(())
    }

    /// Applies one update with gradient `scale * grad_sum` and learning rate `lr`.
    pub fn apply(&mut self, params: &mut [f32], grad_sum: &[f32], scale: f32, lr: f32) {
        debug_assert_eq!(params.len(), grad_sum.len());
        self.updates += 1;
        match self.config {
            OptimizerConfig::Sgd => {
                let k = lr * scale;
                for (p, g) in params.iter_mut().zip(grad_sum) {
                    *p -= k * g;
                }
            }
            OptimizerConfig::Momentum { momentum, nesterov } => {
                for ((p, g), v) in params.iter_mut().zip(grad_sum).zip(self.slot_a.iter_mut()) {
                    let g = g * scale;
                    *v = momentum * *v + g;
                    let d = if nesterov { g + momentum * *v } else { *v };
                    *p -= lr * d;
                }
            }
            OptimizerConfig::Rmsprop { decay, momentum, epsilon } => {
                let it = params.iter_mut().zip(grad_sum).zip(self.slot_a.iter_mut().zip(self.slot_b.iter_mut()));
                for ((p, g), (ms, mom)) in it {
                    let g = g * scale;
                    *ms = decay * *ms + (1.0 - decay) * g * g;
                    *mom = momentum * *mom + lr * g / (*ms + epsilon).sqrt();
                    *p -= *mom;
                }
            }
            OptimizerConfig::Adam { beta1, beta2, epsilon } => {
                let t = self.updates as i32;
                let c1 = 1.0 - beta1.powi(t);
                let c2 = 1.0 - beta2.powi(t);
                let step = lr * c2.sqrt() / c1;
                let eps = epsilon * c2.sqrt();
                let it = params.iter_mut().zip(grad_sum).zip(self.slot_a.iter_mut().zip(self.slot_b.iter_mut()));
                for ((p, g), (m, v)) in it {
                    let g = g * scale;
                    *m = beta1 * *m + (1.0 - beta1) * g;
                    *v = beta2 * *v + (1.0 - beta2) * g * g;
                    *p -= step * *m / (v.sqrt() + eps);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_short_form_of_every_optimizer_reads_back_to_the_same_optimizer() {
        for text in
            ["sgd", "momentum:0.9", "nesterov:0.5", "rmsprop", "rmsprop:0.95,0.8,0.5", "adam", "adam:0.8,0.99,1e-6"]
        {
            let o: OptimizerConfig = text.parse().unwrap();
            assert_eq!(o.to_string().parse::<OptimizerConfig>().unwrap(), o, "{text}");
        }
        assert_eq!("rmsprop".parse::<OptimizerConfig>().unwrap(), OptimizerConfig::paper_rmsprop());
        assert_eq!(
            "nesterov:0.5".parse::<OptimizerConfig>().unwrap(),
            OptimizerConfig::Momentum { momentum: 0.5, nesterov: true }
        );
    }

    #[test]
    fn a_bad_optimizer_is_refused_with_what_to_write_instead() {
        for (text, want) in [
            ("lbfgs", "unknown optimizer `lbfgs`: use sgd"),
            ("momentum:x", "`x` in optimizer `momentum:x` is not a number"),
            ("momentum:1.5", "momentum must be in [0, 1)"),
            ("sgd:0.1", "takes at most 0 numbers"),
        ] {
            let e = text.parse::<OptimizerConfig>().unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    fn close(a: f32, b: f32) -> bool {
        (a - b).abs() <= 1e-6 * (1.0 + b.abs())
    }

    #[test]
    fn sgd_subtracts_lr_times_the_averaged_gradient() {
        let mut o = Optimizer::new(OptimizerConfig::Sgd, 2);
        let mut p = vec![1.0, -1.0];
        // sum of two gradients (2, 4) and (0, 2): average (1, 3)
        o.apply(&mut p, &[2.0, 6.0], 0.5, 0.1);
        assert!(close(p[0], 0.9) && close(p[1], -1.3), "{p:?}");
    }

    #[test]
    fn momentum_accumulates_velocity_across_steps() {
        let mut o = Optimizer::new(OptimizerConfig::Momentum { momentum: 0.9, nesterov: false }, 1);
        let mut p = vec![0.0];
        o.apply(&mut p, &[1.0], 1.0, 0.1); // v = 1, p = -0.1
        o.apply(&mut p, &[1.0], 1.0, 0.1); // v = 1.9, p = -0.29
        assert!(close(p[0], -0.29), "{p:?}");
    }

    #[test]
    fn nesterov_looks_ahead_along_the_velocity() {
        let mut o = Optimizer::new(OptimizerConfig::Momentum { momentum: 0.9, nesterov: true }, 1);
        let mut p = vec![0.0];
        o.apply(&mut p, &[1.0], 1.0, 0.1); // v = 1, d = 1 + 0.9 = 1.9, p = -0.19
        o.apply(&mut p, &[1.0], 1.0, 0.1); // v = 1.9, d = 1 + 1.71 = 2.71, p = -0.461
        assert!(close(p[0], -0.461), "{p:?}");
    }

    #[test]
    fn rmsprop_matches_tensorflow_with_mean_square_starting_at_one() {
        let mut o = Optimizer::new(OptimizerConfig::Rmsprop { decay: 0.9, momentum: 0.9, epsilon: 1.0 }, 1);
        let mut p = vec![1.0];
        o.apply(&mut p, &[2.0], 1.0, 0.1);
        // ms = 0.9*1 + 0.1*4 = 1.3; mom = 0.1*2/sqrt(2.3) = 0.131876; p = 0.868124
        let mom1 = 0.2 / (2.3f32).sqrt();
        assert!(close(p[0], 1.0 - mom1), "{p:?}");
        o.apply(&mut p, &[2.0], 1.0, 0.1);
        // ms = 0.9*1.3 + 0.4 = 1.57; mom = 0.9*mom1 + 0.2/sqrt(2.57)
        let mom2 = 0.9 * mom1 + 0.2 / (2.57f32).sqrt();
        assert!(close(p[0], 1.0 - mom1 - mom2), "{p:?}");
    }

    #[test]
    fn adam_first_step_moves_by_lr_in_the_gradient_sign() {
        let mut o = Optimizer::new(OptimizerConfig::Adam { beta1: 0.9, beta2: 0.999, epsilon: 1e-8 }, 2);
        let mut p = vec![0.0, 0.0];
        o.apply(&mut p, &[3.0, -0.5], 1.0, 0.01);
        assert!(close(p[0], -0.01) && close(p[1], 0.01), "{p:?}");
        // second step, hand-computed: m = 0.9*0.3+0.3 = 0.57 (for g = 3), v = 0.999*0.009 + 0.009
        o.apply(&mut p, &[3.0, -0.5], 1.0, 0.01);
        let m: f32 = 0.9 * 0.3 + 0.1 * 3.0;
        let v: f32 = 0.999 * 0.009 + 0.001 * 9.0;
        let mhat = m / (1.0 - 0.81);
        let vhat = v / (1.0 - 0.998001);
        let expect = -0.01 - 0.01 * mhat / (vhat.sqrt() + 1e-8);
        assert!((p[0] - expect).abs() < 1e-5, "{} vs {expect}", p[0]);
    }

    #[test]
    fn restore_rejects_state_of_the_wrong_length() {
        let mut o = Optimizer::new(OptimizerConfig::Momentum { momentum: 0.9, nesterov: false }, 3);
        assert!(o.restore(Some(vec![0.0; 2]), None, 0).is_err());
        assert!(o.restore(Some(vec![0.5; 3]), None, 7).is_ok());
        assert_eq!(o.updates(), 7);
    }

    #[test]
    fn out_of_range_hyper_parameters_are_rejected() {
        assert!(OptimizerConfig::Momentum { momentum: 1.5, nesterov: false }.validate().is_err());
        assert!(OptimizerConfig::Rmsprop { decay: 0.9, momentum: 0.9, epsilon: 0.0 }.validate().is_err());
        assert!(OptimizerConfig::paper_rmsprop().validate().is_ok());
    }
}
