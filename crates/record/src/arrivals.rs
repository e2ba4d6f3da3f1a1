//! `arrivals.csv`: when each gradient reached the server, relative to its step's opening.

use quorum_core::Step;
use serde::Serialize;
use std::io::Write;

/// The header of `arrivals.csv`.
pub const HEADER: &str = "step,k,worker,seconds,accepted";

/// The k-th gradient tagged with `step` reached the server `seconds` after the step opened.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Arrival {
    /// The gradient's tag.
    pub step: Step,
    /// Arrival rank among the gradients tagged with that step (accepted or dropped), from 1.
    pub k: u32,
    /// Who sent it.
    pub worker: u32,
    /// Seconds since the step opened.
    pub seconds: f64,
    /// Whether it was averaged (false: dropped as late or too stale).
    pub accepted: bool,
}

impl Arrival {
    /// Its `arrivals.csv` line, without the newline.
    pub fn line(&self) -> String {
        format!("{},{},{},{},{}", self.step, self.k, self.worker, self.seconds, self.accepted)
    }
}

/// Writes `arrivals.csv`: the header, `earlier` lines (a resumed run's), then `rows`.
pub fn write(mut w: impl Write, earlier: &[String], rows: &[Arrival]) -> std::io::Result<()> {
    writeln!(w, "{HEADER}")?;
    for line in earlier {
        writeln!(w, "{line}")?;
    }
    for a in rows {
        writeln!(w, "{}", a.line())?;
    }
    w.flush()
}
