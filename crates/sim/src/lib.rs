//! # quorum-sim
//!
//! A deterministic discrete-event driver of the quorum protocol core: a virtual clock, an
//! event heap ordered by (time, sequence), seeded ChaCha random streams, delay models for
//! compute time and a latency + bandwidth network. A run is a pure function of
//! (config, seed): the same inputs give the same trace, bit for bit.
//!
//! With a [`quorum_compute::GradientSource`] each simulated worker computes a real gradient
//! at the parameters it read, while time stays virtual; without one (timing-only) no
//! numbers move and thousands of workers simulate in seconds.

#![deny(missing_docs)]

pub mod config;
pub mod engine;
pub mod fault;
pub mod network;
pub mod queue;
pub mod report;
pub mod sweep;

pub use config::{EvalOn, SimConfig};
pub use engine::{simulate, SimError};
pub use fault::{check_invariants, Fault, FaultKind, InvariantBroken};
pub use network::NetworkModel;
pub use quorum_compute::delay::{DelayError, DelayModel, DelaySampler};
pub use quorum_record::quantile;
pub use report::{Arrival, MetricRow, ShardCheck, SimReport, Summary, WorkerStats};
pub use sweep::{sweep_backups, SweepRow};
