//! `restarts.csv`: the attempts of a run with random restarts, and which one was kept (the
//! same file for `quorum sim` and `quorum train`).

use serde::Serialize;
use std::path::Path;

/// One attempt of a run with random restarts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Restart {
    /// Attempt number, from 0.
    pub attempt: u32,
    /// Seed of its initial weights.
    pub seed: u64,
    /// Whether it diverged (and stopped early).
    pub diverged: bool,
    /// Updates it applied.
    pub steps: u64,
    /// Validation loss at the end (not for diverged attempts).
    pub validation_loss: Option<f32>,
    /// Validation accuracy at the end.
    pub validation_accuracy: Option<f32>,
    /// Test accuracy at the end (reported, never used to choose).
    pub test_accuracy: Option<f32>,
    /// The attempt kept.
    pub chosen: bool,
}

impl Restart {
    /// How good the attempt is for choosing (higher is better): its validation accuracy, or
    /// minus its validation loss where there is no accuracy; `None` for a diverged attempt.
    /// Test figures never choose.
    pub fn score(&self) -> Option<f32> {
        if self.diverged {
            return None;
        }
        self.validation_accuracy.or(self.validation_loss.map(|l| -l))
    }

    /// One line for a person: how the attempt ended.
    pub fn describe(&self) -> String {
        match (self.diverged, self.validation_accuracy, self.validation_loss) {
            (true, _, _) => format!("diverged at step {}", self.steps),
            (false, Some(a), Some(l)) => format!("validation loss {l:.4}, accuracy {:.2}%", 100.0 * a),
            (false, Some(a), None) => format!("validation accuracy {:.2}%", 100.0 * a),
            (false, None, Some(l)) => format!("validation loss {l:.5}"),
            (false, None, None) => "no validation figure".into(),
        }
    }
}

/// Writes `restarts.csv`, one row per attempt.
pub fn write(path: &Path, rows: &[Restart]) -> std::io::Result<()> {
    let err = |e: csv::Error| std::io::Error::other(format!("cannot write {}: {e}", path.display()));
    let mut w = csv::Writer::from_path(path).map_err(err)?;
    for r in rows {
        w.serialize(r).map_err(err)?;
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(diverged: bool, acc: Option<f32>, loss: Option<f32>) -> Restart {
        Restart {
            attempt: 0,
            seed: 1,
            diverged,
            steps: 10,
            validation_loss: loss,
            validation_accuracy: acc,
            test_accuracy: Some(0.99),
            chosen: false,
        }
    }

    #[test]
    fn validation_accuracy_chooses_then_validation_loss_and_a_diverged_attempt_never() {
        assert_eq!(attempt(false, Some(0.9), Some(0.3)).score(), Some(0.9));
        assert_eq!(attempt(false, None, Some(0.3)).score(), Some(-0.3));
        assert_eq!(attempt(true, Some(0.9), Some(0.3)).score(), None);
    }
}
