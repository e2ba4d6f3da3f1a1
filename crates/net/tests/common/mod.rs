//! Gradient sources the network tests share.
// Each test crate uses part of this module.
#![allow(dead_code)]

use quorum_compute::{BatchId, ComputeError, Evaluation, GradientSource, LeastSquares};
use std::sync::Arc;

type Before = Arc<dyn Fn(BatchId) -> Result<(), ComputeError> + Send + Sync>;
type After = Arc<dyn Fn(BatchId, &mut [f32]) + Send + Sync>;

/// The synthetic model with hooks the test runs around each gradient: before it (to signal,
/// arm a fault, or panic as broken user code would), and after it, on its values (to make
/// them diverge).
#[derive(Clone)]
pub struct Hooked {
    inner: LeastSquares,
    before: Before,
    after: Option<After>,
}

impl Hooked {
    /// `before` runs before each gradient; an `Err` is the gradient's.
    pub fn new(
        inner: &LeastSquares,
        before: impl Fn(BatchId) -> Result<(), ComputeError> + Send + Sync + 'static,
    ) -> Self {
        Hooked { inner: inner.clone(), before: Arc::new(before), after: None }
    }

    /// `after` rewrites each gradient's values.
    pub fn altering(inner: &LeastSquares, after: impl Fn(BatchId, &mut [f32]) + Send + Sync + 'static) -> Self {
        Hooked { inner: inner.clone(), before: Arc::new(|_| Ok(())), after: Some(Arc::new(after)) }
    }
}

impl GradientSource for Hooked {
    fn layout(&self) -> &quorum_core::ParamLayout {
        self.inner.layout()
    }
    fn init_params(&self, seed: u64) -> Vec<f32> {
        self.inner.init_params(seed)
    }
    fn batch_size(&self) -> usize {
        self.inner.batch_size()
    }
    fn gradient(&mut self, params: &[f32], batch: BatchId, out: &mut Vec<f32>) -> Result<f32, ComputeError> {
        (self.before)(batch)?;
        let loss = self.inner.gradient(params, batch, out)?;
        if let Some(after) = &self.after {
            after(batch, out);
        }
        Ok(loss)
    }
    fn evaluate(&mut self, params: &[f32]) -> Result<Evaluation, ComputeError> {
        self.inner.evaluate(params)
    }
}

/// The synthetic model, which stops half-way when told its step closed; while `stuck`, its
/// computation takes `patience` unless stopped first (a slow machine's gradient, overtaken).
#[derive(Clone)]
pub struct Stoppable {
    pub inner: Hooked,
    pub stuck: bool,
    pub patience: std::time::Duration,
}

impl GradientSource for Stoppable {
    fn layout(&self) -> &quorum_core::ParamLayout {
        self.inner.layout()
    }
    fn init_params(&self, seed: u64) -> Vec<f32> {
        self.inner.init_params(seed)
    }
    fn batch_size(&self) -> usize {
        self.inner.batch_size()
    }
    fn gradient(&mut self, params: &[f32], batch: BatchId, out: &mut Vec<f32>) -> Result<f32, ComputeError> {
        self.inner.gradient(params, batch, out)
    }
    fn gradient_into_unless(
        &mut self,
        params: &[f32],
        batch: BatchId,
        out: &mut [f32],
        overtaken: &dyn Fn() -> bool,
    ) -> Result<f32, ComputeError> {
        let until = std::time::Instant::now() + self.patience;
        while self.stuck && std::time::Instant::now() < until {
            if overtaken() {
                return Err(ComputeError::Abandoned);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        self.inner.gradient_into(params, batch, out)
    }
    fn can_abandon(&self) -> bool {
        true
    }
    fn evaluate(&mut self, params: &[f32]) -> Result<Evaluation, ComputeError> {
        self.inner.evaluate(params)
    }
}
