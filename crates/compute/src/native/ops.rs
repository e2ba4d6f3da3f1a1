//! The element-wise and data-movement steps around the matrix products: bias, ReLU, the
//! softmax cross-entropy, 3×3 convolutions as matrices (im2col, and the kernels turned round
//! for the input's gradient) and 2×2 max pooling. Activations of the convolutional layers are
//! stored channel-major, `[C, B, H, W]`, so one product covers any run of image rows.

use std::ops::Range;

/// Every row of the `rows × bias.len()` matrix `dst` set to `bias`.
pub(crate) fn fill_rows(dst: &mut [f32], bias: &[f32]) {
    for row in dst.chunks_exact_mut(bias.len()) {
        row.copy_from_slice(bias);
    }
}

/// max(x, 0) in place.
#[multiversion::multiversion(targets = "simd")]
pub(crate) fn relu(x: &mut [f32]) {
    for v in x {
        *v = v.max(0.0);
    }
}

/// Zeroes `grad` where the ReLU output `out` is not positive (the ReLU's derivative).
#[multiversion::multiversion(targets = "simd")]
pub(crate) fn relu_backward(grad: &mut [f32], out: &[f32]) {
    for (g, &o) in grad.iter_mut().zip(out) {
        if o <= 0.0 {
            *g = 0.0;
        }
    }
}

/// Column sums of a `rows × dst.len()` matrix into `dst`.
#[multiversion::multiversion(targets = "simd")]
pub(crate) fn col_sums(dst: &mut [f32], m: &[f32]) {
    dst.fill(0.0);
    for row in m.chunks_exact(dst.len()) {
        for (d, v) in dst.iter_mut().zip(row) {
            *d += v;
        }
    }
}

/// Row sums of a `dst.len() × cols` matrix into `dst`.
#[multiversion::multiversion(targets = "simd")]
pub(crate) fn row_sums(dst: &mut [f32], m: &[f32]) {
    let cols = m.len() / dst.len();
    for (d, row) in dst.iter_mut().zip(m.chunks_exact(cols)) {
        // Sixteen partial sums, so the additions need not wait for each other (and vectorise).
        let mut lanes = [0.0f32; 16];
        let chunks = row.chunks_exact(16);
        let rest: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            for (l, v) in lanes.iter_mut().zip(c) {
                *l += v;
            }
        }
        *d = lanes.iter().sum::<f32>() + rest;
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

/// The 3×3, padding-1 neighbourhoods of the image rows `rows` of `x` as the columns of a
/// `(c·9) × (rows.len()·w)` matrix. Rows are counted over the batch (`n·h + y` is row `y` of
/// image `n`), so a run may start or end inside an image. Row `ci·9 + ky·3 + kx`, column
/// `(n·h + y − rows.start)·w + x` holds `x[ci, n, y+ky−1, x+kx−1]` (0 outside the image). A
/// convolution of those rows is then `weights[cout × c·9] · cols`.
#[multiversion::multiversion(targets = "simd")]
pub(crate) fn im2col(cols: &mut Vec<f32>, x: &[f32], s: Shape, rows: Range<usize>) {
    let (h, w) = (s.h, s.w);
    let width = rows.len() * w;
    // Every value is written below (padding as explicit zeros): no need to clear first.
    cols.resize(s.c * 9 * width, 0.0);
    if rows.is_empty() {
        return;
    }
    for ci in 0..s.c {
        let channel = &x[ci * s.plane()..][..s.plane()];
        for ky in 0..3 {
            for kx in 0..3 {
                let out = &mut cols[((ci * 9) + ky * 3 + kx) * width..][..width];
                for n in rows.start / h..=(rows.end - 1) / h {
                    // This image's rows in the run, and those of them whose tap reads inside
                    // the image (row y + ky − 1 exists); the others read padding.
                    let ys = rows.start.max(n * h) - n * h..rows.end.min((n + 1) * h) - n * h;
                    let inside = ys.start.max(1 - ky.min(1))..ys.end.min(h + 1 - ky.max(1));
                    let dst = &mut out[(n * h + ys.start - rows.start) * w..][..ys.len() * w];
                    if inside.is_empty() {
                        dst.fill(0.0);
                        continue;
                    }
                    dst[..(inside.start - ys.start) * w].fill(0.0);
                    dst[(inside.end - ys.start) * w..].fill(0.0);
                    // The rows inside the image are one run of memory in both: copy them at
                    // once, shifted by the tap's column, then clear the column that read the
                    // next (or previous) row instead of padding.
                    let band = inside.len() * w;
                    let src = &channel[(n * h + inside.start + ky - 1) * w..][..band];
                    let dst = &mut dst[(inside.start - ys.start) * w..][..band];
                    match kx {
                        0 => {
                            dst[1..].copy_from_slice(&src[..band - 1]);
                            dst.iter_mut().step_by(w).for_each(|v| *v = 0.0);
                        }
                        1 => dst.copy_from_slice(src),
                        _ => {
                            dst[..band - 1].copy_from_slice(&src[1..]);
                            dst.iter_mut().skip(w - 1).step_by(w).for_each(|v| *v = 0.0);
                        }
                    }
                }
            }
        }
    }
}

/// The weights of the convolution that carries a 3×3, padding-1 convolution's output gradient
/// back to its input: `[cout, c, 3, 3]` to `[c, cout, 3, 3]` with each kernel turned by 180°,
/// so that the input's gradient is `flipped · im2col(output gradient)`.
pub(crate) fn flip_kernels(dst: &mut Vec<f32>, weights: &[f32], cout: usize, c: usize) {
    dst.resize(weights.len(), 0.0);
    for co in 0..cout {
        for ci in 0..c {
            let from = &weights[(co * c + ci) * 9..][..9];
            let to = &mut dst[(ci * cout + co) * 9..][..9];
            for (t, v) in to.iter_mut().enumerate() {
                *v = from[8 - t];
            }
        }
    }
}

/// 2×2, stride-2 max pooling of `x` (shape `s`, even sides) into `out`; `arg` keeps which of
/// the four won (0..4, row-major in the window; the first on ties) for the backward pass.
#[multiversion::multiversion(targets = "simd")]
pub(crate) fn max_pool(out: &mut Vec<f32>, arg: &mut Vec<u8>, x: &[f32], s: Shape) {
    let (ho, wo) = (s.h / 2, s.w / 2);
    // Every value is written below.
    out.resize(s.c * s.b * ho * wo, 0.0);
    arg.resize(out.len(), 0);
    let pooled = out.chunks_exact_mut(ho * wo).zip(arg.chunks_exact_mut(ho * wo));
    for (img, (out, arg)) in x.chunks_exact(s.h * s.w).zip(pooled) {
        for y in 0..ho {
            let (r0, r1) = (&img[2 * y * s.w..][..s.w], &img[(2 * y + 1) * s.w..][..s.w]);
            let (out, arg) = (&mut out[y * wo..][..wo], &mut arg[y * wo..][..wo]);
            for xo in 0..wo {
                let v = [r0[2 * xo], r0[2 * xo + 1], r1[2 * xo], r1[2 * xo + 1]];
                let mut best = 0;
                for (i, &c) in v.iter().enumerate().skip(1) {
                    if c > v[best] {
                        best = i;
                    }
                }
                out[xo] = v[best];
                arg[xo] = best as u8;
            }
        }
    }
}

/// The adjoint of [`max_pool`] after a ReLU: each pooled gradient goes to the input that won
/// its window, unless the window's maximum `pooled` is 0 (the ReLU cut it off there).
#[multiversion::multiversion(targets = "simd")]
pub(crate) fn max_pool_relu_backward(dx: &mut Vec<f32>, dout: &[f32], pooled: &[f32], arg: &[u8], s: Shape) {
    let (ho, wo) = (s.h / 2, s.w / 2);
    // Every input is in exactly one window, and all four of each window are written.
    dx.resize(s.len(), 0.0);
    let windows = dout.chunks_exact(ho * wo).zip(pooled.chunks_exact(ho * wo)).zip(arg.chunks_exact(ho * wo));
    for (img, ((g, p), a)) in dx.chunks_exact_mut(s.h * s.w).zip(windows) {
        for y in 0..ho {
            let (top, bottom) = img[2 * y * s.w..][..2 * s.w].split_at_mut(s.w);
            for xo in 0..wo {
                let i = y * wo + xo;
                let v = if p[i] > 0.0 { g[i] } else { 0.0 };
                let q = a[i];
                top[2 * xo] = if q == 0 { v } else { 0.0 };
                top[2 * xo + 1] = if q == 1 { v } else { 0.0 };
                bottom[2 * xo] = if q == 2 { v } else { 0.0 };
                bottom[2 * xo + 1] = if q == 3 { v } else { 0.0 };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `x[ci, n, y, x]` of a channel-major activation, 0 outside the image.
    fn at(x: &[f32], s: Shape, ci: usize, n: usize, y: isize, xx: isize) -> f32 {
        if y < 0 || xx < 0 || y >= s.h as isize || xx >= s.w as isize {
            return 0.0;
        }
        x[((ci * s.b + n) * s.h + y as usize) * s.w + xx as usize]
    }

    #[test]
    fn im2col_of_any_run_of_rows_holds_each_taps_neighbour_or_zero_padding() {
        let s = Shape { c: 2, b: 3, h: 4, w: 5 };
        let x: Vec<f32> = (0..s.len()).map(|i| i as f32 + 1.0).collect();
        // Runs that start and end inside images, one row, whole images, the whole batch.
        for rows in [0..12, 2..9, 3..4, 4..8, 5..11, 11..12] {
            // Stale values where nothing would be written show up as NaN.
            let mut cols = vec![f32::NAN; s.c * 9 * s.b * s.h * s.w];
            im2col(&mut cols, &x, s, rows.clone());
            let width = rows.len() * s.w;
            assert_eq!(cols.len(), s.c * 9 * width);
            for ci in 0..s.c {
                for tap in 0..9 {
                    for (j, r) in rows.clone().enumerate() {
                        let (n, y) = (r / s.h, r % s.h);
                        for xx in 0..s.w {
                            let want =
                                at(&x, s, ci, n, y as isize + tap as isize / 3 - 1, xx as isize + tap as isize % 3 - 1);
                            let got = cols[(ci * 9 + tap) * width + j * s.w + xx];
                            assert_eq!(got, want, "rows {rows:?}: channel {ci}, tap {tap}, image {n}, ({y}, {xx})");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn turned_kernels_carry_the_output_gradient_back_as_the_convolutions_adjoint() {
        // <conv(x), g> = <x, conv_flipped(g)> for any x and g: the input's gradient is right.
        let (c, cout) = (2, 3);
        let s = Shape { c, b: 2, h: 4, w: 3 };
        let wave = |i: usize, f: f32| ((i as f32) * f).sin();
        let x: Vec<f32> = (0..s.len()).map(|i| wave(i, 0.7)).collect();
        let g: Vec<f32> = (0..cout * s.plane()).map(|i| wave(i, 1.3)).collect();
        let weights: Vec<f32> = (0..cout * c * 9).map(|i| wave(i, 2.1)).collect();
        let rows = 0..s.b * s.h;
        let (mut cols, mut flipped) = (Vec::new(), Vec::new());
        im2col(&mut cols, &x, s, rows.clone());
        let conv = |w: &[f32], cols: &[f32], m: usize, k: usize| -> Vec<f32> {
            let n = cols.len() / k;
            (0..m * n).map(|i| (0..k).map(|p| w[(i / n) * k + p] * cols[p * n + i % n]).sum()).collect()
        };
        let y = conv(&weights, &cols, cout, c * 9);
        flip_kernels(&mut flipped, &weights, cout, c);
        im2col(&mut cols, &g, Shape { c: cout, ..s }, rows);
        let dx = conv(&flipped, &cols, c, cout * 9);
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| f64::from(a * b)).sum::<f64>();
        let (lhs, rhs) = (dot(&y, &g), dot(&x, &dx));
        assert!((lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0), "<conv x, g> = {lhs} but <x, back g> = {rhs}");
    }

    #[test]
    fn row_sums_add_every_value_of_each_row() {
        let m: Vec<f32> = (0..3 * 37).map(|i| i as f32).collect();
        let mut d = vec![0.0; 3];
        row_sums(&mut d, &m);
        assert_eq!(d, [(0..37).sum::<i32>() as f32, (37..74).sum::<i32>() as f32, (74..111).sum::<i32>() as f32]);
    }
}
