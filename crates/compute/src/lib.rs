//! # quorum-compute
//!
//! What a worker computes: the [`GradientSource`] trait, a synthetic least-squares source
//! with a known optimum (for fast tests and simulations), and deterministic batch selection.

pub mod batch;
pub mod source;
pub mod synthetic;

pub use batch::BatchPlan;
pub use source::{BatchId, ComputeError, Evaluation, GradientSource};
pub use synthetic::LeastSquares;
