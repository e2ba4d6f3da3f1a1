//! A synthetic gradient source with a known optimum: noisy linear least squares.
//!
//! x ~ N(0, I_d), y = x·θ* + ε with ε ~ N(0, σ²). The population loss
//! ½E[(x·θ − y)²] = ½‖θ − θ*‖² + ½σ² is minimised at θ*, so progress is measured exactly
//! by the distance to θ*. Samples are drawn afresh for every (seed, worker, step).

use crate::source::{check_len, BatchId, ComputeError, Evaluation, GradientSource};
use quorum_core::ParamLayout;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Noisy least squares in `dim` dimensions.
#[derive(Debug, Clone)]
pub struct LeastSquares {
    layout: ParamLayout,
    optimum: Vec<f32>,
    noise: f32,
    batch: usize,
    seed: u64,
    x: Vec<f32>,
}

impl LeastSquares {
    /// A problem of `dim` parameters, `batch` samples per gradient, label noise σ = `noise`.
    pub fn new(dim: usize, batch: usize, noise: f32, seed: u64) -> Self {
        let layout = ParamLayout::from_shapes([("theta", vec![dim])]).expect("one tensor");
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_0F0F);
        let optimum = (0..dim).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        LeastSquares { layout, optimum, noise, batch, seed, x: vec![0.0; dim] }
    }

    /// θ*, the minimiser.
    pub fn optimum(&self) -> &[f32] {
        &self.optimum
    }

    /// ‖θ − θ*‖.
    pub fn distance(&self, params: &[f32]) -> f32 {
        params.iter().zip(&self.optimum).map(|(p, o)| (p - o) * (p - o)).sum::<f32>().sqrt()
    }
}

impl GradientSource for LeastSquares {
    fn layout(&self) -> &ParamLayout {
        &self.layout
    }

    fn init_params(&self, _seed: u64) -> Vec<f32> {
        vec![0.0; self.layout.len()]
    }

    fn batch_size(&self) -> usize {
        self.batch
    }

    fn gradient(&mut self, params: &[f32], batch: BatchId, grad: &mut Vec<f32>) -> Result<f32, ComputeError> {
        check_len(params, &self.layout)?;
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(batch.step.wrapping_mul(1 << 20) ^ batch.worker.0 as u64);
        grad.clear();
        grad.resize(params.len(), 0.0);
        let mut loss = 0.0f32;
        for _ in 0..self.batch {
            for xi in self.x.iter_mut() {
                *xi = StandardNormal.sample(&mut rng);
            }
            let eps: f32 = StandardNormal.sample(&mut rng);
            let y: f32 = self.x.iter().zip(&self.optimum).map(|(a, b)| a * b).sum::<f32>() + self.noise * eps;
            let r: f32 = self.x.iter().zip(params).map(|(a, b)| a * b).sum::<f32>() - y;
            loss += 0.5 * r * r;
            for (g, xi) in grad.iter_mut().zip(&self.x) {
                *g += r * xi;
            }
        }
        let inv = 1.0 / self.batch as f32;
        grad.iter_mut().for_each(|g| *g *= inv);
        Ok(loss * inv)
    }

    fn evaluate(&mut self, params: &[f32]) -> Result<Evaluation, ComputeError> {
        check_len(params, &self.layout)?;
        let d = self.distance(params);
        Ok(Evaluation { loss: 0.5 * d * d + 0.5 * self.noise * self.noise, accuracy: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quorum_core::WorkerId;

    /// A small problem, parameters to take its gradient at, and a batch.
    fn problem() -> (LeastSquares, Vec<f32>, BatchId) {
        (LeastSquares::new(5, 8, 0.1, 3), vec![0.3, -0.2, 0.1, 0.5, -0.4], BatchId { worker: WorkerId(1), step: 2 })
    }

    #[test]
    fn the_default_gradient_into_a_slice_is_the_gradient_and_refuses_a_slice_of_another_length() {
        let (mut ls, params, b) = problem();
        let mut g = Vec::new();
        let loss = ls.gradient(&params, b, &mut g).unwrap();
        for _ in 0..2 {
            // (Twice: the second reuses the thread's buffer.)
            let mut out = [f32::NAN; 5];
            assert_eq!(ls.gradient_into(&params, b, &mut out).unwrap(), loss);
            assert_eq!(out[..], g[..]);
        }
        let e = ls.gradient_into(&params, b, &mut [0.0; 4]).unwrap_err();
        assert!(matches!(e, ComputeError::WrongGradientLength { got: 4, expected: 5 }), "{e}");
    }

    #[test]
    fn a_source_that_cannot_stop_half_way_says_so_and_finishes_even_when_overtaken() {
        let (mut ls, params, b) = problem();
        assert!(!ls.can_abandon());
        let mut g = Vec::new();
        let loss = ls.gradient(&params, b, &mut g).unwrap();
        let mut out = [f32::NAN; 5];
        assert_eq!(ls.gradient_into_unless(&params, b, &mut out, &|| true).unwrap(), loss);
        assert_eq!(out[..], g[..]);
    }

    #[test]
    fn gradient_matches_finite_differences_of_the_batch_loss() {
        let (mut ls, params, b) = problem();
        let mut g = Vec::new();
        ls.gradient(&params, b, &mut g).unwrap();
        let h = 1e-2;
        for i in 0..5 {
            let mut p = params.clone();
            p[i] += h;
            let up = ls.gradient(&p, b, &mut Vec::new()).unwrap();
            p[i] -= 2.0 * h;
            let down = ls.gradient(&p, b, &mut Vec::new()).unwrap();
            let fd = (up - down) / (2.0 * h);
            assert!((fd - g[i]).abs() < 1e-2 * (1.0 + g[i].abs()), "coord {i}: fd {fd} vs {}", g[i]);
        }
    }

    #[test]
    fn gradient_descent_converges_to_the_optimum() {
        let mut ls = LeastSquares::new(8, 32, 0.1, 1);
        let mut p = ls.init_params(0);
        let mut g = Vec::new();
        for step in 0..300 {
            ls.gradient(&p, BatchId { worker: WorkerId(0), step }, &mut g).unwrap();
            p.iter_mut().zip(&g).for_each(|(p, g)| *p -= 0.1 * g);
        }
        assert!(ls.distance(&p) < 0.1, "distance {}", ls.distance(&p));
    }
}
