//! The built-in models' gradients computed by hand on the `gemm` crate's kernels: the same
//! arithmetic as burn's autodiff (tests compare the two), without a graph, per-op tensor
//! allocations or copies of the parameters in and the gradient out. What limits it is the
//! matrix products (`experiments/gradient_limit.sh` measures how close to them it gets).

mod cnn;
mod gemm;
mod mlp;
mod ops;
mod winograd;

use crate::model::ModelSpec;
use quorum_core::ParamLayout;

/// Who computes a classifier's gradients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Hand-written forward and backward passes over `gemm` (the default: fastest measured).
    #[default]
    Native,
    /// burn's autodiff on its `flex` CPU backend: the reference the native engine is tested
    /// against. Builds with the `burn` feature only.
    Burn,
    /// burn's autodiff on a GPU through wgpu (Vulkan, Metal, DirectX 12). Builds with the
    /// `wgpu` feature only.
    Wgpu,
}

impl Engine {
    /// Whether this build has the engine; if not, an error that says how to build it in.
    pub fn check_built(self) -> Result<(), crate::ComputeError> {
        let built = match self {
            Engine::Native => true,
            Engine::Burn => cfg!(feature = "burn"),
            Engine::Wgpu => cfg!(feature = "wgpu"),
        };
        if built {
            return Ok(());
        }
        Err(crate::ComputeError::Config(format!(
            "engine `{0}` is not in this build of quorum: burn's autodiff is opt-in (the native engine is \
             faster on a CPU); rebuild with `--features {0}` (e.g. `cargo build --release -p quorum-cli \
             --features {0}`), or use engine = \"native\"",
            self.name()
        )))
    }

    /// The name in configs and flags.
    pub fn name(self) -> &'static str {
        match self {
            Engine::Native => "native",
            Engine::Burn => "burn",
            Engine::Wgpu => "wgpu",
        }
    }
}

/// The native engine's state for one model: scratch buffers reused between steps.
#[derive(Clone)]
pub(crate) enum Native {
    Mlp(mlp::Mlp),
    Cnn(Box<cnn::Cnn>),
}

impl Native {
    /// The engine for `spec`.
    pub fn new(spec: &ModelSpec) -> Self {
        match spec {
            ModelSpec::Mlp { .. } => Native::Mlp(mlp::Mlp::default()),
            ModelSpec::Cnn { .. } => Native::Cnn(Box::default()),
        }
    }

    /// The logits (`b × classes`) of the batch `x` (`[b, c, h, w]`).
    pub fn logits(
        &mut self,
        layout: &ParamLayout,
        params: &[f32],
        x: &[f32],
        image: (usize, usize, usize),
        b: usize,
    ) -> &[f32] {
        match self {
            Native::Mlp(m) => m.logits(layout, params, x, b),
            Native::Cnn(c) => c.logits(layout, params, x, image, b),
        }
    }

    /// Examples per forward pass when evaluating: the CNN keeps every layer's activations
    /// (about 0.35 MB per example for the paper's CNN), the MLP a few KB.
    pub fn eval_chunk(&self) -> usize {
        match self {
            Native::Mlp(_) => 1000,
            Native::Cnn(_) => 64,
        }
    }

    /// Mean loss over `batch`, gradient into `grad`; `None` (and no gradient in `grad`) when
    /// `overtaken()`, asked within and between the layers' passes, says the result is no
    /// longer wanted.
    pub fn loss_and_gradient(
        &mut self,
        layout: &ParamLayout,
        params: &[f32],
        batch: Labelled<'_>,
        grad: &mut [f32],
        overtaken: &dyn Fn() -> bool,
    ) -> Option<f32> {
        match self {
            Native::Mlp(m) => m.loss_and_gradient(layout, params, batch, grad, overtaken),
            Native::Cnn(c) => c.loss_and_gradient(layout, params, batch, grad, overtaken),
        }
    }
}

/// A mini-batch: `labels.len()` examples of shape `image` (`[c, h, w]`) one after another in `x`.
#[derive(Clone, Copy)]
pub(crate) struct Labelled<'a> {
    pub x: &'a [f32],
    pub image: (usize, usize, usize),
    pub labels: &'a [u8],
}
