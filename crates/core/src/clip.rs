//! Global-norm gradient clipping.

/// Values per block: squares are summed in `f32` lanes within a block (16 lanes vectorise
/// without converting each value to `f64`: 38 against 122 µs for the MLP's 670k values, `cargo
/// bench -p quorum-core --bench apply -- norm_mlp`) and the blocks' sums in `f64`, so large
/// models do not lose precision.
const BLOCK: usize = 1024;
const LANES: usize = 16;

/// The L2 norm of `scale * v`.
pub fn global_norm(v: &[f32], scale: f32) -> f32 {
    let squares: f64 = v.chunks(BLOCK).map(block_squares).sum();
    (squares.sqrt() * scale.abs() as f64) as f32
}

fn block_squares(b: &[f32]) -> f64 {
    let mut acc = [0.0f32; LANES];
    let chunks = b.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i] * c[i];
        }
    }
    let s = acc.iter().sum::<f32>() + rest.iter().map(|x| x * x).sum::<f32>();
    match s.is_finite() {
        true => s as f64,
        // Squares past f32's range (values above ~1.8e19): the block again in f64.
        false => b.iter().map(|&x| (x as f64) * (x as f64)).sum(),
    }
}

/// The factor that brings a gradient of norm `norm` down to at most `max_norm`
/// (TensorFlow's `clip_by_global_norm`): 1 when already within the bound.
pub fn clip_factor(norm: f32, max_norm: f32) -> f32 {
    if norm > max_norm && norm > 0.0 {
        max_norm / norm
    } else {
        1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn norm_of_three_four_is_five() {
        assert!((global_norm(&[3.0, 4.0], 1.0) - 5.0).abs() < 1e-6);
        assert!((global_norm(&[6.0, 8.0, 0.0, 0.0, 0.0], 0.5) - 5.0).abs() < 1e-6);
    }

    #[test]
    fn norm_of_a_large_model_agrees_with_a_sum_in_f64_to_float_precision() {
        let v: Vec<f32> = (0..3_000_001u64).map(|i| ((i * 7919 % 2001) as f32 - 1000.0) * 1e-3).collect();
        let exact = v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
        let norm = global_norm(&v, 1.0) as f64;
        assert!((norm - exact).abs() / exact < 1e-6, "{norm} against {exact}");
    }

    #[test]
    fn norm_of_values_whose_squares_pass_f32s_range_is_finite() {
        let norm = global_norm(&[3e20, 4e20, 0.0], 1.0);
        assert!((norm / 5e20 - 1.0).abs() < 1e-6, "{norm}");
        assert!(global_norm(&[1.0, f32::NAN], 1.0).is_nan());
    }

    #[test]
    fn clipping_only_shrinks_large_gradients() {
        assert_eq!(clip_factor(2.0, 5.0), 1.0);
        assert!((clip_factor(10.0, 5.0) - 0.5).abs() < 1e-7);
    }
}
