//! When a run has diverged: one rule for the simulator and the networked server.
//!
//! A run has diverged when an applied step's mean mini-batch loss is not finite or exceeds
//! the configured limit, or when a worker sends a non-finite gradient (which the server's
//! validation refuses, [`crate::ProtocolError::NonFinite`]). Without a limit, nothing is
//! taken for divergence.

/// Whether the mean loss `loss` of an applied step means the run diverged, given `limit`.
pub fn diverged(loss: f32, limit: Option<f32>) -> bool {
    limit.is_some_and(|limit| !loss.is_finite() || loss > limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loss_above_the_limit_or_not_finite_is_divergence_and_without_a_limit_nothing_is() {
        assert!(diverged(11.0, Some(10.0)));
        assert!(diverged(f32::NAN, Some(10.0)));
        assert!(diverged(f32::INFINITY, Some(f32::INFINITY)));
        assert!(!diverged(9.0, Some(10.0)));
        assert!(!diverged(f32::NAN, None));
    }
}
