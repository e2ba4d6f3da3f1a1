//! The built-in models through burn's autodiff: the reference the native engine is tested
//! against, and the route to a GPU (`wgpu` feature). Opt-in (`burn` feature), because the
//! native engine is faster on a CPU and burn is most of a first build's time.
//!
//! The forward pass receives one burn tensor per layout entry, created from the flat buffer,
//! and the gradient is read back tensor by tensor in the same order.

use crate::data::Dataset;
use crate::model::ModelSpec;
use crate::native::Engine;
use crate::source::ComputeError;
use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::module::{conv2d, max_pool2d};
use burn::tensor::ops::{ConvOptions, MaxPoolOptions};
use burn::tensor::{Device, Tensor, TensorData};
use quorum_core::ParamLayout;

/// Examples per forward pass during evaluation.
const EVAL_CHUNK: usize = 1000;

/// Where burn computes: the device gradients are taken on (with autodiff) and the one
/// evaluations run on (without).
#[derive(Clone)]
pub(crate) struct BurnEngine {
    device: Device,
    eval_device: Device,
    /// The batch's images and one-hot labels, handed to burn (which keeps what it is given).
    x: Vec<f32>,
    y: Vec<f32>,
}

impl BurnEngine {
    /// burn on the CPU (`flex`), or with `Engine::Wgpu` on the first GPU wgpu finds.
    pub fn new(engine: Engine) -> Result<Self, ComputeError> {
        let base = match engine {
            Engine::Burn => Device::flex(),
            Engine::Wgpu => gpu()?,
            Engine::Native => unreachable!("the native engine is not burn's"),
        };
        Ok(BurnEngine { device: base.clone().autodiff(), eval_device: base, x: Vec::new(), y: Vec::new() })
    }

    /// One tensor per layout entry, on `device`; `track` asks for their gradients.
    fn param_tensors(layout: &ParamLayout, params: &[f32], device: &Device, track: bool) -> Vec<Tensor<1>> {
        layout
            .tensors()
            .iter()
            .map(|t| {
                let p = Tensor::<1>::from_data(TensorData::new(params[t.range()].to_vec(), [t.len()]), device);
                if track {
                    p.require_grad()
                } else {
                    p
                }
            })
            .collect()
    }

    /// Loads `params` into burn tensors and reads them back into `out`: the same work as
    /// moving parameters in and gradients out of the model (tests and benchmarks).
    pub fn roundtrip(&self, layout: &ParamLayout, params: &[f32], out: &mut Vec<f32>) {
        out.clear();
        for t in Self::param_tensors(layout, params, &self.device, true) {
            out.extend_from_slice(t.into_data().as_slice::<f32>().expect("f32 tensor"));
        }
    }

    /// Mean loss over the examples `idx` of `data`, with the gradient written into `grad`.
    pub fn gradient(
        &mut self,
        spec: &ModelSpec,
        layout: &ParamLayout,
        params: &[f32],
        data: &Dataset,
        idx: &[usize],
        grad: &mut Vec<f32>,
    ) -> Result<f32, ComputeError> {
        let (n, k) = (idx.len(), data.classes);
        // These buffers and burn's own are the only per-step allocations.
        self.x.clear();
        self.x.reserve(n * data.image_len());
        self.y.clear();
        self.y.resize(n * k, 0.0);
        for (row, &i) in idx.iter().enumerate() {
            self.x.extend_from_slice(data.image(i));
            self.y[row * k + data.labels[i] as usize] = 1.0;
        }
        let x = Tensor::<4>::from_data(
            TensorData::new(std::mem::take(&mut self.x), [n, data.channels, data.height, data.width]),
            &self.device,
        );
        let y = Tensor::<2>::from_data(TensorData::new(std::mem::take(&mut self.y), [n, k]), &self.device);
        let p = Self::param_tensors(layout, params, &self.device, true);
        let loss = cross_entropy(forward(spec, layout, &p, x), y);
        let loss_value: f32 = loss.clone().into_scalar();
        let mut grads = loss.backward();
        grad.clear();
        grad.reserve(layout.len());
        for (t, spec) in p.iter().zip(layout.tensors()) {
            let g = t
                .grad_remove(&mut grads)
                .ok_or_else(|| ComputeError::Config(format!("no gradient for {}", spec.name)))?;
            let data = g.into_data();
            let values = data
                .as_slice::<f32>()
                .map_err(|e| ComputeError::Config(format!("reading gradient of {}: {e:?}", spec.name)))?;
            grad.extend_from_slice(values);
        }
        Ok(loss_value)
    }

    /// The logits of `data`, [`EVAL_CHUNK`] examples at a time, each chunk handed to `take`
    /// with its labels.
    pub fn logits(
        &self,
        spec: &ModelSpec,
        layout: &ParamLayout,
        params: &[f32],
        data: &Dataset,
        mut take: impl FnMut(&[f32], &[u8]),
    ) -> Result<(), ComputeError> {
        let (c, h, w) = (data.channels, data.height, data.width);
        let p = Self::param_tensors(layout, params, &self.eval_device, false);
        for start in (0..data.len()).step_by(EVAL_CHUNK) {
            let n = EVAL_CHUNK.min(data.len() - start);
            let x = data.images[start * c * h * w..(start + n) * c * h * w].to_vec();
            let x = Tensor::<4>::from_data(TensorData::new(x, [n, c, h, w]), &self.eval_device);
            let values: Vec<f32> = forward(spec, layout, &p, x)
                .into_data()
                .try_into_vec()
                .map_err(|e| ComputeError::Config(format!("reading logits: {e:?}")))?;
            take(&values, &data.labels[start..start + n]);
        }
        Ok(())
    }
}

/// The first GPU wgpu finds (Vulkan, Metal, DirectX 12 or OpenGL). wgpu's runtime can be
/// set up once per process, so every engine (each worker's, the evaluator's) shares it.
#[cfg(feature = "wgpu")]
fn gpu() -> Result<Device, ComputeError> {
    static GPU: std::sync::OnceLock<Result<Device, String>> = std::sync::OnceLock::new();
    let device = GPU.get_or_init(|| Device::wgpu_options().init().map_err(|e| e.to_string())).clone();
    device.map_err(|e| {
        ComputeError::Config(format!(
            "engine `wgpu`: no GPU to run on ({e}); check the GPU's driver (and its Vulkan ICD on Linux: \
             `vulkaninfo --summary` should list it), or use engine = \"native\""
        ))
    })
}

#[cfg(not(feature = "wgpu"))]
fn gpu() -> Result<Device, ComputeError> {
    Engine::Wgpu.check_built().map(|()| unreachable!("checked: no wgpu in this build"))
}

/// Logits `[batch, classes]` for inputs `[batch, c, h, w]` given one tensor per layout entry.
pub(crate) fn forward(spec: &ModelSpec, layout: &ParamLayout, params: &[Tensor<1>], x: Tensor<4>) -> Tensor<2> {
    let shape = |i: usize| layout.tensors()[i].shape.clone();
    let [b, _, _, _] = x.dims();
    match spec {
        ModelSpec::Mlp { .. } => {
            let layers = params.len() / 2;
            let mut h: Tensor<2> = x.reshape([b as i64, -1]);
            for i in 0..layers {
                let s = shape(2 * i);
                let w: Tensor<2> = params[2 * i].clone().reshape([s[0], s[1]]);
                let bias: Tensor<2> = params[2 * i + 1].clone().reshape([1, s[1]]);
                h = h.matmul(w) + bias;
                if i + 1 < layers {
                    h = relu(h);
                }
            }
            h
        }
        ModelSpec::Cnn { .. } => {
            let conv = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
            let pool = MaxPoolOptions::new([2, 2]).with_stride([2, 2]);
            let mut h = x;
            for i in 0..4 {
                let s = shape(2 * i);
                let w: Tensor<4> = params[2 * i].clone().reshape([s[0], s[1], s[2], s[3]]);
                h = relu(conv2d(h, w, Some(params[2 * i + 1].clone()), conv.clone()));
                if i % 2 == 1 {
                    h = max_pool2d(h, pool.clone());
                }
            }
            let s = shape(8);
            let flat: Tensor<2> = h.reshape([b, s[0]]);
            let w: Tensor<2> = params[8].clone().reshape([s[0], s[1]]);
            let bias: Tensor<2> = params[9].clone().reshape([1, s[1]]);
            flat.matmul(w) + bias
        }
    }
}

/// Mean cross-entropy of `logits` against one-hot targets `[batch, classes]`.
pub(crate) fn cross_entropy(logits: Tensor<2>, one_hot: Tensor<2>) -> Tensor<1> {
    let [b, _] = logits.dims();
    (log_softmax(logits, 1) * one_hot).sum().neg() / b as f32
}
