//! The `GradientSource` trait: the one thing a worker needs from a model.

use quorum_core::{ParamLayout, Step, WorkerId};
use thiserror::Error;

/// Which mini-batch to use: a pure function of (seed, worker, step), never of timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchId {
    /// The computing worker.
    pub worker: WorkerId,
    /// The step of the parameters the gradient is computed on.
    pub step: Step,
}

/// The result of an evaluation on held-out data.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Evaluation {
    /// Mean loss.
    pub loss: f32,
    /// Classification accuracy in [0, 1], when the task has one.
    pub accuracy: Option<f32>,
}

/// Something went wrong while computing.
#[derive(Debug, Error)]
pub enum ComputeError {
    /// The parameter buffer does not match the model's layout.
    #[error("parameter buffer has {got} values but the model has {expected}")]
    WrongLength {
        /// Values given.
        got: usize,
        /// Values expected.
        expected: usize,
    },
    /// A dataset could not be used; the message names the file and the problem.
    #[error("{0}")]
    Data(String),
    /// The model configuration is invalid.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// Gradient code outside quorum failed (an exception in a Python gradient function).
    #[error("{0}")]
    Failed(String),
}

/// A model plus its data, seen as a function from flat parameters to gradients.
///
/// Every buffer is laid out as [`GradientSource::layout`] says, so the server, every worker
/// and every checkpoint agree on what each number means.
pub trait GradientSource {
    /// The parameter layout.
    fn layout(&self) -> &ParamLayout;

    /// Initial parameters, a pure function of `seed`.
    fn init_params(&self, seed: u64) -> Vec<f32>;

    /// Examples per mini-batch.
    fn batch_size(&self) -> usize;

    /// Mean gradient over the mini-batch `batch` at `params`, written into `grad`
    /// (resized to the layout's length); returns the mini-batch loss. `grad` may hold an
    /// earlier gradient (workers reuse the buffer): write every value.
    fn gradient(&mut self, params: &[f32], batch: BatchId, grad: &mut Vec<f32>) -> Result<f32, ComputeError>;

    /// Loss (and accuracy, where it means something) on the test set.
    fn evaluate(&mut self, params: &[f32]) -> Result<Evaluation, ComputeError>;

    /// Loss and accuracy on the validation split held out from the training set, used to
    /// choose between restarts; defaults to the test evaluation for sources without one.
    fn validate(&mut self, params: &[f32]) -> Result<Evaluation, ComputeError> {
        self.evaluate(params)
    }

    /// Examples in one epoch of training data; `None` for an endless stream (synthetic data).
    fn train_examples(&self) -> Option<usize> {
        None
    }
}

/// Checks a parameter buffer's length against a layout.
pub fn check_len(params: &[f32], layout: &ParamLayout) -> Result<(), ComputeError> {
    if params.len() == layout.len() {
        Ok(())
    } else {
        Err(ComputeError::WrongLength { got: params.len(), expected: layout.len() })
    }
}
