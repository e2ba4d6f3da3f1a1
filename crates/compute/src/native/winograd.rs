//! 3×3 convolutions (padding 1, stride 1) by Winograd's minimal filtering F(2×2, 3×3)
//! (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): each 2×2
//! block of outputs ("tile") takes 16 multiplications per input channel instead of 36. The
//! input's 4×4 neighbourhood of every tile and every 3×3 kernel are transformed once
//! (additions only), the 16 transformed positions ξ are 16 matrix products
//! `M_ξ = U_ξ · V_ξ` (`cout × cin` by `cin × tiles`), and each tile's 2×2 outputs come back
//! from its 16 values by additions. Products take 2.25× fewer operations than im2col's, and
//! no column matrix is built: the transformed input is 16/9 of im2col's per tile of four
//! outputs, i.e. 4/9 of its size.
//!
//! Activations are channel-major, `[C, B, H, W]` ([`Shape`]), with `H` and `W` even; tiles
//! are counted over the batch in rows (`n·H/2 + ty`), so runs of tile rows, like im2col's
//! runs of image rows, keep each run's matrices inside the core's cache.

use super::gemm::{matmul_block, Mat};
use super::ops::Shape;
use std::ops::Range;

/// Transformed positions per tile.
const XI: usize = 16;

/// Whether a convolution over `s` can go by this route (even height and width).
pub(crate) fn fits(s: Shape) -> bool {
    s.h.is_multiple_of(2) && s.w.is_multiple_of(2) && s.h > 0 && s.w > 0
}

/// Scratch buffers, kept between calls.
#[derive(Clone, Default)]
pub(crate) struct Winograd {
    /// The kernels transformed: `U[ξ][cout][cin]`.
    u: Vec<f32>,
    /// One run's input transformed: `V[cin][ξ][tile]` (so one channel's 16 rows are one
    /// block; each product reads its `V_ξ` as rows `16·tiles` apart).
    v: Vec<f32>,
    /// One run's products: `M[cout][ξ][tile]`.
    m: Vec<f32>,
    /// The run's input rows split and combined (input transform), or its outputs before
    /// they are interleaved (output transform).
    rows: Vec<f32>,
}

/// What to do with each output before it is stored.
#[derive(Clone, Copy)]
pub(crate) enum Finish<'a> {
    /// Store as is.
    Plain,
    /// Add the channel's bias, then max(·, 0).
    BiasRelu(&'a [f32]),
}

impl Winograd {
    /// Transforms `weights` (`cout × cin × 3 × 3`) for the convolutions that follow:
    /// `U = G g Gᵀ` for every kernel `g`.
    pub fn set_kernels(&mut self, weights: &[f32], cout: usize, cin: usize) {
        self.u.resize(XI * cout * cin, 0.0);
        for co in 0..cout {
            for ci in 0..cin {
                let g = &weights[(co * cin + ci) * 9..][..9];
                // G g: 4 × 3, G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]].
                let mut gg = [[0.0f32; 3]; 4];
                for c in 0..3 {
                    let (a, b, d) = (g[c], g[3 + c], g[6 + c]);
                    gg[0][c] = a;
                    gg[1][c] = 0.5 * (a + b + d);
                    gg[2][c] = 0.5 * (a - b + d);
                    gg[3][c] = d;
                }
                // (G g) Gᵀ: 4 × 4.
                for (i, r) in gg.iter().enumerate() {
                    let t = [r[0], 0.5 * (r[0] + r[1] + r[2]), 0.5 * (r[0] - r[1] + r[2]), r[2]];
                    for (j, v) in t.into_iter().enumerate() {
                        self.u[((i * 4 + j) * cout + co) * cin + ci] = v;
                    }
                }
            }
        }
    }

    /// `out` (`cout × B·H·W`) = the convolution of `x` (shape `s`, `cin = s.c`) by the kernels
    /// of the last [`Winograd::set_kernels`], finished by `finish`, over runs of at most
    /// `run_bytes` of transformed input and products, asking `overtaken()` after each run:
    /// `false` as soon as it says stop (`out` then partly written), else `true`.
    pub fn convolve(
        &mut self,
        out: &mut [f32],
        x: &[f32],
        (s, cout): (Shape, usize),
        finish: Finish,
        run_bytes: usize,
        overtaken: &dyn Fn() -> bool,
    ) -> bool {
        assert!(fits(s), "Winograd F(2x2, 3x3) needs an even height and width, not {}x{}", s.h, s.w);
        let cin = s.c;
        assert_eq!(self.u.len(), XI * cout * cin, "kernels set for another shape");
        let (th, tw) = (s.h / 2, s.w / 2);
        let tile_rows = s.b * th;
        let per_row = XI * (cin + cout) * (tw + 1) * 4;
        let k = (run_bytes / per_row).max(1);
        for start in (0..tile_rows).step_by(k) {
            let run = start..(start + k).min(tile_rows);
            // Tiles are counted with one more a row (see `transform_input`).
            let tiles = run.len() * (tw + 1);
            self.transform_input(x, s, run.clone());
            self.m.resize(XI * cout * tiles, 0.0);
            for xi in 0..XI {
                let u = Mat::new(&self.u[xi * cout * cin..][..cout * cin], cout, cin);
                let v = Mat::block(&self.v[xi * tiles..], cin, tiles, XI * tiles);
                matmul_block(&mut self.m[xi * tiles..], XI * tiles, u, v, false);
            }
            self.transform_output(out, s, cout, run, finish);
            if overtaken() {
                return false;
            }
        }
        true
    }

    /// `V[ci][ξ][t] = (Bᵀ d B)[ξ]` for the 4×4 neighbourhood `d` of every tile `t` of the
    /// tile rows `run`, `Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]]`.
    ///
    /// Every input row is split into its even and odd padded columns (padded column `c` is
    /// input column `c − 1`, zero at both ends; `W/2 + 1` of each), the run's rows end to end,
    /// so every loop below runs over the whole run at once and vectorises. Tile `tx` of a row
    /// reads even `tx`, odd `tx`, even `tx + 1` and odd `tx + 1`; a row's last even and odd
    /// column then give one more "tile" that reads into the next row: tiles are counted
    /// `W/2 + 1` a row, the last of each unused (its products are computed and skipped).
    fn transform_input(&mut self, x: &[f32], s: Shape, run: Range<usize>) {
        let (h, w) = (s.h, s.w);
        let tiles = run.len() * (w / 2 + 1);
        let len = tiles + 1;
        self.v.resize(XI * s.c * tiles, 0.0);
        self.rows.resize(16 * len, 0.0);
        let (split, comb) = self.rows.split_at_mut(8 * len);
        for ci in 0..s.c {
            let channel = &x[ci * s.plane()..][..s.plane()];
            let block = &mut self.v[ci * XI * tiles..][..XI * tiles];
            input_channel(channel, (h, w), run.clone(), split, comb, block);
        }
    }

    /// Each tile's 2×2 outputs `Aᵀ m A` from its 16 products, `Aᵀ = [[1, 1, 1, 0], [0, 1,
    /// −1, −1]]`, finished and stored into `out`: computed for the whole run at once, then
    /// interleaved into the image rows.
    fn transform_output(&mut self, out: &mut [f32], s: Shape, cout: usize, run: Range<usize>, finish: Finish) {
        let (h, w) = (s.h, s.w);
        let tiles = run.len() * (w / 2 + 1);
        let plane = s.plane();
        // Top left, top right, bottom left, bottom right of every tile.
        if self.rows.len() < 4 * tiles {
            self.rows.resize(4 * tiles, 0.0);
        }
        for co in 0..cout {
            let (bias, relu) = match finish {
                Finish::Plain => (0.0, false),
                Finish::BiasRelu(b) => (b[co], true),
            };
            let block = &self.m[co * XI * tiles..][..XI * tiles];
            let channel = &mut out[co * plane..][..plane];
            output_channel(block, (bias, relu), (h, w), run.clone(), &mut self.rows[..4 * tiles], channel);
        }
    }
}

/// One channel's part of [`Winograd::transform_input`]: its input rows split into even and
/// odd padded columns (`split`, 4 rows × 2 parts), combined down (`comb`) and along the rows
/// into `block` (`V[ξ][t]` of this channel). Compiled for the CPU's widest vectors.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma+avx", "x86_64+avx2+fma+avx"))]
fn input_channel(
    channel: &[f32],
    (h, w): (usize, usize),
    run: Range<usize>,
    split: &mut [f32],
    comb: &mut [f32],
    block: &mut [f32],
) {
    let (th, tw) = (h / 2, w / 2);
    let half = tw + 1;
    let tiles = run.len() * half;
    let len = tiles + 1;
    for (i, eo) in split.chunks_exact_mut(2 * len).enumerate() {
        let (e, o) = eo.split_at_mut(len);
        for (j, tr) in run.clone().enumerate() {
            let (n, ty) = (tr / th, tr % th);
            let (e, o) = (&mut e[j * half..][..half], &mut o[j * half..][..half]);
            let y = (2 * ty + i).wrapping_sub(1);
            if y < h {
                let row = &channel[(n * h + y) * w..][..w];
                e[0] = 0.0;
                o[tw] = 0.0;
                let (pairs, _) = row.as_chunks::<2>();
                for ((od, ev), p) in o[..tw].iter_mut().zip(&mut e[1..=tw]).zip(pairs) {
                    *od = p[0];
                    *ev = p[1];
                }
            } else {
                e.fill(0.0);
                o.fill(0.0);
            }
        }
        e[tiles] = 0.0;
        o[tiles] = 0.0;
    }
    // Bᵀ d down the columns: combination k of the four rows, even and odd parts.
    let row = |i: usize| &split[i * 2 * len..][..2 * len];
    let (d0, d1, d2, d3) = (row(0), row(1), row(2), row(3));
    let (r0, rest) = comb[..8 * len].split_at_mut(2 * len);
    let (r1, rest) = rest.split_at_mut(2 * len);
    let (r2, r3) = rest.split_at_mut(2 * len);
    for c in 0..2 * len {
        r0[c] = d0[c] - d2[c];
        r1[c] = d1[c] + d2[c];
        r2[c] = d2[c] - d1[c];
        r3[c] = d1[c] - d3[c];
    }
    // (Bᵀ d) B along the rows.
    for (k, rk) in [&*r0, &*r1, &*r2, &*r3].into_iter().enumerate() {
        let (e, o) = rk.split_at(len);
        let rows = &mut block[k * 4 * tiles..][..4 * tiles];
        let (v0, rest) = rows.split_at_mut(tiles);
        let (v1, rest) = rest.split_at_mut(tiles);
        let (v2, v3) = rest.split_at_mut(tiles);
        let (e0, e1, o0, o1) = (&e[..tiles], &e[1..=tiles], &o[..tiles], &o[1..=tiles]);
        for t in 0..tiles {
            v0[t] = e0[t] - e1[t];
            v1[t] = o0[t] + e1[t];
            v2[t] = e1[t] - o0[t];
            v3[t] = o0[t] - o1[t];
        }
    }
}

/// One output channel's part of [`Winograd::transform_output`]: its 2×2 outputs of every
/// tile of the run from `block` (`M[ξ][t]` of this channel) into `ys` (4 × tiles), plus
/// `bias` and max(·, 0) if `relu`, then interleaved into the image rows of `channel`.
/// Compiled for the CPU's widest vectors.
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma+avx", "x86_64+avx2+fma+avx"))]
fn output_channel(
    block: &[f32],
    (bias, relu): (f32, bool),
    (h, w): (usize, usize),
    run: Range<usize>,
    ys: &mut [f32],
    channel: &mut [f32],
) {
    let (th, tw) = (h / 2, w / 2);
    let half = tw + 1;
    let tiles = run.len() * half;
    let m = |xi: usize| &block[xi * tiles..][..tiles];
    let (m0, m1, m2, m3) = (m(0), m(1), m(2), m(3));
    let (m4, m5, m6, m7) = (m(4), m(5), m(6), m(7));
    let (m8, m9, m10, m11) = (m(8), m(9), m(10), m(11));
    let (m12, m13, m14, m15) = (m(12), m(13), m(14), m(15));
    let (y0, rest) = ys.split_at_mut(tiles);
    let (y1, rest) = rest.split_at_mut(tiles);
    let (y2, y3) = rest.split_at_mut(tiles);
    for t in 0..tiles {
        // Aᵀ m: two rows of four (row k of m is m[4k..4k + 4]).
        let a00 = m0[t] + m4[t] + m8[t];
        let a01 = m1[t] + m5[t] + m9[t];
        let a02 = m2[t] + m6[t] + m10[t];
        let a03 = m3[t] + m7[t] + m11[t];
        let a10 = m4[t] - m8[t] - m12[t];
        let a11 = m5[t] - m9[t] - m13[t];
        let a12 = m6[t] - m10[t] - m14[t];
        let a13 = m7[t] - m11[t] - m15[t];
        // (Aᵀ m) A: two by two.
        y0[t] = a00 + a01 + a02 + bias;
        y1[t] = a01 - a02 - a03 + bias;
        y2[t] = a10 + a11 + a12 + bias;
        y3[t] = a11 - a12 - a13 + bias;
    }
    if relu {
        for v in ys.iter_mut() {
            *v = v.max(0.0);
        }
    }
    let (y0, rest) = ys.split_at(tiles);
    let (y1, rest) = rest.split_at(tiles);
    let (y2, y3) = rest.split_at(tiles);
    for (j, tr) in run.enumerate() {
        let (n, ty) = (tr / th, tr % th);
        let base = (n * h + 2 * ty) * w;
        let (top, bottom) = channel[base..base + 2 * w].split_at_mut(w);
        let r = j * half..j * half + tw;
        for ((tp, a), b) in top.chunks_exact_mut(2).zip(&y0[r.clone()]).zip(&y1[r.clone()]) {
            tp[0] = *a;
            tp[1] = *b;
        }
        for ((bt, a), b) in bottom.chunks_exact_mut(2).zip(&y2[r.clone()]).zip(&y3[r]) {
            bt[0] = *a;
            bt[1] = *b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::native::gemm::matmul;
    use crate::native::ops::im2col;

    /// The same convolution by im2col and one product: `cout × plane`.
    fn by_im2col(x: &[f32], s: Shape, weights: &[f32], cout: usize) -> Vec<f32> {
        let mut cols = Vec::new();
        im2col(&mut cols, x, s, 0..s.b * s.h);
        let mut out = vec![0.0; cout * s.plane()];
        matmul(&mut out, Mat::new(weights, cout, s.c * 9), Mat::new(&cols, s.c * 9, s.plane()), false);
        out
    }

    #[test]
    fn a_winograd_convolution_equals_im2col_whatever_the_runs() {
        let s = Shape { c: 3, b: 2, h: 6, w: 8 };
        let cout = 5;
        let x: Vec<f32> = (0..s.len()).map(|i| ((i * 37) % 17) as f32 / 17.0 - 0.5).collect();
        let weights: Vec<f32> = (0..cout * s.c * 9).map(|i| ((i * 11) % 13) as f32 / 13.0 - 0.4).collect();
        let expected = by_im2col(&x, s, &weights, cout);
        let mut wg = Winograd::default();
        wg.set_kernels(&weights, cout, s.c);
        // One tile row a run (runs cut through images), and the whole batch in one run.
        for run_bytes in [1, usize::MAX / 2] {
            let mut out = vec![f32::NAN; cout * s.plane()];
            assert!(wg.convolve(&mut out, &x, (s, cout), Finish::Plain, run_bytes, &|| false));
            for (i, (a, b)) in out.iter().zip(&expected).enumerate() {
                assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "output [{i}]: {a} by Winograd, {b} by im2col");
            }
        }
        let bias: Vec<f32> = (0..cout).map(|c| c as f32 * 0.3 - 0.6).collect();
        let mut out = vec![f32::NAN; cout * s.plane()];
        assert!(wg.convolve(&mut out, &x, (s, cout), Finish::BiasRelu(&bias), 1 << 10, &|| false));
        for (i, (a, b)) in out.iter().zip(&expected).enumerate() {
            let want = (b + bias[i / s.plane()]).max(0.0);
            assert!((a - want).abs() <= 1e-5 * (1.0 + want.abs()), "output [{i}]: {a}, want {want}");
        }
    }

    #[test]
    fn only_even_images_fit() {
        assert!(fits(Shape { c: 1, b: 1, h: 28, w: 28 }));
        assert!(!fits(Shape { c: 1, b: 1, h: 7, w: 8 }));
    }
}
