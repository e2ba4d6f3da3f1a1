//! Delay models: how long a worker takes to compute one gradient. The simulator draws its
//! virtual compute times from them, and a real worker sleeps for them to inject straggling
//! (`--delay`), so both sit here, below either driver.
//!
//! Written as strings on the command line (`paper`, `exp:0.5`, `slow:2,4,const:1`) and as
//! the same strings in TOML configs.

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp, LogNormal, Pareto};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

/// A delay model that cannot be read (`gauss:1`, `exp:-1`) or made ready (a replay file
/// that cannot be read or has the wrong columns); the message says what to write instead.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DelayError(String);

/// A distribution of per-gradient compute times, in seconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DelayModel {
    /// Always the same time. `const:SECONDS`
    Constant(f64),
    /// Exponential with the given mean. `exp:MEAN`
    Exponential(f64),
    /// Log-normal with the given median and σ of the log. `lognormal:MEDIAN,SIGMA`
    LogNormal(f64, f64),
    /// `base` plus a Pareto tail with scale xm and shape α. `pareto:BASE,XM,ALPHA`
    Pareto(f64, f64, f64),
    /// Workers `0..k` run `factor` times slower than `base`. `slow:K,FACTOR,BASE-MODEL`
    SlowWorkers(u32, f64, Box<DelayModel>),
    /// Calibrated to the paper's Figure 3: with 100 workers about 80% of steps see their
    /// 98th gradient within 2 s and about 30% their 100th, with a steep tail. `paper`
    Paper,
    /// Replay recorded times from a CSV with columns `worker,seconds`; worker w replays the
    /// recorded sequence of recorded worker (w mod recorded workers), cyclically. `replay:PATH`
    Replay(PathBuf),
}

/// The paper model's pieces: a log-normal body plus, rarely, a Pareto tail.
const PAPER_MEDIAN: f64 = 1.4;
const PAPER_SIGMA: f64 = 0.08;
const PAPER_TAIL_P: f64 = 0.0135;
const PAPER_TAIL_XM: f64 = 0.7;
const PAPER_TAIL_ALPHA: f64 = 1.5;

fn parse_f64(s: &str, what: &str) -> Result<f64, String> {
    let v: f64 = s.trim().parse().map_err(|_| format!("{what} must be a number, got `{s}`"))?;
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("{what} must be a finite non-negative number, got `{s}`"))
    }
}

impl FromStr for DelayModel {
    type Err = DelayError;

    fn from_str(s: &str) -> Result<Self, DelayError> {
        parse_model(s).map_err(DelayError)
    }
}

fn parse_model(s: &str) -> Result<DelayModel, String> {
    let s = s.trim();
    let (kind, args) = s.split_once(':').unwrap_or((s, ""));
    let nums = |n: usize| -> Result<Vec<f64>, String> {
        let parts: Vec<&str> = args.split(',').collect();
        if parts.len() != n || args.is_empty() {
            return Err(format!("delay `{kind}` takes {n} comma-separated number(s), got `{args}`"));
        }
        parts.iter().map(|p| parse_f64(p, kind)).collect()
    };
    let model = match kind {
        "const" | "constant" => DelayModel::Constant(nums(1)?[0]),
        "exp" | "exponential" => DelayModel::Exponential(nums(1)?[0]),
        "lognormal" => {
            let v = nums(2)?;
            DelayModel::LogNormal(v[0], v[1])
        }
        "pareto" => {
            let v = nums(3)?;
            DelayModel::Pareto(v[0], v[1], v[2])
        }
        "slow" => {
            let mut it = args.splitn(3, ',');
            let (k, f, base) = (it.next().unwrap_or(""), it.next().unwrap_or(""), it.next().unwrap_or("const:1"));
            let k: u32 = k.trim().parse().map_err(|_| format!("slow: K must be a whole number, got `{k}`"))?;
            DelayModel::SlowWorkers(k, parse_f64(f, "slow factor")?, Box::new(parse_model(base)?))
        }
        "paper" if args.is_empty() => DelayModel::Paper,
        "replay" if !args.is_empty() => DelayModel::Replay(PathBuf::from(args)),
        _ => {
            return Err(format!(
                "unknown delay model `{s}`; use one of: const:S, exp:MEAN, lognormal:MEDIAN,SIGMA, pareto:BASE,XM,ALPHA, slow:K,FACTOR[,MODEL], paper, replay:FILE.csv"
            ))
        }
    };
    model.validate()?;
    Ok(model)
}

impl fmt::Display for DelayModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DelayModel::Constant(s) => write!(f, "const:{s}"),
            DelayModel::Exponential(m) => write!(f, "exp:{m}"),
            DelayModel::LogNormal(m, s) => write!(f, "lognormal:{m},{s}"),
            DelayModel::Pareto(b, x, a) => write!(f, "pareto:{b},{x},{a}"),
            DelayModel::SlowWorkers(k, x, base) => write!(f, "slow:{k},{x},{base}"),
            DelayModel::Paper => write!(f, "paper"),
            DelayModel::Replay(p) => write!(f, "replay:{}", p.display()),
        }
    }
}

impl TryFrom<String> for DelayModel {
    type Error = DelayError;
    fn try_from(s: String) -> Result<Self, DelayError> {
        s.parse()
    }
}

impl From<DelayModel> for String {
    fn from(d: DelayModel) -> String {
        d.to_string()
    }
}

impl DelayModel {
    fn validate(&self) -> Result<(), String> {
        match self {
            DelayModel::LogNormal(m, _) if *m <= 0.0 => Err("lognormal: the median must be positive".into()),
            DelayModel::Pareto(_, xm, a) if *xm <= 0.0 || *a <= 0.0 => {
                Err("pareto: XM and ALPHA must be positive".into())
            }
            _ => Ok(()),
        }
    }

    /// Resolves files (replay) into a ready sampler.
    pub fn sampler(&self) -> Result<DelaySampler, DelayError> {
        Ok(match self {
            DelayModel::Replay(path) => DelaySampler {
                model: self.clone(),
                replay: Some(Arc::new(load_replay(path).map_err(DelayError)?)),
                base: None,
            },
            DelayModel::SlowWorkers(_, _, base) => {
                DelaySampler { model: self.clone(), replay: None, base: Some(Box::new(base.sampler()?)) }
            }
            _ => DelaySampler { model: self.clone(), replay: None, base: None },
        })
    }
}

/// Recorded per-worker sequences.
#[derive(Debug)]
struct Replay {
    sequences: Vec<Vec<f64>>,
}

fn load_replay(path: &Path) -> Result<Replay, String> {
    let mut rdr =
        csv::Reader::from_path(path).map_err(|e| format!("cannot read delay replay file {}: {e}", path.display()))?;
    let headers = rdr.headers().map_err(|e| format!("{}: {e}", path.display()))?.clone();
    let col = |name: &str| headers.iter().position(|h| h.trim() == name);
    let (Some(wc), Some(sc)) = (col("worker"), col("seconds")) else {
        return Err(format!(
            "delay replay file {} needs columns `worker,seconds`, found `{}`",
            path.display(),
            headers.iter().collect::<Vec<_>>().join(",")
        ));
    };
    let mut by_worker: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for (i, rec) in rdr.records().enumerate() {
        let rec = rec.map_err(|e| format!("{}: {e}", path.display()))?;
        let w: u64 = rec
            .get(wc)
            .unwrap_or("")
            .trim()
            .parse()
            .map_err(|_| format!("{} line {}: worker must be a whole number", path.display(), i + 2))?;
        let s = parse_f64(rec.get(sc).unwrap_or(""), "seconds")
            .map_err(|e| format!("{} line {}: {e}", path.display(), i + 2))?;
        by_worker.entry(w).or_default().push(s);
    }
    if by_worker.is_empty() {
        return Err(format!("delay replay file {} has no rows", path.display()));
    }
    Ok(Replay { sequences: by_worker.into_values().collect() })
}

/// A delay model ready to draw from.
#[derive(Debug, Clone)]
pub struct DelaySampler {
    model: DelayModel,
    replay: Option<Arc<Replay>>,
    base: Option<Box<DelaySampler>>,
}

impl DelaySampler {
    /// The `draw`-th compute time of `worker`, in seconds. `rng` should be the worker's own
    /// stream so that one worker's draws do not shift another's.
    pub fn sample(&self, worker: u32, draw: u64, rng: &mut ChaCha8Rng) -> f64 {
        match &self.model {
            DelayModel::Constant(s) => *s,
            DelayModel::Exponential(m) => {
                if *m == 0.0 {
                    0.0
                } else {
                    Exp::new(1.0 / m).expect("positive rate").sample(rng)
                }
            }
            DelayModel::LogNormal(median, sigma) => LogNormal::new(median.ln(), *sigma).expect("valid").sample(rng),
            DelayModel::Pareto(base, xm, alpha) => base + Pareto::new(*xm, *alpha).expect("valid").sample(rng),
            DelayModel::SlowWorkers(k, factor, _) => {
                let t = self.base.as_ref().expect("resolved").sample(worker, draw, rng);
                if worker < *k {
                    t * factor
                } else {
                    t
                }
            }
            DelayModel::Paper => {
                let body = LogNormal::new(PAPER_MEDIAN.ln(), PAPER_SIGMA).expect("valid").sample(rng);
                let tail = if rng.random::<f64>() < PAPER_TAIL_P {
                    Pareto::new(PAPER_TAIL_XM, PAPER_TAIL_ALPHA).expect("valid").sample(rng)
                } else {
                    0.0
                };
                body + tail
            }
            DelayModel::Replay(_) => {
                let r = self.replay.as_ref().expect("resolved");
                let seq = &r.sequences[worker as usize % r.sequences.len()];
                seq[(draw % seq.len() as u64) as usize]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn delay_strings_round_trip() {
        for s in ["const:1", "exp:0.5", "lognormal:1,0.2", "pareto:1,0.5,1.5", "slow:2,4,exp:1", "paper"] {
            let m: DelayModel = s.parse().unwrap();
            assert_eq!(m.to_string(), s);
        }
    }

    #[test]
    fn bad_delay_strings_say_what_is_expected() {
        let e = "gauss:1".parse::<DelayModel>().unwrap_err().to_string();
        assert!(e.contains("unknown delay model `gauss:1`") && e.contains("exp:MEAN"), "{e}");
        let e = "exp:-1".parse::<DelayModel>().unwrap_err().to_string();
        assert!(e.contains("non-negative"), "{e}");
        let e = "lognormal:1".parse::<DelayModel>().unwrap_err().to_string();
        assert!(e.contains("takes 2"), "{e}");
    }

    #[test]
    fn slow_workers_are_slower_by_the_factor() {
        let s = "slow:1,3,const:2".parse::<DelayModel>().unwrap().sampler().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(s.sample(0, 0, &mut rng), 6.0);
        assert_eq!(s.sample(1, 0, &mut rng), 2.0);
    }

    #[test]
    fn replay_cycles_through_recorded_times_per_worker() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        std::fs::write(&path, "worker,seconds\n0,1.0\n0,2.0\n1,5.0\n").unwrap();
        let s = DelayModel::Replay(path.clone()).sampler().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let got: Vec<f64> = (0..3).map(|d| s.sample(0, d, &mut rng)).collect();
        assert_eq!(got, vec![1.0, 2.0, 1.0]);
        assert_eq!(s.sample(1, 0, &mut rng), 5.0);
        assert_eq!(s.sample(2, 1, &mut rng), 2.0, "worker 2 replays recorded worker 0");
        std::fs::write(&path, "w,s\n0,1\n").unwrap();
        let e = DelayModel::Replay(path).sampler().unwrap_err().to_string();
        assert!(e.contains("needs columns `worker,seconds`"), "{e}");
    }
}
