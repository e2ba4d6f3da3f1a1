//! The MLP's loss and gradient by hand: three matrix products forward, and for each layer one
//! for the weights' gradient and (below the top) one for the layer's input.

use super::gemm::{matmul, Mat};
use super::ops::{col_sums, fill_rows, relu, relu_backward, softmax_cross_entropy};
use super::Labelled;
use quorum_core::ParamLayout;

/// Scratch buffers, kept between steps so a step allocates nothing once warm.
#[derive(Clone, Default)]
pub(crate) struct Mlp {
    /// Each layer's output (after the ReLU below the top; the logits at the top).
    outs: Vec<Vec<f32>>,
    delta: Vec<f32>,
    next: Vec<f32>,
}

impl Mlp {
    /// The logits of the batch `x` (`b` rows of `layout`'s input width), `b × classes`.
    pub fn logits(&mut self, layout: &ParamLayout, params: &[f32], x: &[f32], b: usize) -> &[f32] {
        self.forward(layout, params, x, b);
        self.outs.last().map_or(&[], |v| v.as_slice())
    }

    /// Every layer's output into `outs` (after the ReLU below the top; logits at the top).
    fn forward(&mut self, layout: &ParamLayout, params: &[f32], x: &[f32], b: usize) {
        let t = layout.tensors();
        let layers = t.len() / 2;
        self.outs.resize_with(layers, Vec::new);
        for i in 0..layers {
            let (din, dout) = (t[2 * i].shape[0], t[2 * i].shape[1]);
            let (done, rest) = self.outs.split_at_mut(i);
            let input: &[f32] = if i == 0 { x } else { &done[i - 1] };
            let out = &mut rest[0];
            out.resize(b * dout, 0.0);
            fill_rows(out, &params[t[2 * i + 1].range()]);
            matmul(out, Mat::new(input, b, din), Mat::new(&params[t[2 * i].range()], din, dout), true);
            if i + 1 < layers {
                relu(out);
            }
        }
    }

    /// Mean loss over `batch` (rows of `layout`'s input width), with the gradient written into
    /// `grad` (layout order); `None` if `overtaken()` says stop, asked before each layer's
    /// backward pass (the first right after the forward pass).
    pub fn loss_and_gradient(
        &mut self,
        layout: &ParamLayout,
        params: &[f32],
        batch: Labelled<'_>,
        grad: &mut [f32],
        overtaken: &dyn Fn() -> bool,
    ) -> Option<f32> {
        let Labelled { x, labels, .. } = batch;
        let b = labels.len();
        self.forward(layout, params, x, b);
        let t = layout.tensors();
        let layers = t.len() / 2;
        let dims = |i: usize| (t[2 * i].shape[0], t[2 * i].shape[1]);
        let classes = dims(layers - 1).1;
        std::mem::swap(&mut self.delta, &mut self.outs[layers - 1]);
        let loss = softmax_cross_entropy(&mut self.delta, labels, classes);
        for i in (0..layers).rev() {
            if overtaken() {
                return None;
            }
            let (din, dout) = dims(i);
            let input: &[f32] = if i == 0 { x } else { &self.outs[i - 1] };
            let delta = Mat::new(&self.delta, b, dout);
            matmul(&mut grad[t[2 * i].range()], Mat::new(input, b, din).t(), delta, false);
            col_sums(&mut grad[t[2 * i + 1].range()], &self.delta);
            if i > 0 {
                self.next.resize(b * din, 0.0);
                matmul(&mut self.next, delta, Mat::new(&params[t[2 * i].range()], din, dout).t(), false);
                relu_backward(&mut self.next, input);
                std::mem::swap(&mut self.delta, &mut self.next);
            }
        }
        Some(loss)
    }
}
