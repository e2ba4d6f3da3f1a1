//! Faults as inputs: a seeded, deterministic schedule of worker crashes, freezes and slow
//! links (as raft-rs's test network drops, isolates and recovers), and the invariants every
//! run must keep whatever the faults.

use quorum_core::{ConfigError, Event, Step, WorkerId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// One fault, hitting one worker at a virtual time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Virtual seconds since the start.
    pub at: f64,
    /// The worker hit.
    pub worker: u32,
    /// What happens to it.
    pub kind: FaultKind,
}

/// What a fault does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum FaultKind {
    /// The process dies (`kill -9`): its computation and everything on the way to it are
    /// lost, messages it already sent still arrive. With `restart_after`, a new process (a
    /// new session) starts that many seconds later and joins again.
    Crash {
        /// Seconds until the restart; `None`: it stays dead.
        restart_after: Option<f64>,
    },
    /// The process is frozen (SIGSTOP) for `seconds`: it computes, answers and sends
    /// nothing, then carries on where it was.
    Freeze {
        /// How long.
        seconds: f64,
    },
    /// It computes `factor` times slower for `seconds` (a computation that starts in that
    /// window takes `factor` times its drawn time): a machine shared with another job, a
    /// thermal throttle.
    Lag {
        /// Slow-down of its computations.
        factor: f64,
        /// How long.
        seconds: f64,
    },
    /// Its link is `factor` times slower, both ways, for `seconds`.
    SlowLink {
        /// Slow-down of every message to or from it.
        factor: f64,
        /// How long.
        seconds: f64,
    },
}

impl Fault {
    /// Checks the numbers.
    pub fn validate(&self, workers: u32) -> Result<(), ConfigError> {
        let ok = |x: f64| x.is_finite() && x >= 0.0;
        if self.worker >= workers || !ok(self.at) {
            return Err(ConfigError::invalid(format!(
                "fault `{self}`: the worker must be below {workers} (w0..w{}) and the time >= 0",
                workers.saturating_sub(1)
            )));
        }
        let fine = match &self.kind {
            FaultKind::Crash { restart_after } => restart_after.is_none_or(ok),
            FaultKind::Freeze { seconds } => ok(*seconds),
            FaultKind::SlowLink { factor, seconds } | FaultKind::Lag { factor, seconds } => {
                ok(*seconds) && factor.is_finite() && *factor >= 1.0
            }
        };
        if fine {
            Ok(())
        } else {
            Err(ConfigError::invalid(format!(
                "fault `{self}`: durations must be finite and >= 0, a slow-down factor >= 1"
            )))
        }
    }
}

/// The short form [`FromStr`](std::str::FromStr) reads.
impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (w, at) = (self.worker, self.at);
        match self.kind {
            FaultKind::Crash { restart_after: None } => write!(f, "crash:{w}@{at}"),
            FaultKind::Crash { restart_after: Some(r) } => write!(f, "crash:{w}@{at}+{r}"),
            FaultKind::Freeze { seconds } => write!(f, "freeze:{w}@{at}+{seconds}"),
            FaultKind::SlowLink { factor, seconds } => write!(f, "slow:{w}@{at}+{seconds}*{factor}"),
            FaultKind::Lag { factor, seconds } => write!(f, "lag:{w}@{at}+{seconds}*{factor}"),
        }
    }
}

impl std::str::FromStr for Fault {
    type Err = ConfigError;

    /// `crash:W@T` (dies for good), `crash:W@T+R` (restarts R seconds later),
    /// `freeze:W@T+S` (SIGSTOP for S seconds), `slow:W@T+S*F` (link F times slower for S
    /// seconds), `lag:W@T+S*F` (computes F times slower for S seconds): worker W, at T
    /// virtual seconds.
    fn from_str(spec: &str) -> Result<Self, ConfigError> {
        let usage = || {
            ConfigError::invalid(format!(
                "bad fault `{spec}`: use crash:W@T, crash:W@T+RESTART, freeze:W@T+SECONDS, slow:W@T+SECONDS*FACTOR or lag:W@T+SECONDS*FACTOR"
            ))
        };
        let num = |v: &str| v.trim().parse::<f64>().map_err(|_| usage());
        let (kind, rest) = spec.split_once(':').ok_or_else(usage)?;
        let (worker, when) = rest.split_once('@').ok_or_else(usage)?;
        let worker = worker.trim().parse::<u32>().map_err(|_| usage())?;
        let (at, after) = match when.split_once('+') {
            Some((at, after)) => (num(at)?, Some(after)),
            None => (num(when)?, None),
        };
        let kind = match (kind, after) {
            ("crash", None) => FaultKind::Crash { restart_after: None },
            ("crash", Some(r)) => FaultKind::Crash { restart_after: Some(num(r)?) },
            ("freeze", Some(s)) => FaultKind::Freeze { seconds: num(s)? },
            ("slow", Some(sf)) => {
                let (s, f) = sf.split_once('*').ok_or_else(usage)?;
                FaultKind::SlowLink { factor: num(f)?, seconds: num(s)? }
            }
            ("lag", Some(sf)) => {
                let (s, f) = sf.split_once('*').ok_or_else(usage)?;
                FaultKind::Lag { factor: num(f)?, seconds: num(s)? }
            }
            _ => return Err(usage()),
        };
        Ok(Fault { at, worker, kind })
    }
}

/// A whole-run invariant that a run's events break; the message says which step and how.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invariant broken: {0}")]
pub struct InvariantBroken(pub String);

/// The whole-run invariants, read from a run's events: every step applied once, in order,
/// with as many distinct contributors as the step needed (N, or the lowered N the events
/// announce; a step that the lowering itself closes keeps every gradient already in), each of which had a gradient accepted for that step. Returns what broke.
pub fn check_invariants(events: &[Event], aggregate: u32) -> Result<(), InvariantBroken> {
    let broken = |msg: String| Err(InvariantBroken(msg));
    let mut next: Step = 0;
    let mut n = aggregate;
    let mut lowered_now = false;
    let mut accepted: BTreeSet<(Step, WorkerId)> = BTreeSet::new();
    for e in events {
        match e {
            Event::AggregateChanged { to, .. } => {
                // A step closed by lowering N closes with every gradient already in.
                lowered_now = *to < n;
                n = *to;
            }
            Event::GradientAccepted { worker, step, .. } if !accepted.insert((*step, *worker)) => {
                return broken(format!("worker {worker} had two gradients accepted for step {step}"));
            }
            Event::StepApplied { step, contributors, .. } => {
                if *step != next {
                    return broken(format!("step {step} applied when step {next} was due"));
                }
                let distinct: BTreeSet<_> = contributors.iter().collect();
                let count_ok = contributors.len() == n as usize || (lowered_now && contributors.len() > n as usize);
                lowered_now = false;
                if distinct.len() != contributors.len() || !count_ok {
                    return broken(format!(
                        "step {step} applied with contributors {contributors:?}, needing {n} distinct"
                    ));
                }
                if let Some(w) = contributors.iter().find(|w| !accepted.contains(&(*step, **w))) {
                    return broken(format!("step {step} counts worker {w}, whose gradient was never accepted"));
                }
                accepted.retain(|(s, _)| *s > *step);
                next += 1;
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_strings_parse_and_bad_ones_say_what_is_expected() {
        let f: Fault = "crash:3@10+2.5".parse().unwrap();
        assert_eq!(f, Fault { at: 10.0, worker: 3, kind: FaultKind::Crash { restart_after: Some(2.5) } });
        assert_eq!("crash:0@1".parse::<Fault>().unwrap().kind, FaultKind::Crash { restart_after: None });
        assert_eq!("freeze:1@4+6".parse::<Fault>().unwrap().kind, FaultKind::Freeze { seconds: 6.0 });
        assert_eq!(
            "slow:2@0+30*10".parse::<Fault>().unwrap().kind,
            FaultKind::SlowLink { factor: 10.0, seconds: 30.0 }
        );
        assert_eq!("lag:4@50+100*3".parse::<Fault>().unwrap().kind, FaultKind::Lag { factor: 3.0, seconds: 100.0 });
        for text in ["crash:3@10+2.5", "crash:0@1", "freeze:1@4+6", "slow:2@0+30*10", "lag:4@50+100*3"] {
            assert_eq!(text.parse::<Fault>().unwrap().to_string(), text);
        }
        for bad in ["crash", "freeze:1@4", "slow:1@2+3", "lag:1@2+3", "melt:1@2", "crash:x@1"] {
            assert!(bad.parse::<Fault>().unwrap_err().to_string().contains("use crash:W@T"), "{bad}");
        }
    }
}
