//! The MLP's loss and gradient by hand: three matrix products forward, and for each layer one
//! for the weights' gradient and (below the top) one for the layer's input.

use super::gemm::{matmul_unless, Mat};
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
        self.forward(layout, params, x, b, &|| false);
        self.outs.last().map_or(&[], |v| v.as_slice())
    }

    /// Every layer's output into `outs` (after the ReLU below the top; logits at the top);
    /// `false` if `overtaken()`, asked between blocks of the products, said stop.
    fn forward(
        &mut self,
        layout: &ParamLayout,
        params: &[f32],
        x: &[f32],
        b: usize,
        overtaken: &dyn Fn() -> bool,
    ) -> bool {
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
            let w = Mat::new(&params[t[2 * i].range()], din, dout);
            if !matmul_unless(out, Mat::new(input, b, din), w, true, overtaken) {
                return false;
            }
            if i + 1 < layers {
                relu(out);
            }
        }
        true
    }

    /// Mean loss over `batch` (rows of `layout`'s input width), with the gradient written into
    /// `grad` (layout order); `None` if `overtaken()` says stop, asked after every block of
    /// [`super::gemm::STOP_BLOCK`] columns of every product, forward and backward.
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
        if !self.forward(layout, params, x, b, overtaken) {
            return None;
        }
        let t = layout.tensors();
        let layers = t.len() / 2;
        let dims = |i: usize| (t[2 * i].shape[0], t[2 * i].shape[1]);
        let classes = dims(layers - 1).1;
        std::mem::swap(&mut self.delta, &mut self.outs[layers - 1]);
        let loss = softmax_cross_entropy(&mut self.delta, labels, classes);
        for i in (0..layers).rev() {
            let (din, dout) = dims(i);
            let input: &[f32] = if i == 0 { x } else { &self.outs[i - 1] };
            let delta = Mat::new(&self.delta, b, dout);
            if !matmul_unless(&mut grad[t[2 * i].range()], Mat::new(input, b, din).t(), delta, false, overtaken) {
                return None;
            }
            col_sums(&mut grad[t[2 * i + 1].range()], &self.delta);
            if i > 0 {
                self.next.resize(b * din, 0.0);
                let w = Mat::new(&params[t[2 * i].range()], din, dout).t();
                if !matmul_unless(&mut self.next, delta, w, false, overtaken) {
                    return None;
                }
                relu_backward(&mut self.next, input);
                std::mem::swap(&mut self.delta, &mut self.next);
            }
        }
        Some(loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelSpec;
    use std::cell::Cell;

    #[test]
    fn an_overtaken_gradient_stops_within_a_block_of_its_first_product_not_at_the_end_of_the_forward_pass() {
        let spec = ModelSpec::Mlp { hidden: vec![300, 200] };
        let layout = spec.layout((1, 4, 4), 3);
        let params = spec.init(&layout, 1);
        let (b, x, labels) = (8, vec![0.5f32; 8 * 16], vec![0u8, 1, 2, 0, 1, 2, 0, 1]);
        let batch = Labelled { x: &x, image: (1, 4, 4), labels: &labels };
        let mut grad = vec![0.0; layout.len()];
        let mut mlp = Mlp::default();
        // Told to stop at the first question: the first product's first block is all it did.
        let asks = Cell::new(0);
        let stop = || {
            asks.set(asks.get() + 1);
            true
        };
        assert_eq!(mlp.loss_and_gradient(&layout, &params, batch, &mut grad, &stop), None);
        assert_eq!(asks.get(), 1);
        assert!(mlp.outs[1].is_empty(), "the second layer was never started");
        // Asked after every block of 64 columns: forward 5 + 4 + 1, backward (1 + 4) + (4 + 5) + 5.
        asks.set(0);
        let never = || {
            asks.set(asks.get() + 1);
            false
        };
        let loss = mlp.loss_and_gradient(&layout, &params, batch, &mut grad, &never).expect("not overtaken");
        assert_eq!(asks.get(), 29);
        assert!(loss.is_finite());
        assert_eq!(mlp.logits(&layout, &params, &x, b).len(), b * 3);
    }
}
