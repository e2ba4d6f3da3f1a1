//! What the subcommands share about models and data: the classifier from a model name and
//! a dataset, epochs as steps, the synthetic model's name.

use anyhow::{bail, Context, Result};
use quorum_compute::data::{load, DatasetName};
use quorum_compute::{Classifier, ModelSpec};
use std::path::Path;

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
    let spec = ModelSpec::parse(model)?;
    let name: DatasetName = dataset.parse()?;
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
