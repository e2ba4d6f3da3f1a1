//! Identifiers shared by every driver.

use serde::{Deserialize, Serialize};
use std::fmt;

/// The version of the parameters. Step `t` means "parameters after `t` updates"; every
/// gradient carries the step of the parameters it was computed on.
pub type Step = u64;

/// A worker's index, `0..workers`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WorkerId(pub u32);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}

impl WorkerId {
    /// The index as a `usize`, for indexing per-worker tables.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}
