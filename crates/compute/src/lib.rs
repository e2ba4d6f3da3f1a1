//! # quorum-compute
//!
//! What a worker computes: the [`GradientSource`] trait; real image classifiers (an MLP and
//! the paper's MNIST CNN) with hand-written gradients on the `gemm` kernels (with the `burn`
//! feature, burn's autodiff as the reference, on the CPU or through `wgpu` on a GPU, and for
//! models of your own); dataset readers for
//! MNIST, Fashion-MNIST and CIFAR-10; deterministic batch selection; and a synthetic
//! least-squares source with a known optimum for fast tests and simulations.

#![deny(missing_docs)]

pub mod batch;
#[cfg(feature = "burn")]
mod burn_engine;
#[cfg(feature = "models")]
pub mod classifier;
pub mod data;
pub mod delay;
#[cfg(feature = "models")]
pub mod model;
#[cfg(feature = "models")]
pub mod native;
pub mod source;
pub mod synthetic;

pub use batch::BatchPlan;
#[cfg(feature = "models")]
pub use classifier::Classifier;
pub use data::{Dataset, DatasetName};
pub use delay::{DelayError, DelayModel, DelaySampler};
#[cfg(feature = "models")]
pub use model::ModelSpec;
#[cfg(feature = "models")]
pub use native::Engine;
pub use source::{gradient_via_buffer, BatchId, ComputeError, Evaluation, GradientSource};
pub use synthetic::LeastSquares;
