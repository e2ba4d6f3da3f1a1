//! # quorum-record
//!
//! One record of a run, fed by both drivers — the simulator and the networked parameter
//! server — so that `arrivals.csv` and `workers.csv` mean the same thing whichever produced
//! them. The driver hands it every core [`quorum_core::Event`] ([`RunRecord::observe`]) and
//! what only the driver knows: the timing a push reports ([`RunRecord::pushed`]) and work a
//! simulated worker abandoned ([`RunRecord::abandoned`]). The writers turn it into files.
//!
//! One rule for each figure:
//! - the rank `k` of an arrival is its order among the gradients tagged with the same step,
//!   accepted or dropped, as they reached the server;
//! - a worker's compute and transfer times are those its pushes report (compute: the
//!   gradient's own time; transfer: fetching the parameters it was computed on).

#![deny(missing_docs)]

pub mod arrivals;
pub mod record;
pub mod restarts;
pub mod stats;
pub mod timings;
pub mod workers;

pub use arrivals::Arrival;
pub use record::{RunRecord, Update};
pub use restarts::Restart;
pub use stats::quantile;
pub use workers::WorkerStats;
