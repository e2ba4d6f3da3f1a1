//! Exponential moving average of the parameters, kept beside them for evaluation.

/// θ̄ ← α·θ̄ + (1−α)·θ
pub fn update(ema: &mut [f32], params: &[f32], alpha: f32) {
    let beta = 1.0 - alpha;
    for (e, p) in ema.iter_mut().zip(params) {
        *e = alpha * *e + beta * p;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ema_moves_a_fraction_towards_the_parameters() {
        let mut e = vec![0.0, 10.0];
        super::update(&mut e, &[1.0, 0.0], 0.9);
        assert!((e[0] - 0.1).abs() < 1e-6 && (e[1] - 9.0).abs() < 1e-6, "{e:?}");
    }
}
