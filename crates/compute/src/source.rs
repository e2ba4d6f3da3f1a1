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
    /// The slice a gradient is to be written into does not match the model's layout.
    #[error("the gradient's buffer has {got} values but the model has {expected}")]
    WrongGradientLength {
        /// Values the buffer holds.
        got: usize,
        /// Values the model has.
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
    /// The computation stopped half-way because its result was no longer wanted
    /// ([`GradientSource::gradient_into_unless`]); what it wrote is no gradient.
    #[error("the computation was abandoned: its step closed without it")]
    Abandoned,
}

thread_local! {
    /// The buffer of [`GradientSource::gradient_into`]'s default, kept by each thread for its
    /// next gradient (a model's worth of memory is not allocated and faulted in every time).
    static BUFFER: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
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

    /// The same gradient written straight into `out` (the layout's length; every value
    /// overwritten), e.g. a worker's slot of memory shared with the server, so that it is not
    /// computed into a buffer and copied there. The default does exactly that (computes into a
    /// buffer the thread keeps, then copies); sources whose computation can write into any
    /// slice override it.
    fn gradient_into(&mut self, params: &[f32], batch: BatchId, out: &mut [f32]) -> Result<f32, ComputeError> {
        gradient_via_buffer(self, params, batch, out)
    }

    /// [`GradientSource::gradient_into`], stopped between two stages of the computation
    /// (blocks of a product, layers, passes) as soon as `overtaken()` says its result is no
    /// longer wanted (the step it is for closed without it): then [`ComputeError::Abandoned`],
    /// and `out` holds no gradient. The default never asks, and finishes: a source that cannot
    /// stop half-way says so in [`GradientSource::can_abandon`].
    fn gradient_into_unless(
        &mut self,
        params: &[f32],
        batch: BatchId,
        out: &mut [f32],
        overtaken: &dyn Fn() -> bool,
    ) -> Result<f32, ComputeError> {
        let _ = overtaken;
        self.gradient_into(params, batch, out)
    }

    /// Whether [`GradientSource::gradient_into_unless`] stops half-way when asked to.
    fn can_abandon(&self) -> bool {
        false
    }

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

/// [`GradientSource::gradient_into`] by way of [`GradientSource::gradient`]: into a buffer
/// the thread keeps, then copied into `out` (the default, and what sources whose computation
/// hands back a buffer of its own do).
pub fn gradient_via_buffer<S: GradientSource + ?Sized>(
    source: &mut S,
    params: &[f32],
    batch: BatchId,
    out: &mut [f32],
) -> Result<f32, ComputeError> {
    let mut grad = BUFFER.take();
    let copied = match source.gradient(params, batch, &mut grad) {
        Ok(_) if grad.len() != out.len() => {
            Err(ComputeError::WrongGradientLength { got: out.len(), expected: grad.len() })
        }
        Ok(loss) => {
            out.copy_from_slice(&grad);
            Ok(loss)
        }
        Err(e) => Err(e),
    };
    BUFFER.set(grad);
    copied
}

/// Checks a parameter buffer's length against a layout.
pub fn check_len(params: &[f32], layout: &ParamLayout) -> Result<(), ComputeError> {
    if params.len() == layout.len() {
        Ok(())
    } else {
        Err(ComputeError::WrongLength { got: params.len(), expected: layout.len() })
    }
}
