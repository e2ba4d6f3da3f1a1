//! Parsers shared by the subcommands: optimizers, schedules, models and datasets as short strings.

use anyhow::{bail, Context, Result};
use quorum_compute::data::{load, DatasetName};
use quorum_compute::{Classifier, ModelSpec};
use quorum_core::{Decay, OptimizerConfig};
use std::path::Path;

/// `sgd`, `momentum:0.9`, `nesterov:0.9`, `rmsprop[:decay,momentum,epsilon]`, `adam[:b1,b2,eps]`.
pub fn optimizer(s: &str) -> Result<OptimizerConfig> {
    let (kind, args) = s.split_once(':').unwrap_or((s, ""));
    let nums: Vec<f32> = if args.is_empty() {
        Vec::new()
    } else {
        args.split(',')
            .map(|x| x.trim().parse::<f32>().with_context(|| format!("`{x}` in optimizer `{s}` is not a number")))
            .collect::<Result<_>>()?
    };
    let get = |i: usize, d: f32| nums.get(i).copied().unwrap_or(d);
    let cfg = match kind {
        "sgd" => OptimizerConfig::Sgd,
        "momentum" => OptimizerConfig::Momentum { momentum: get(0, 0.9), nesterov: false },
        "nesterov" => OptimizerConfig::Momentum { momentum: get(0, 0.9), nesterov: true },
        "rmsprop" => OptimizerConfig::Rmsprop { decay: get(0, 0.9), momentum: get(1, 0.9), epsilon: get(2, 1.0) },
        "adam" => OptimizerConfig::Adam { beta1: get(0, 0.9), beta2: get(1, 0.999), epsilon: get(2, 1e-8) },
        _ => bail!("unknown optimizer `{s}`: use sgd, momentum:M, nesterov:M, rmsprop[:DECAY,MOMENTUM,EPS] or adam[:B1,B2,EPS]"),
    };
    cfg.validate()?;
    Ok(cfg)
}

/// `constant`, `exp:RATE,EVERY[,staircase]`, `linear:START,END` (steps).
pub fn decay(s: &str) -> Result<Decay> {
    let (kind, args) = s.split_once(':').unwrap_or((s, ""));
    let parts: Vec<&str> = args.split(',').map(str::trim).collect();
    Ok(match (kind, parts.as_slice()) {
        ("constant", _) => Decay::Constant,
        ("exp", [rate, every, rest @ ..]) => Decay::Exponential {
            rate: rate.parse().with_context(|| format!("bad decay rate in `{s}`"))?,
            every: every.parse().with_context(|| format!("bad decay interval in `{s}`"))?,
            staircase: rest.first() == Some(&"staircase"),
        },
        ("linear", [start, end]) => Decay::Linear {
            start: start.parse().with_context(|| format!("bad start in `{s}`"))?,
            end: end.parse().with_context(|| format!("bad end in `{s}`"))?,
        },
        _ => bail!("unknown learning-rate decay `{s}`: use constant, exp:RATE,EVERY[,staircase] or linear:START,END"),
    })
}

/// Loads `dataset` from `data_root/<name>` (or `data_root` itself when it holds the files)
/// and builds a classifier with `validation` examples held out of the training set.
#[allow(clippy::too_many_arguments)]
pub fn classifier(
    model: &str,
    dataset: &str,
    data_root: &Path,
    validation: usize,
    batch: usize,
    workers: u32,
    seed: u64,
) -> Result<Classifier> {
    let spec = ModelSpec::parse(model).map_err(anyhow::Error::msg)?;
    let name: DatasetName = dataset.parse().map_err(anyhow::Error::msg)?;
    let nested = data_root.join(name.dir_name());
    let dir = if nested.is_dir() { nested } else { data_root.to_path_buf() };
    let (train, test) = load(name, &dir)?;
    if validation >= train.len() {
        bail!("--validation ({validation}) must be smaller than the training set ({} examples)", train.len());
    }
    let (train, val) = train.split_validation(validation);
    Ok(Classifier::new(spec, train, val, test, batch, workers, seed)?)
}

/// Updates that make `epochs` passes over `train_examples` examples, when every update
/// averages the policy's usual number of gradients of `batch` examples each (at least one).
/// The one conversion `quorum sim` and `quorum train` share.
pub fn steps_for_epochs(epochs: f64, train_examples: usize, policy: &quorum_core::Policy, batch: usize) -> u64 {
    let per_step = policy.aggregate_hint().max(1) as f64 * batch as f64;
    ((epochs * train_examples as f64) / per_step).ceil().max(1.0) as u64
}

/// The synthetic model's dimension in a model name: `None` for another model,
/// `Some(None)` for a bare `synthetic` (the command picks its default), `Some(Some(d))` for
/// `synthetic:D`. The one reading of the name for `quorum sim` and `quorum train`.
pub fn synthetic_dim(model: &str) -> Result<Option<Option<usize>>> {
    let Some(rest) = model.strip_prefix("synthetic") else { return Ok(None) };
    match rest.strip_prefix(':') {
        Some(d) => Ok(Some(Some(d.parse().with_context(|| format!("bad dimension in model `{model}`"))?))),
        None if rest.is_empty() => Ok(Some(None)),
        None => bail!("unknown model `{model}`: use synthetic[:DIM], mlp, mlp:W1,W2,..., cnn or cnn:C1,C2,C3,C4"),
    }
}
