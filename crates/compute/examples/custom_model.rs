//! Plugging your own model into quorum: implement [`GradientSource`].
//!
//! The server only ever sees a flat `f32` buffer laid out as your [`ParamLayout`] says. A
//! worker turns that buffer into burn tensors, runs your forward pass, and writes the
//! gradients back in the same order. This example is a softmax regression on generated
//! data; swap in your own layers and data loading.
//!
//! Run: `cargo run -p quorum-compute --features burn --example custom_model`

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Tensor, TensorData};
use quorum_compute::{BatchId, ComputeError, Evaluation, GradientSource};
use quorum_core::{ParamLayout, WorkerId};

struct SoftmaxRegression {
    layout: ParamLayout,
    inputs: usize,
    classes: usize,
    device: Device,
}

impl SoftmaxRegression {
    fn new(inputs: usize, classes: usize) -> Self {
        // 1. Declare every tensor once, in a fixed order.
        let layout = ParamLayout::from_shapes([("w", vec![inputs, classes]), ("b", vec![classes])]).unwrap();
        SoftmaxRegression { layout, inputs, classes, device: Device::flex().autodiff() }
    }

    /// A batch that depends only on (worker, step): never on timing.
    fn batch(&self, b: BatchId, n: usize) -> (Vec<f32>, Vec<f32>) {
        let mut x = Vec::with_capacity(n * self.inputs);
        let mut y = vec![0.0; n * self.classes];
        for i in 0..n {
            let class = (b.step as usize + b.worker.index() + i) % self.classes;
            for j in 0..self.inputs {
                x.push(if j % self.classes == class { 1.0 } else { 0.0 });
            }
            y[i * self.classes + class] = 1.0;
        }
        (x, y)
    }

    fn loss(&self, params: &[f32], x: Vec<f32>, y: Vec<f32>, n: usize) -> (Tensor<1>, Vec<Tensor<1>>) {
        // 2. Flat buffer -> one tracked tensor per layout entry.
        let p: Vec<Tensor<1>> = self
            .layout
            .tensors()
            .iter()
            .map(|t| {
                Tensor::<1>::from_data(TensorData::new(params[t.range()].to_vec(), [t.len()]), &self.device)
                    .require_grad()
            })
            .collect();
        let w: Tensor<2> = p[0].clone().reshape([self.inputs, self.classes]);
        let b: Tensor<2> = p[1].clone().reshape([1, self.classes]);
        let x = Tensor::<2>::from_data(TensorData::new(x, [n, self.inputs]), &self.device);
        let y = Tensor::<2>::from_data(TensorData::new(y, [n, self.classes]), &self.device);
        let loss = (log_softmax(x.matmul(w) + b, 1) * y).sum().neg() / n as f32;
        (loss, p)
    }
}

impl GradientSource for SoftmaxRegression {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    fn init_params(&self, _seed: u64) -> Vec<f32> {
        vec![0.0; self.layout.len()]
    }

    fn batch_size(&self) -> usize {
        32
    }

    fn gradient(&mut self, params: &[f32], batch: BatchId, grad: &mut Vec<f32>) -> Result<f32, ComputeError> {
        let (x, y) = self.batch(batch, 32);
        let (loss, p) = self.loss(params, x, y, 32);
        let value: f32 = loss.clone().into_scalar();
        let mut grads = loss.backward();
        // 3. Gradients back into one flat buffer, in the same order.
        grad.clear();
        for t in &p {
            let g = t.grad_remove(&mut grads).expect("tracked");
            grad.extend_from_slice(g.into_data().as_slice::<f32>().expect("f32"));
        }
        Ok(value)
    }

    fn evaluate(&mut self, params: &[f32]) -> Result<Evaluation, ComputeError> {
        let (x, y) = self.batch(BatchId { worker: WorkerId(0), step: 10_000 }, 64);
        let (loss, _) = self.loss(params, x, y, 64);
        Ok(Evaluation { loss: loss.into_scalar(), accuracy: None })
    }
}

fn main() {
    // 4. Any driver takes it: here the simulator's building block, a plain SGD loop.
    let mut model = SoftmaxRegression::new(12, 4);
    let mut params = model.init_params(0);
    let mut grad = Vec::new();
    let start = model.evaluate(&params).unwrap().loss;
    for step in 0..100 {
        model.gradient(&params, BatchId { worker: WorkerId(0), step }, &mut grad).unwrap();
        params.iter_mut().zip(&grad).for_each(|(p, g)| *p -= 0.5 * g);
    }
    let end = model.evaluate(&params).unwrap().loss;
    println!("softmax regression: loss {start:.4} -> {end:.4}");
    assert!(end < start / 4.0);
}
