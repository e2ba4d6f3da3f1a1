//! The paper's MNIST CNN by hand: four 3×3 convolutions (padding 1, ReLU; 2×2 max pooling
//! after the second and the fourth) and a linear layer. Each convolution is one matrix
//! product over the whole batch (im2col); its backward pass two more (weights, input).

use super::gemm::{matmul, Mat};
use super::ops::{
    col2im, col_sums, fill_cols, fill_rows, im2col, max_pool, max_pool_backward, relu, relu_backward, row_sums,
    softmax_cross_entropy, swap_outer, Shape,
};
use quorum_core::ParamLayout;

/// One convolution's saved forward state.
#[derive(Clone, Default)]
struct Conv {
    cols: Vec<f32>,
    out: Vec<f32>,
    pooled: Vec<f32>,
    arg: Vec<u8>,
}

/// Scratch buffers, kept between steps so a step allocates nothing once warm.
#[derive(Clone, Default)]
pub(crate) struct Cnn {
    input: Vec<f32>,
    convs: [Conv; 4],
    flat: Vec<f32>,
    logits: Vec<f32>,
    d: Vec<f32>,
    d2: Vec<f32>,
}

impl Cnn {
    /// The logits of the batch `x` (`[b, c, h, w]`), `b × classes`.
    pub fn logits(
        &mut self,
        layout: &ParamLayout,
        params: &[f32],
        x: &[f32],
        image: (usize, usize, usize),
        b: usize,
    ) -> &[f32] {
        self.forward(layout, params, x, image, b);
        &self.logits
    }

    /// The convolutions' saved state, the flattened features and the logits; returns each
    /// convolution's input shape and the last pooled shape.
    fn forward(
        &mut self,
        layout: &ParamLayout,
        params: &[f32],
        x: &[f32],
        (c, h, w): (usize, usize, usize),
        b: usize,
    ) -> ([Shape; 4], Shape) {
        let t = layout.tensors();
        // Channel-major input, [c, b, h, w].
        swap_outer(&mut self.input, x, b, c, h * w);
        let mut shapes = [Shape { c, b, h, w }; 4];
        let mut s = shapes[0];
        for i in 0..4 {
            shapes[i] = s;
            let cout = t[2 * i].shape[0];
            let (done, rest) = self.convs.split_at_mut(i);
            let input: &[f32] = if i == 0 {
                &self.input
            } else if i % 2 == 0 {
                &done[i - 1].pooled
            } else {
                &done[i - 1].out
            };
            let conv = &mut rest[0];
            im2col(&mut conv.cols, input, s);
            conv.out.resize(cout * s.plane(), 0.0);
            fill_cols(&mut conv.out, &params[t[2 * i + 1].range()]);
            let weights = Mat::new(&params[t[2 * i].range()], cout, s.c * 9);
            matmul(&mut conv.out, weights, Mat::new(&conv.cols, s.c * 9, s.plane()), true);
            relu(&mut conv.out);
            s.c = cout;
            if i % 2 == 1 {
                max_pool(&mut conv.pooled, &mut conv.arg, &conv.out, s);
                (s.h, s.w) = (s.h / 2, s.w / 2);
            }
        }
        // Features per example in (channel, y, x) order, as the layout's fc.weight reads them.
        let (features, classes) = (t[8].shape[0], t[8].shape[1]);
        swap_outer(&mut self.flat, &self.convs[3].pooled, s.c, b, s.h * s.w);
        self.logits.resize(b * classes, 0.0);
        fill_rows(&mut self.logits, &params[t[9].range()]);
        let fc = Mat::new(&params[t[8].range()], features, classes);
        matmul(&mut self.logits, Mat::new(&self.flat, b, features), fc, true);
        (shapes, s)
    }

    /// Mean loss over the batch `x` (`[b, c, h, w]`, `b = labels.len()`), with the gradient
    /// written into `grad` (layout order).
    pub fn loss_and_gradient(
        &mut self,
        layout: &ParamLayout,
        params: &[f32],
        x: &[f32],
        image: (usize, usize, usize),
        labels: &[u8],
        grad: &mut [f32],
    ) -> f32 {
        let b = labels.len();
        let (shapes, s) = self.forward(layout, params, x, image, b);
        let t = layout.tensors();
        let (features, classes) = (t[8].shape[0], t[8].shape[1]);
        let fc = Mat::new(&params[t[8].range()], features, classes);
        let loss = softmax_cross_entropy(&mut self.logits, labels, classes);
        let dlogits = Mat::new(&self.logits, b, classes);
        matmul(&mut grad[t[8].range()], Mat::new(&self.flat, b, features).t(), dlogits, false);
        col_sums(&mut grad[t[9].range()], &self.logits);
        self.d2.resize(b * features, 0.0);
        matmul(&mut self.d2, dlogits, fc.t(), false);
        // Back to channel-major: the gradient of the last pooled activation.
        swap_outer(&mut self.d, &self.d2, b, s.c, s.h * s.w);
        for i in (0..4).rev() {
            let s = shapes[i];
            let cout = t[2 * i].shape[0];
            let out_shape = Shape { c: cout, ..s };
            let conv = &self.convs[i];
            if i % 2 == 1 {
                std::mem::swap(&mut self.d, &mut self.d2);
                max_pool_backward(&mut self.d, &self.d2, &conv.arg, out_shape);
            }
            relu_backward(&mut self.d, &conv.out);
            row_sums(&mut grad[t[2 * i + 1].range()], &self.d);
            let dout = Mat::new(&self.d, cout, s.plane());
            matmul(&mut grad[t[2 * i].range()], dout, Mat::new(&conv.cols, s.c * 9, s.plane()).t(), false);
            if i > 0 {
                let weights = Mat::new(&params[t[2 * i].range()], cout, s.c * 9);
                // The columns' gradient, reusing this layer's column buffer's size in d2.
                self.d2.resize(s.c * 9 * s.plane(), 0.0);
                matmul(&mut self.d2, weights.t(), dout, false);
                let dcols = std::mem::take(&mut self.d2);
                col2im(&mut self.d, &dcols, s);
                self.d2 = dcols;
            }
        }
        loss
    }
}
