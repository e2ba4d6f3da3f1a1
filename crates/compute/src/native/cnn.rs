//! The paper's MNIST CNN by hand: four 3×3 convolutions (padding 1, ReLU; 2×2 max pooling
//! after the second and the fourth) and a linear layer. A convolution over images of even
//! height and width with enough input channels goes by Winograd's F(2×2, 3×3)
//! ([`super::winograd`]: 2.25× fewer multiplications, bias and ReLU applied as its outputs
//! are stored); otherwise (the first layer's one channel) it is a matrix product (im2col) per
//! run of image rows small enough that its column matrix stays in the core's cache. The
//! backward pass builds im2col columns for the weights' gradient, and gets the input's
//! gradient as a convolution too: of the output's gradient, by the kernels turned round (no
//! col2im, so a run may be any rows), by Winograd where it fits.

use super::gemm::{matmul, matmul_block, Mat};
use super::ops::{
    col_sums, fill_rows, flip_kernels, im2col, max_pool, max_pool_relu_backward, relu, relu_backward, row_sums,
    softmax_cross_entropy, swap_outer, Shape,
};
use super::winograd::{self, Finish, Winograd};
use super::Labelled;
use quorum_core::ParamLayout;
use std::ops::Range;

/// The most bytes of column matrix one run of rows builds: inside a core's L2 cache, so the
/// products read their widest operand from cache, not memory. (Measured on this project's
/// 2-core machines, 1.25 MB of L2 a core: 256 KB–1 MB all within noise of each other; a whole
/// batch at once, as before, 1.3–1.5× slower.)
const RUN_BYTES: usize = 512 << 10;

/// The most bytes of transformed input and products one Winograd run holds. Each run makes
/// 16 products, so runs are larger than im2col's: measured on a 2 MB-L2 core, 64 KB runs
/// 2× slower, 256 KB 1.1×, 512 KB–2 MB within 3% of each other.
const WINOGRAD_RUN_BYTES: usize = 1 << 20;

/// Fewest input channels a convolution takes by Winograd: below, its products are too thin
/// (one channel: `1 × T` by `cout × 1`) for the transforms to pay.
const WINOGRAD_MIN_CHANNELS: usize = 8;

/// Whether a convolution of `s` (its input) goes by Winograd.
fn by_winograd(s: Shape, enabled: bool) -> bool {
    enabled && s.c >= WINOGRAD_MIN_CHANNELS && winograd::fits(s)
}

/// One convolution's saved forward state.
#[derive(Clone, Default)]
struct Conv {
    out: Vec<f32>,
    pooled: Vec<f32>,
    arg: Vec<u8>,
}

/// Scratch buffers, kept between steps so a step allocates nothing once warm.
#[derive(Clone)]
pub(crate) struct Cnn {
    input: Vec<f32>,
    convs: [Conv; 4],
    /// One run's column matrix (of an input, or of an output's gradient).
    cols: Vec<f32>,
    /// The kernels turned round, for the input's gradient.
    flipped: Vec<f32>,
    flat: Vec<f32>,
    logits: Vec<f32>,
    d: Vec<f32>,
    d2: Vec<f32>,
    wg: Winograd,
    run_bytes: usize,
    winograd_run_bytes: usize,
    /// Winograd where it fits (tests turn it off to compare with im2col everywhere).
    winograd: bool,
}

impl Default for Cnn {
    fn default() -> Self {
        Cnn {
            input: Vec::new(),
            convs: Default::default(),
            cols: Vec::new(),
            flipped: Vec::new(),
            flat: Vec::new(),
            logits: Vec::new(),
            d: Vec::new(),
            d2: Vec::new(),
            wg: Winograd::default(),
            run_bytes: RUN_BYTES,
            winograd_run_bytes: WINOGRAD_RUN_BYTES,
            winograd: true,
        }
    }
}

/// The batch's image rows (`rows` of them) in runs whose column matrices (`per_row` values a
/// row) fit `bytes`.
fn runs(rows: usize, per_row: usize, bytes: usize) -> impl Iterator<Item = Range<usize>> {
    let k = (bytes / (4 * per_row)).max(1);
    (0..rows).step_by(k).map(move |r| r..(r + k).min(rows))
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
        self.forward(layout, params, x, image, b, &|| false);
        &self.logits
    }

    /// The convolutions' saved state, the flattened features and the logits; returns each
    /// convolution's input shape and the last pooled shape, or `None` if `overtaken()`,
    /// asked after each run of each convolution (im2col or Winograd), said stop.
    fn forward(
        &mut self,
        layout: &ParamLayout,
        params: &[f32],
        x: &[f32],
        (c, h, w): (usize, usize, usize),
        b: usize,
        overtaken: &dyn Fn() -> bool,
    ) -> Option<([Shape; 4], Shape)> {
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
            let plane = s.plane();
            let bias = &params[t[2 * i + 1].range()];
            conv.out.resize(cout * plane, 0.0);
            let by_wg = by_winograd(s, self.winograd);
            if by_wg {
                self.wg.set_kernels(&params[t[2 * i].range()], cout, s.c);
                let finish = Finish::BiasRelu(bias);
                if !self.wg.convolve(&mut conv.out, input, (s, cout), finish, self.winograd_run_bytes, overtaken) {
                    return None;
                }
            }
            // Otherwise by im2col, run by run.
            let weights = Mat::new(&params[t[2 * i].range()], cout, s.c * 9);
            for run in runs(b * s.h, s.c * 9 * s.w, self.run_bytes).filter(|_| !by_wg) {
                let width = run.len() * s.w;
                im2col(&mut self.cols, input, s, run.clone());
                let out = &mut conv.out[run.start * s.w..];
                for (row, &bias) in out.chunks_mut(plane).zip(bias) {
                    row[..width].fill(bias);
                }
                matmul_block(out, plane, weights, Mat::new(&self.cols, s.c * 9, width), true);
                for row in out.chunks_mut(plane) {
                    relu(&mut row[..width]);
                }
                if overtaken() {
                    return None;
                }
            }
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
        Some((shapes, s))
    }

    /// Mean loss over `batch` (`[b, c, h, w]`), with the gradient written into `grad` (layout
    /// order); `None` if `overtaken()` says stop, asked after each run of every convolution's
    /// passes (forward, the kernels' gradient, the input's gradient), so that an overtaken
    /// gradient stops within a convolution, not at its end.
    pub fn loss_and_gradient(
        &mut self,
        layout: &ParamLayout,
        params: &[f32],
        batch: Labelled<'_>,
        grad: &mut [f32],
        overtaken: &dyn Fn() -> bool,
    ) -> Option<f32> {
        let Labelled { x, image, labels } = batch;
        let b = labels.len();
        let (shapes, s) = self.forward(layout, params, x, image, b, overtaken)?;
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
                // Pooling's and the ReLU's backward passes in one.
                std::mem::swap(&mut self.d, &mut self.d2);
                max_pool_relu_backward(&mut self.d, &self.d2, &conv.pooled, &conv.arg, out_shape);
            } else {
                relu_backward(&mut self.d, &conv.out);
            }
            row_sums(&mut grad[t[2 * i + 1].range()], &self.d);
            let input: &[f32] = match i {
                0 => &self.input,
                _ if i % 2 == 0 => &self.convs[i - 1].pooled,
                _ => &self.convs[i - 1].out,
            };
            let plane = s.plane();
            let weights = &params[t[2 * i].range()];
            for run in runs(b * s.h, s.c * 9 * s.w, self.run_bytes) {
                let width = run.len() * s.w;
                im2col(&mut self.cols, input, s, run.clone());
                let dout = Mat::block(&self.d[run.start * s.w..], cout, width, plane);
                let cols = Mat::new(&self.cols, s.c * 9, width);
                matmul(&mut grad[t[2 * i].range()], dout, cols.t(), run.start > 0);
                if overtaken() {
                    return None;
                }
            }
            if i > 0 {
                // The input's gradient, into d2: the output's gradient convolved with the
                // kernels turned round, run by run.
                flip_kernels(&mut self.flipped, weights, cout, s.c);
                self.d2.resize(s.len(), 0.0);
                let by_wg = by_winograd(out_shape, self.winograd);
                if by_wg {
                    self.wg.set_kernels(&self.flipped, s.c, cout);
                    let run_bytes = self.winograd_run_bytes;
                    if !self.wg.convolve(&mut self.d2, &self.d, (out_shape, s.c), Finish::Plain, run_bytes, overtaken) {
                        return None;
                    }
                }
                let flipped = Mat::new(&self.flipped, s.c, cout * 9);
                for run in runs(b * s.h, cout * 9 * s.w, self.run_bytes).filter(|_| !by_wg) {
                    let width = run.len() * s.w;
                    im2col(&mut self.cols, &self.d, out_shape, run.clone());
                    let dx = &mut self.d2[run.start * s.w..];
                    matmul_block(dx, plane, flipped, Mat::new(&self.cols, cout * 9, width), false);
                    if overtaken() {
                        return None;
                    }
                }
                std::mem::swap(&mut self.d, &mut self.d2);
            }
        }
        Some(loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelSpec;

    /// The loss and gradient of `spec` (8×8 one-channel images, 5 classes) on a batch of
    /// three, computed by `cnn`.
    fn batch_gradient(spec: ModelSpec, mut cnn: Cnn) -> (f32, Vec<f32>) {
        let (b, image) = (3, (1, 8, 8));
        let layout = spec.layout(image, 5);
        let params = spec.init(&layout, 7);
        let x: Vec<f32> = (0..b * 64).map(|i| ((i * 37) % 11) as f32 / 11.0 - 0.4).collect();
        let mut grad = vec![f32::NAN; layout.len()];
        let batch = Labelled { x: &x, image, labels: &[0, 3, 4] };
        let loss = cnn.loss_and_gradient(&layout, &params, batch, &mut grad, &|| false).expect("never overtaken");
        (loss, grad)
    }

    #[test]
    fn the_gradient_is_the_same_whether_the_batch_goes_in_one_run_or_row_by_row() {
        let spec = ModelSpec::Cnn { channels: [4, 4, 8, 8] };
        let gradient = |run_bytes: usize| batch_gradient(spec.clone(), Cnn { run_bytes, ..Cnn::default() });
        let (whole_loss, whole) = gradient(usize::MAX / 8);
        // One row of one image a run: every run boundary falls inside an image.
        let (rows_loss, rows) = gradient(1);
        assert!((whole_loss - rows_loss).abs() < 1e-6);
        for (i, (a, r)) in whole.iter().zip(&rows).enumerate() {
            assert!((a - r).abs() <= 1e-5 * (1.0 + a.abs()), "gradient [{i}]: {a} in one run, {r} row by row");
        }
        assert!(whole.iter().any(|g| *g != 0.0));
    }

    #[test]
    fn an_overtaken_gradient_stops_within_the_first_convolution_by_im2col_or_winograd() {
        // One tile row (Winograd) or image row (im2col) a run: many runs in every convolution.
        let spec = ModelSpec::Cnn { channels: [8, 8, 16, 16] };
        let (b, image) = (3, (8, 8, 8));
        let layout = spec.layout(image, 5);
        let params = spec.init(&layout, 7);
        let x: Vec<f32> = (0..b * 512).map(|i| ((i * 37) % 11) as f32 / 11.0 - 0.4).collect();
        let batch = Labelled { x: &x, image, labels: &[0, 3, 4] };
        let mut grad = vec![f32::NAN; layout.len()];
        // Eight input channels: the first convolution is by Winograd where it is on.
        assert!(by_winograd(Shape { c: 8, b, h: 8, w: 8 }, true));
        for winograd in [true, false] {
            let mut cnn = Cnn { winograd, run_bytes: 1, winograd_run_bytes: 1, ..Cnn::default() };
            let asks = std::cell::Cell::new(0);
            let count = || {
                asks.set(asks.get() + 1);
                false
            };
            let whole = cnn.loss_and_gradient(&layout, &params, batch, &mut grad, &count);
            assert!(whole.is_some(), "never overtaken");
            // A question after every run: by im2col a run is an image row (3 x 8 in each pass
            // of the first two convolutions, 3 x 4 after pooling): 72 forward, 72 for the
            // kernels' gradients, 48 for the inputs' (none for the first convolution's). By
            // Winograd a run is a tile row (half as many) for the forward passes and the
            // inputs' gradients, the kernels' gradients by im2col as before: 36 + 72 + 24.
            let runs = if winograd { 36 + 72 + 24 } else { 72 + 72 + 48 };
            assert_eq!(asks.replace(0), runs, "winograd {winograd}");
            // So the second question comes within the first convolution's forward pass. Stopped
            // at any question, it asks no more, and the next gradient is whole.
            let expected: Vec<u32> = grad.iter().map(|g| g.to_bits()).collect();
            for stop_at in 1..=runs {
                asks.set(0);
                let at = || {
                    asks.set(asks.get() + 1);
                    asks.get() >= stop_at
                };
                assert!(cnn.loss_and_gradient(&layout, &params, batch, &mut grad, &at).is_none());
                assert_eq!(asks.get(), stop_at, "winograd {winograd}: asked on after the stop");
                let again = cnn.loss_and_gradient(&layout, &params, batch, &mut grad, &|| false);
                assert_eq!(again.map(f32::to_bits), whole.map(f32::to_bits), "winograd {winograd}, stop {stop_at}");
                assert!(grad.iter().map(|g| g.to_bits()).eq(expected.iter().copied()), "stop {stop_at}: the same bits");
            }
        }
    }

    #[test]
    fn the_gradient_by_winograd_is_the_gradient_by_im2col() {
        let spec = ModelSpec::Cnn { channels: [8, 8, 16, 16] };
        let gradient = |winograd: bool| {
            let cnn = Cnn { winograd, run_bytes: 4 << 10, winograd_run_bytes: 4 << 10, ..Cnn::default() };
            batch_gradient(spec.clone(), cnn)
        };
        // Layers 2 to 4 have 8 or more input channels: by Winograd (forward and the input's
        // gradient); the first (one channel) by im2col either way.
        assert!(
            by_winograd(Shape { c: 8, b: 3, h: 8, w: 8 }, true) && !by_winograd(Shape { c: 1, b: 3, h: 8, w: 8 }, true)
        );
        let ((wl, wg), (il, ig)) = (gradient(true), gradient(false));
        assert!((wl - il).abs() < 1e-5, "loss {wl} by Winograd, {il} by im2col");
        for (i, (a, r)) in wg.iter().zip(&ig).enumerate() {
            assert!((a - r).abs() <= 1e-4 * (1.0 + r.abs()), "gradient [{i}]: {a} by Winograd, {r} by im2col");
        }
        assert!(wg.iter().any(|g| *g != 0.0));
    }
}
