//! Global-norm gradient clipping.

/// The L2 norm of `scale * v`, accumulated in f64 so large models do not lose precision.
pub fn global_norm(v: &[f32], scale: f32) -> f32 {
    // Four independent accumulators keep the loop vectorisable.
    let mut acc = [0.0f64; 4];
    let chunks = v.chunks_exact(4);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..4 {
            acc[i] += (c[i] as f64) * (c[i] as f64);
        }
    }
    let mut sum: f64 = acc.iter().sum();
    sum += rest.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>();
    (sum.sqrt() * scale.abs() as f64) as f32
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
    fn clipping_only_shrinks_large_gradients() {
        assert_eq!(clip_factor(2.0, 5.0), 1.0);
        assert!((clip_factor(10.0, 5.0) - 0.5).abs() < 1e-7);
    }
}
