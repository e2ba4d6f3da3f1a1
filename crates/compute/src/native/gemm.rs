//! Matrix products on row-major `f32` slices, with transposes as strides (no copies): through
//! the `gemm` crate (the same kernels burn's `flex` backend uses; AVX2 at most), or with the
//! `openblas` feature through the system's OpenBLAS (`apt install libopenblas-dev`), whose
//! kernels use AVX-512 where the CPU has it.

#[cfg(not(feature = "openblas"))]
use gemm::Parallelism;

/// A row-major matrix operand: `rows × cols` as stored, rows `ld` values apart (a block of a
/// wider matrix when `ld > cols`), read transposed when `t`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
    pub t: bool,
}

/// Values a `rows × cols` block with rows `ld` apart spans.
fn span(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 {
        0
    } else {
        (rows - 1) * ld + cols
    }
}

impl<'a> Mat<'a> {
    /// `data` as a `rows × cols` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::block(data, rows, cols, cols)
    }

    /// The `rows × cols` block at the start of `data` whose rows are `ld` values apart.
    pub fn block(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> Self {
        assert!(ld >= cols, "rows {ld} apart cannot hold {cols} columns");
        assert!(
            data.len() >= span(rows, cols, ld),
            "matrix of {rows}×{cols} (rows {ld} apart) over {} values",
            data.len()
        );
        Mat { data, rows, cols, ld, t: false }
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        Mat { t: !self.t, ..self }
    }

    /// Columns `from..from + n` as read (a block of this matrix, no copy).
    fn cols(self, from: usize, n: usize) -> Self {
        let block = match self.t {
            // Columns as read are rows as stored.
            true => Mat::block(&self.data[from * self.ld..], n, self.cols, self.ld),
            false => Mat::block(&self.data[from..], self.rows, n, self.ld),
        };
        Mat { t: self.t, ..block }
    }

    /// Rows and columns as read.
    fn shape(&self) -> (usize, usize) {
        if self.t {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    /// (column stride, row stride) as read.
    #[cfg(not(feature = "openblas"))]
    fn strides(&self) -> (isize, isize) {
        if self.t {
            (self.ld as isize, 1)
        } else {
            (1, self.ld as isize)
        }
    }
}

/// `dst = a · b`, or `dst += a · b` with `accumulate`; `dst` is row-major with as many rows
/// as `a` and as many columns as `b`. Uses the threads of the current rayon pool.
pub(crate) fn matmul(dst: &mut [f32], a: Mat<'_>, b: Mat<'_>, accumulate: bool) {
    let n = b.shape().1;
    matmul_block(dst, n, a, b, accumulate);
}

/// Columns of the product computed at a time by [`matmul_unless`]: eight blocks per product
/// on the MLP's 512-wide layers, the largest ~0.07 ms on one core of the machine measured
/// (the whole gradient ~2.15 ms). The gradient is no slower than by whole products
/// (`gradient_time`, five interleaved runs each: MLP 2.152 against 2.157 ms).
pub(crate) const STOP_BLOCK: usize = 64;

/// [`matmul`] in blocks of [`STOP_BLOCK`] columns, asking `overtaken()` after each: `false`,
/// with `dst` partly written, if it said stop. A computation whose result is no longer
/// wanted stops within a block instead of at the end of a layer.
pub(crate) fn matmul_unless(
    dst: &mut [f32],
    a: Mat<'_>,
    b: Mat<'_>,
    accumulate: bool,
    overtaken: &dyn Fn() -> bool,
) -> bool {
    let n = b.shape().1;
    if a.shape().0 == 0 {
        return !overtaken();
    }
    for from in (0..n).step_by(STOP_BLOCK) {
        let width = STOP_BLOCK.min(n - from);
        matmul_block(&mut dst[from..], n, a, b.cols(from, width), accumulate);
        if overtaken() {
            return false;
        }
    }
    true
}

/// [`matmul`] into the block at the start of `dst` whose rows are `ld` values apart (columns
/// of a wider matrix).
pub(crate) fn matmul_block(dst: &mut [f32], ld: usize, a: Mat<'_>, b: Mat<'_>, accumulate: bool) {
    let ((m, k), (k2, n)) = (a.shape(), b.shape());
    assert_eq!(k, k2, "inner dimensions differ");
    assert!(ld >= n, "destination rows {ld} apart cannot hold {n} columns");
    assert!(dst.len() >= span(m, n, ld), "destination of {} values for {m}×{n} (rows {ld} apart)", dst.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(ld).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    product(dst, ld, a, b, (m, n, k), accumulate);
}

#[cfg(feature = "openblas")]
mod cblas {
    #[link(name = "openblas")]
    extern "C" {
        pub fn cblas_sgemm(
            layout: i32,
            trans_a: i32,
            trans_b: i32,
            m: i32,
            n: i32,
            k: i32,
            alpha: f32,
            a: *const f32,
            lda: i32,
            b: *const f32,
            ldb: i32,
            beta: f32,
            c: *mut f32,
            ldc: i32,
        );
        pub fn openblas_set_num_threads(n: i32);
    }
}

#[cfg(feature = "openblas")]
fn product(dst: &mut [f32], ld: usize, a: Mat<'_>, b: Mat<'_>, (m, n, k): (usize, usize, usize), accumulate: bool) {
    const ROW_MAJOR: i32 = 101;
    let trans = |t: bool| if t { 112 } else { 111 };
    let int = |v: usize| i32::try_from(v).expect("a matrix side below 2^31");
    // OpenBLAS keeps its own threads: as many as this process's compute pool, set once.
    static THREADS: std::sync::Once = std::sync::Once::new();
    // SAFETY: plain C calls; the pointers and leading dimensions describe the slices checked in
    // `matmul_block` (row-major, rows `ld` values apart), and `dst` aliases neither operand.
    unsafe {
        THREADS.call_once(|| cblas::openblas_set_num_threads(int(rayon::current_num_threads())));
        cblas::cblas_sgemm(
            ROW_MAJOR,
            trans(a.t),
            trans(b.t),
            int(m),
            int(n),
            int(k),
            1.0,
            a.data.as_ptr(),
            int(a.ld),
            b.data.as_ptr(),
            int(b.ld),
            if accumulate { 1.0 } else { 0.0 },
            dst.as_mut_ptr(),
            int(ld),
        );
    }
}

#[cfg(not(feature = "openblas"))]
fn product(dst: &mut [f32], ld: usize, a: Mat<'_>, b: Mat<'_>, (m, n, k): (usize, usize, usize), accumulate: bool) {
    let ((a_cs, a_rs), (b_cs, b_rs)) = (a.strides(), b.strides());
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k >= 1 << 18 { Parallelism::Rayon(threads) } else { Parallelism::None };
    // SAFETY: the shapes and strides were checked against the slices' lengths above (every
    // index read lies in its operand's span, every index written in the destination's), and
    // `dst` is borrowed mutably, so it aliases neither operand.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut t = vec![0.0; x.len()];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = x[r * cols + c];
            }
        }
        t
    }

    #[test]
    fn products_with_either_operand_transposed_match_the_definition() {
        let (m, n, k) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.91).cos()).collect();
        let want = naive(&a, &b, m, n, k);
        let (at, bt) = (transpose(&a, m, k), transpose(&b, k, n));
        for (lhs, rhs) in [
            (Mat::new(&a, m, k), Mat::new(&b, k, n)),
            (Mat::new(&at, k, m).t(), Mat::new(&b, k, n)),
            (Mat::new(&a, m, k), Mat::new(&bt, n, k).t()),
            (Mat::new(&at, k, m).t(), Mat::new(&bt, n, k).t()),
        ] {
            let mut c = vec![1.0; m * n];
            matmul(&mut c, lhs, rhs, false);
            assert!(c.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-5));
            matmul(&mut c, lhs, rhs, true);
            assert!(c.iter().zip(&want).all(|(x, y)| (x - 2.0 * y).abs() < 1e-5));
        }
    }

    #[test]
    fn a_product_in_column_blocks_is_the_product_and_stops_after_the_block_it_is_told_in() {
        let (m, k, n) = (3, 5, 2 * STOP_BLOCK + 7);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.91).cos()).collect();
        let bt = transpose(&b, k, n);
        let want = naive(&a, &b, m, n, k);
        for rhs in [Mat::new(&b, k, n), Mat::new(&bt, n, k).t()] {
            let asks = std::cell::Cell::new(0);
            let mut c = vec![1.0; m * n];
            let never = || {
                asks.set(asks.get() + 1);
                false
            };
            assert!(matmul_unless(&mut c, Mat::new(&a, m, k), rhs, false, &never));
            assert!(c.iter().zip(&want).all(|(x, y)| (x - y).abs() < 1e-5));
            assert_eq!(asks.get(), 3, "asked after each of the three blocks");
            // Told to stop at the first question: only the first block's columns were written.
            let mut c = vec![f32::NAN; m * n];
            assert!(!matmul_unless(&mut c, Mat::new(&a, m, k), rhs, false, &|| true));
            for (r, row) in c.chunks(n).enumerate() {
                assert!(row[..STOP_BLOCK].iter().zip(&want[r * n..]).all(|(x, y)| (x - y).abs() < 1e-5), "row {r}");
                assert!(row[STOP_BLOCK..].iter().all(|v| v.is_nan()), "row {r}: written past the block");
            }
        }
    }

    #[test]
    fn a_product_of_blocks_into_a_block_reads_and_writes_only_those_columns() {
        let (m, n, k, ld) = (3, 4, 2, 9);
        // `a` is the first k of 6 columns, `b` the first n of 7, `dst` the first n of ld.
        let wide_a: Vec<f32> = (0..m * 6).map(|i| i as f32).collect();
        let wide_b: Vec<f32> = (0..k * 7).map(|i| (i as f32).sqrt()).collect();
        let a: Vec<f32> = (0..m * k).map(|i| wide_a[(i / k) * 6 + i % k]).collect();
        let b: Vec<f32> = (0..k * n).map(|i| wide_b[(i / n) * 7 + i % n]).collect();
        let want = naive(&a, &b, m, n, k);
        let mut dst = vec![-1.0; m * ld];
        matmul_block(&mut dst, ld, Mat::block(&wide_a, m, k, 6), Mat::block(&wide_b, k, n, 7), false);
        for (r, row) in dst.chunks(ld).enumerate() {
            assert!(row[..n].iter().zip(&want[r * n..][..n]).all(|(x, y)| (x - y).abs() < 1e-5), "row {r}: {row:?}");
            assert!(row[n..].iter().all(|&v| v == -1.0), "row {r} written outside the block: {row:?}");
        }
    }
}
