//! The adaptive policy's rule: how many gradients the next step waits for.
//!
//! Before each step the server picks the N that maximises the expected training progress
//! per second, `progress(N) / T(N)`, from what it has measured (the derivation, its
//! assumptions and its sources are in `docs/adaptive.md`):
//!
//! - **T(N)**, the expected time until the N-th gradient arrives, from each live worker's
//!   recent response times (push time minus the time it could start: the later of its
//!   previous push and the opening of the step it pushed for). A small deterministic replay
//!   of those times through the step rule gives T(N) with the cost of stragglers included: a
//!   worker whose gradient comes too late finishes anyway (under this policy no worker stops
//!   half-way: [`crate::Policy::abandon`]) and starts its next step late. Recent rounds weigh
//!   more.
//! - **progress(N) ∝ N · (2·max + B − N)**: the expected loss decrease of one step that
//!   averages N gradients with the learning rate scaled linearly in N, when the configured
//!   rate (the rate at N = max) is the best rate for N = max. B is the gradient noise scale
//!   counted in worker batches (McCandlish et al., "An Empirical Model of Large-Batch
//!   Training", arXiv 1812.06162): the more the gradients disagree, the more each extra one
//!   is worth. The server estimates B from the gradients it sums anyway: with N gradients gᵢ
//!   and their mean ḡ, E‖gᵢ‖² = |G|² + σ² and E‖ḡ‖² = |G|² + σ²/N, so σ² and |G|² follow,
//!   and B = σ² / |G|². Both are smoothed separately across steps. Until they are known, or
//!   when the noise dominates, progress ∝ N and the rule maximises gradients per second.
//!
//! The closest published rule is Dynamic Backup Workers (Xu, Neglia, Sebastianelli,
//! arXiv 2004.14696), which also picks the number of gradients per step by expected loss
//! decrease per unit of time; this rule differs in how it estimates both terms.
//!
//! No clock, no I/O, no randomness: given the same responses and gradients, the same choice.

use crate::ids::WorkerId;
use std::collections::VecDeque;

/// Response times kept per worker.
pub const WINDOW: usize = 16;
/// Weight of a replay round relative to the next newer one.
const RECENCY: f64 = 0.85;
/// Weight of the newest step in the smoothed noise estimates.
const NOISE_SMOOTHING: f64 = 0.1;
/// A new N must promise this much more progress per second than the current one.
const HYSTERESIS: f64 = 0.03;
/// Values of N the search replays per level (see [`AdaptiveRule::search`]).
const SEARCH_POINTS: u32 = 16;
/// Steps the rule watches before its first choice.
pub const WARMUP_STEPS: u64 = 8;
/// Steps N stays at a new value before the rule may change it again: half the window, so
/// that most of the times it then judges by were measured at the new N (without it, a change
/// that shifts which workers arrive late could be undone by the very next step).
pub const DWELL_STEPS: u64 = 8;

/// The expected loss decrease of a step that averages `n` gradients, with the learning rate
/// `n / max` times the rate that is best at N = `max`, relative to the best step at
/// N = `max`, for gradient noise scale `noise` (in worker batches).
///
/// McCandlish et al.'s model of a step of size ε on a batch of noise scale B gives
/// ΔL / ΔL_max = 2x − x²(1 + B/N) with x = ε / ε_max; the best rate at N = max is
/// x = max / (max + B), and linear scaling makes x = n / (max + B) at N = n. Together:
/// ΔL(n) ∝ n · (2·max + B − n), which is ∝ n when B is large (every gradient is worth the
/// same) and bends down when the gradients agree. An unknown or infinite B counts as large.
pub fn progress(n: f64, max: f64, noise: Option<f64>) -> f64 {
    match noise {
        Some(b) if b.is_finite() => n * (2.0 * max + b - n) / (max * (max + b)),
        _ => n / max,
    }
}

/// A change of N with the numbers behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// The new N.
    pub aggregate: u32,
    /// Why, in one line with the figures.
    pub reason: String,
}

/// What the rule has measured and how it chooses.
#[derive(Debug, Clone)]
pub struct AdaptiveRule {
    min: u32,
    max: u32,
    /// Recent response times in seconds per worker, oldest first.
    responses: Vec<VecDeque<f64>>,
    /// Smoothed |G|² (squared norm of the true gradient) and σ² (variance of one worker's gradient).
    signal: Option<f64>,
    noise: Option<f64>,
    steps: u64,
    /// The step count at the last change.
    changed_at: Option<u64>,
}

impl AdaptiveRule {
    /// A rule for `workers` workers choosing N in `min..=max`.
    pub fn new(workers: u32, min: u32, max: u32) -> Self {
        AdaptiveRule {
            min: min.max(1),
            max,
            responses: vec![VecDeque::with_capacity(WINDOW); workers as usize],
            signal: None,
            noise: None,
            steps: 0,
            changed_at: None,
        }
    }

    /// Worker `w` took `seconds` from when it could start to its push (a gradient or a late notice).
    pub fn observe_response(&mut self, w: WorkerId, seconds: f64) {
        let Some(r) = self.responses.get_mut(w.index()) else { return };
        if !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        if r.len() == WINDOW {
            r.pop_front();
        }
        r.push_back(seconds);
    }

    /// A step averaged `n` gradients whose squared norms summed to `sum_sq`, and whose mean
    /// had squared norm `mean_sq`.
    pub fn observe_step(&mut self, n: u32, sum_sq: f64, mean_sq: f64) {
        self.steps += 1;
        if n < 2 || !(sum_sq.is_finite() && mean_sq.is_finite()) {
            return;
        }
        let n = n as f64;
        let sigma2 = ((sum_sq / n - mean_sq) * n / (n - 1.0)).max(0.0);
        let g2 = mean_sq - sigma2 / n;
        let smooth = |old: Option<f64>, new: f64| Some(old.map_or(new, |o| o + NOISE_SMOOTHING * (new - o)));
        self.noise = smooth(self.noise, sigma2);
        self.signal = smooth(self.signal, g2);
    }

    /// The gradient noise scale in worker batches (σ² / |G|²): `None` before two gradients
    /// were averaged, infinite while the gradients' spread hides their mean.
    pub fn noise_scale(&self) -> Option<f64> {
        let (g2, s2) = (self.signal?, self.noise?);
        Some(if g2 > 0.0 { s2 / g2 } else { f64::INFINITY })
    }

    /// Workers alive with at least one response measured.
    fn pool(&self, live: &[bool]) -> Vec<usize> {
        (0..self.responses.len())
            .filter(|&i| live.get(i).copied().unwrap_or(false) && !self.responses[i].is_empty())
            .collect()
    }

    /// The expected seconds per step when each step waits for `n` of the workers in `pool`:
    /// a replay of their recent response times through the step rule, workers that arrive
    /// late starting their next step late. `None` when fewer than `n` workers were measured.
    fn step_seconds(&self, n: usize, pool: &[usize]) -> Option<f64> {
        if n == 0 || pool.len() < n {
            return None;
        }
        let mut carry = vec![0.0f64; pool.len()];
        let mut arrivals = vec![0.0f64; pool.len()];
        let mut scratch = vec![0.0f64; pool.len()];
        let (mut total, mut weights) = (0.0, 0.0);
        // The first pass settles the carried lateness; the second is measured.
        for pass in 0..2 {
            for round in 0..WINDOW {
                for (j, &w) in pool.iter().enumerate() {
                    let r = &self.responses[w];
                    arrivals[j] = carry[j] + r[round * r.len() / WINDOW];
                }
                scratch.copy_from_slice(&arrivals);
                let (_, kth, _) = scratch.select_nth_unstable_by(n - 1, f64::total_cmp);
                let t = *kth;
                for (c, a) in carry.iter_mut().zip(&arrivals) {
                    *c = (a - t).max(0.0);
                }
                if pass == 1 {
                    let weight = RECENCY.powi((WINDOW - 1 - round) as i32);
                    total += weight * t;
                    weights += weight;
                }
            }
        }
        Some(total / weights)
    }

    /// Expected progress per second at N = `n` (relative: only comparisons between values of
    /// N mean anything), and the expected seconds per step.
    fn rate(&self, n: usize, pool: &[usize]) -> Option<(f64, f64)> {
        let t = self.step_seconds(n, pool)?;
        Some((progress(n as f64, self.max as f64, self.noise_scale()) / t.max(f64::MIN_POSITIVE), t))
    }

    /// The N in `lo..=hi` with the most progress per second, with its rate and step time.
    /// Every N when there are at most [`SEARCH_POINTS`] of them; otherwise a grid of that many
    /// points, then a finer grid around the best point, down to single steps (the rate is
    /// smooth in N, and this keeps the choice at 1,000 workers to about 50 replays).
    fn search(&self, lo: u32, hi: u32, pool: &[usize]) -> Option<(u32, f64, f64)> {
        let mut best: Option<(u32, f64, f64)> = None;
        let (mut lo, mut hi) = (lo, hi);
        loop {
            let stride = (hi - lo).div_ceil(SEARCH_POINTS).max(1);
            let mut n = lo;
            loop {
                if best.is_none_or(|(b, _, _)| b != n) {
                    if let Some((r, t)) = self.rate(n as usize, pool) {
                        // Ties go to the larger N: the same speed with more gradients averaged.
                        if best.is_none_or(|(b, br, _)| r > br || (r == br && n > b)) {
                            best = Some((n, r, t));
                        }
                    }
                }
                if n == hi {
                    break;
                }
                n = (n + stride).min(hi);
            }
            if stride == 1 {
                return best;
            }
            let (b, _, _) = best?;
            (lo, hi) = (b.saturating_sub(stride).max(lo), (b + stride).min(hi));
        }
    }

    /// Called once per applied step with N now `current` and the live workers (`live[i]`):
    /// a new N, if another one promises clearly more progress per second.
    pub fn choose(&mut self, current: u32, live: &[bool]) -> Option<Choice> {
        if self.steps < WARMUP_STEPS || self.changed_at.is_some_and(|c| self.steps < c + DWELL_STEPS) {
            return None;
        }
        let pool = self.pool(live);
        let hi = self.max.min(pool.len() as u32);
        if hi < self.min {
            return None;
        }
        let (n, rate, t) = self.search(self.min, hi, &pool)?;
        if n == current {
            return None;
        }
        let now = (self.min..=hi).contains(&current).then(|| self.rate(current as usize, &pool)).flatten();
        if let Some((cur_rate, _)) = now {
            if rate <= cur_rate * (1.0 + HYSTERESIS) {
                return None;
            }
        }
        let noise = match self.noise_scale() {
            Some(b) if b.is_finite() => format!("gradient noise scale {b:.1} worker batches"),
            Some(_) => "gradient noise dominates".to_string(),
            None => "gradient noise not yet measured".to_string(),
        };
        let compared = match now {
            Some((cur_rate, cur_t)) => format!(
                "{:+.0}% progress/s over N={current} ({:.1} ms/step)",
                100.0 * (rate / cur_rate - 1.0),
                1e3 * cur_t
            ),
            None => format!("N={current} is out of reach with {} live workers measured", pool.len()),
        };
        self.changed_at = Some(self.steps);
        Some(Choice {
            aggregate: n,
            reason: format!("adaptive: N={n} expects {:.1} ms/step, {compared}; {noise}", 1e3 * t),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule_with(times: &[f64], min: u32, max: u32) -> AdaptiveRule {
        let mut r = AdaptiveRule::new(times.len() as u32, min, max);
        for _ in 0..WINDOW {
            for (i, &t) in times.iter().enumerate() {
                r.observe_response(WorkerId(i as u32), t);
            }
        }
        for _ in 0..WARMUP_STEPS {
            r.observe_step(1, 0.0, 0.0);
        }
        r
    }

    #[test]
    fn one_slow_worker_out_of_four_is_left_out_when_noise_is_unknown() {
        let mut r = rule_with(&[0.01, 0.01, 0.01, 0.05], 1, 4);
        let c = r.choose(4, &[true; 4]).expect("a change");
        // Noise unknown: gradients per second, 3 per 10 ms beats 4 per 50 ms.
        assert_eq!(c.aggregate, 3, "{}", c.reason);
        assert!(c.reason.contains("N=3"), "{}", c.reason);
    }

    #[test]
    fn after_a_change_n_stays_for_the_dwell_steps() {
        let mut r = rule_with(&[0.01, 0.01, 0.01, 0.05], 1, 4);
        assert_eq!(r.choose(4, &[true; 4]).map(|c| c.aggregate), Some(3));
        // Worker 3 becomes the fastest at once: the rule waits out its dwell before moving.
        for _ in 0..WINDOW {
            r.observe_response(WorkerId(3), 0.001);
            for w in 0..3 {
                r.observe_response(WorkerId(w), 0.03);
            }
        }
        for _ in 0..DWELL_STEPS - 1 {
            r.observe_step(1, 0.0, 0.0);
            assert_eq!(r.choose(3, &[true; 4]), None);
        }
        r.observe_step(1, 0.0, 0.0);
        assert!(r.choose(3, &[true; 4]).is_some(), "after the dwell the rule moves again");
    }

    #[test]
    fn equal_workers_keep_every_gradient() {
        let mut r = rule_with(&[0.02; 5], 1, 5);
        assert_eq!(r.choose(5, &[true; 5]), None);
    }

    #[test]
    fn no_choice_before_the_warm_up() {
        let mut r = AdaptiveRule::new(4, 1, 4);
        for i in 0..4 {
            r.observe_response(WorkerId(i), if i == 3 { 1.0 } else { 0.01 });
        }
        assert_eq!(r.choose(4, &[true; 4]), None);
    }

    #[test]
    fn progress_is_one_at_the_full_cluster_and_bends_down_only_when_gradients_agree() {
        for b in [0.0, 1.0, 50.0, 1e9] {
            assert!((progress(100.0, 100.0, Some(b)) - 1.0).abs() < 1e-9);
        }
        // Noise-free: half the gradients (at half the rate) still make 3/4 of the progress.
        assert!((progress(50.0, 100.0, Some(0.0)) - 0.75).abs() < 1e-9);
        // Very noisy, or unknown: progress in proportion to the gradients.
        assert!((progress(50.0, 100.0, Some(1e9)) - 0.5).abs() < 1e-6);
        assert!((progress(50.0, 100.0, None) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn low_gradient_noise_favours_fewer_gradients() {
        // Workers at 10, 15, 20 and 25 ms: gradients per second grow with N up to 4.
        let times = [0.010, 0.015, 0.020, 0.025];
        let mut noisy = rule_with(&times, 1, 4);
        let mut quiet = rule_with(&times, 1, 4);
        // Gradients that agree (σ² ≪ |G|²) and gradients that mostly disagree.
        for _ in 0..50 {
            // mean_sq = |G|² + σ²/n, sum_sq = n(|G|² + σ²)
            let (g2, s2, n) = (1.0, 0.05, 4.0);
            quiet.observe_step(4, n * (g2 + s2), g2 + s2 / n);
            let (g2, s2) = (1.0, 400.0);
            noisy.observe_step(4, n * (g2 + s2), g2 + s2 / n);
        }
        assert!((quiet.noise_scale().unwrap() - 0.05).abs() < 1e-6);
        let q = quiet.choose(4, &[true; 4]).expect("quiet changes").aggregate;
        let n = noisy.choose(4, &[true; 4]).map_or(4, |c| c.aggregate);
        assert_eq!(q, 2, "almost noise-free gradients: the two fastest workers");
        assert_eq!(n, 4, "noisy gradients: every gradient is worth waiting for");
    }

    #[test]
    fn dead_and_unmeasured_workers_are_not_waited_for() {
        let mut r = rule_with(&[0.01; 4], 1, 4);
        let c = r.choose(4, &[true, true, false, true]).expect("lowered");
        assert_eq!(c.aggregate, 3);
        assert!(c.reason.contains("out of reach"), "{}", c.reason);
    }

    #[test]
    fn a_late_worker_starts_its_next_step_late() {
        // A at 10 ms every step; B and C alternate 5 ms and 30 ms in opposite phase. Were all
        // to start each step together, waiting for two would take 10 ms every step. But the
        // one at 30 ms is late, finishes anyway, and starts its next (5 ms) step 20 ms late.
        let mut r = AdaptiveRule::new(3, 1, 3);
        for round in 0..WINDOW {
            let (b, c) = if round % 2 == 0 { (0.005, 0.030) } else { (0.030, 0.005) };
            for (w, t) in [(0, 0.010), (1, b), (2, c)] {
                r.observe_response(WorkerId(w), t);
            }
        }
        let t2 = r.step_seconds(2, &[0, 1, 2]).unwrap();
        assert!(t2 > 0.011, "the carried lateness must show: {t2}");
        assert!(t2 < 0.030, "{t2}");
    }

    #[test]
    fn the_grid_search_finds_the_best_n_of_an_exhaustive_search() {
        // 200 workers with spread-out times: the coarse-to-fine search must land on the N that
        // trying every N finds.
        let times: Vec<f64> = (0..200).map(|i| 1.0 + 0.002 * i as f64 + if i % 17 == 0 { 0.8 } else { 0.0 }).collect();
        for noise in [None, Some(5.0), Some(50.0)] {
            let mut r = rule_with(&times, 1, 200);
            if let Some(b) = noise {
                let n = 10.0;
                for _ in 0..100 {
                    r.observe_step(10, n * (1.0 + b), 1.0 + b / n);
                }
            }
            let pool: Vec<usize> = (0..200).collect();
            let exhaustive = (1..=200u32)
                .filter_map(|n| r.rate(n as usize, &pool).map(|(rate, _)| (n, rate)))
                .fold((0, f64::MIN), |best, (n, rate)| if rate >= best.1 { (n, rate) } else { best });
            let (found, rate, _) = r.search(1, 200, &pool).unwrap();
            assert!(
                rate >= exhaustive.1 * (1.0 - 1e-9),
                "noise {noise:?}: found N={found}, exhaustive N={}",
                exhaustive.0
            );
        }
    }

    #[test]
    fn the_noise_estimate_recovers_signal_and_spread() {
        let mut r = AdaptiveRule::new(3, 1, 3);
        // Three gradients (1,0), (3,0), (2,3): mean (2,1), |mean|² = 5; Σ|g|² = 1 + 9 + 13 = 23.
        r.observe_step(3, 23.0, 5.0);
        // σ² = (23/3 - 5)·3/2 = 4, |G|² = 5 - 4/3.
        let b = r.noise_scale().unwrap();
        assert!((b - 4.0 / (5.0 - 4.0 / 3.0)).abs() < 1e-9, "{b}");
    }
}
