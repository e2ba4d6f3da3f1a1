//! The element-wise and data-movement steps around the matrix products: bias, ReLU, the
//! softmax cross-entropy, 3×3 convolutions as matrices (im2col / col2im) and 2×2 max pooling.
//! Activations of the convolutional layers are stored channel-major, `[C, B, H, W]`, so one
//! product covers the whole batch.

/// Every row of the `rows × bias.len()` matrix `dst` set to `bias`.
pub(crate) fn fill_rows(dst: &mut [f32], bias: &[f32]) {
    for row in dst.chunks_exact_mut(bias.len()) {
        row.copy_from_slice(bias);
    }
}

/// Every row `r` of the `bias.len() × cols` matrix `dst` set to `bias[r]`.
pub(crate) fn fill_cols(dst: &mut [f32], bias: &[f32]) {
    let cols = dst.len() / bias.len();
    for (row, &b) in dst.chunks_exact_mut(cols).zip(bias) {
        row.fill(b);
    }
}

/// max(x, 0) in place.
pub(crate) fn relu(x: &mut [f32]) {
    for v in x {
        *v = v.max(0.0);
    }
}

/// Zeroes `grad` where the ReLU output `out` is not positive (the ReLU's derivative).
pub(crate) fn relu_backward(grad: &mut [f32], out: &[f32]) {
    for (g, &o) in grad.iter_mut().zip(out) {
        if o <= 0.0 {
            *g = 0.0;
        }
    }
}

/// Column sums of a `rows × dst.len()` matrix into `dst`.
pub(crate) fn col_sums(dst: &mut [f32], m: &[f32]) {
    dst.fill(0.0);
    for row in m.chunks_exact(dst.len()) {
        for (d, v) in dst.iter_mut().zip(row) {
            *d += v;
        }
    }
}

/// Row sums of a `dst.len() × cols` matrix into `dst`.
pub(crate) fn row_sums(dst: &mut [f32], m: &[f32]) {
    let cols = m.len() / dst.len();
    for (d, row) in dst.iter_mut().zip(m.chunks_exact(cols)) {
        *d = row.iter().sum();
    }
}

/// Mean softmax cross-entropy of `logits` (`labels.len() × classes`) against `labels`;
/// `logits` is overwritten with the loss's gradient, (softmax − one-hot) / batch.
pub(crate) fn softmax_cross_entropy(logits: &mut [f32], labels: &[u8], classes: usize) -> f32 {
    let b = labels.len();
    let mut loss = 0.0f64;
    for (row, &label) in logits.chunks_exact_mut(classes).zip(labels) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0f32;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let p_label = row[label as usize] / sum;
        loss -= f64::from(p_label.max(f32::MIN_POSITIVE).ln());
        for v in row.iter_mut() {
            *v /= sum * b as f32;
        }
        row[label as usize] -= 1.0 / b as f32;
    }
    (loss / b as f64) as f32
}

/// The shape of a channel-major activation, `[c, b, h, w]`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Shape {
    pub c: usize,
    pub b: usize,
    pub h: usize,
    pub w: usize,
}

impl Shape {
    /// Pixels of one channel over the batch.
    pub fn plane(&self) -> usize {
        self.b * self.h * self.w
    }

    /// Values in all.
    pub fn len(&self) -> usize {
        self.c * self.plane()
    }
}

/// The 3×3, padding-1 neighbourhoods of `x` as the columns of a `(c·9) × (b·h·w)` matrix:
/// row `ci·9 + ky·3 + kx`, column `n·h·w + y·w + x` holds `x[ci, n, y+ky−1, x+kx−1]` (0
/// outside the image). A convolution is then `weights[cout × c·9] · cols`.
pub(crate) fn im2col(cols: &mut Vec<f32>, x: &[f32], s: Shape) {
    let (h, w, plane) = (s.h, s.w, s.plane());
    // Every value is written below (padding as explicit zeros): no need to clear 10s of MB.
    cols.resize(s.c * 9 * plane, 0.0);
    for ci in 0..s.c {
        for ky in 0..3 {
            for kx in 0..3 {
                let row = &mut cols[((ci * 9) + ky * 3 + kx) * plane..][..plane];
                for n in 0..s.b {
                    let img = &x[(ci * s.b + n) * h * w..][..h * w];
                    for y in 0..h {
                        let dst = &mut row[(n * h + y) * w..][..w];
                        let sy = y + ky;
                        if sy < 1 || sy > h {
                            dst.fill(0.0); // padding above or below
                            continue;
                        }
                        let src = &img[(sy - 1) * w..][..w];
                        // dst[x] = src[x + kx - 1] where that is inside the row, else 0.
                        match kx {
                            0 => {
                                dst[0] = 0.0;
                                dst[1..].copy_from_slice(&src[..w - 1]);
                            }
                            1 => dst.copy_from_slice(src),
                            _ => {
                                dst[..w - 1].copy_from_slice(&src[1..]);
                                dst[w - 1] = 0.0;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The adjoint of [`im2col`]: sums each column entry back into the pixel it was read from.
pub(crate) fn col2im(dx: &mut Vec<f32>, cols: &[f32], s: Shape) {
    let (h, w, plane) = (s.h, s.w, s.plane());
    dx.resize(s.len(), 0.0);
    for ci in 0..s.c {
        // The centre tap reads every pixel exactly once: copy it first (no zeroing), then add
        // the other eight.
        for (ky, kx) in std::iter::once((1, 1)).chain((0..9).map(|t| (t / 3, t % 3)).filter(|&t| t != (1, 1))) {
            let row = &cols[((ci * 9) + ky * 3 + kx) * plane..][..plane];
            for n in 0..s.b {
                let img = &mut dx[(ci * s.b + n) * h * w..][..h * w];
                for y in 0..h {
                    let sy = y + ky;
                    if sy < 1 || sy > h {
                        continue;
                    }
                    let dst = &mut img[(sy - 1) * w..][..w];
                    let src = &row[(n * h + y) * w..][..w];
                    let (d, s) = match kx {
                        0 => (&mut dst[..w - 1], &src[1..]),
                        1 => (&mut dst[..], src),
                        _ => (&mut dst[1..], &src[..w - 1]),
                    };
                    if (ky, kx) == (1, 1) {
                        d.copy_from_slice(s);
                    } else {
                        for (d, s) in d.iter_mut().zip(s) {
                            *d += s;
                        }
                    }
                }
            }
        }
    }
}

/// 2×2, stride-2 max pooling of `x` (shape `s`, even sides) into `out`; `arg` keeps which of
/// the four won (0..4, row-major in the window; the first on ties) for the backward pass.
pub(crate) fn max_pool(out: &mut Vec<f32>, arg: &mut Vec<u8>, x: &[f32], s: Shape) {
    let (ho, wo) = (s.h / 2, s.w / 2);
    out.clear();
    arg.clear();
    out.reserve(s.c * s.b * ho * wo);
    arg.reserve(s.c * s.b * ho * wo);
    for img in x.chunks_exact(s.h * s.w) {
        for y in 0..ho {
            let (r0, r1) = (&img[2 * y * s.w..][..s.w], &img[(2 * y + 1) * s.w..][..s.w]);
            for xo in 0..wo {
                let v = [r0[2 * xo], r0[2 * xo + 1], r1[2 * xo], r1[2 * xo + 1]];
                let mut best = 0;
                for (i, &c) in v.iter().enumerate().skip(1) {
                    if c > v[best] {
                        best = i;
                    }
                }
                out.push(v[best]);
                arg.push(best as u8);
            }
        }
    }
}

/// The adjoint of [`max_pool`]: each pooled gradient goes to the input that won its window.
pub(crate) fn max_pool_backward(dx: &mut Vec<f32>, dout: &[f32], arg: &[u8], s: Shape) {
    let (ho, wo) = (s.h / 2, s.w / 2);
    // Every input is in exactly one window, and all four of each window are written.
    dx.resize(s.len(), 0.0);
    for ((img, g), a) in dx.chunks_exact_mut(s.h * s.w).zip(dout.chunks_exact(ho * wo)).zip(arg.chunks_exact(ho * wo)) {
        for y in 0..ho {
            for xo in 0..wo {
                let i = y * wo + xo;
                for q in 0..4u8 {
                    let at = (2 * y + (q / 2) as usize) * s.w + 2 * xo + (q % 2) as usize;
                    img[at] = if q == a[i] { g[i] } else { 0.0 };
                }
            }
        }
    }
}

/// `[n, c, hw]` (a batch of images, or rows of features) to `[c, n, hw]`, and back with the
/// two counts swapped: `dst[c][n] = src[n][c]`, blocks of `hw` values.
pub(crate) fn swap_outer(dst: &mut Vec<f32>, src: &[f32], n: usize, c: usize, hw: usize) {
    dst.clear();
    dst.resize(src.len(), 0.0);
    for i in 0..n {
        for j in 0..c {
            dst[(j * n + i) * hw..][..hw].copy_from_slice(&src[(i * c + j) * hw..][..hw]);
        }
    }
}
