//! # quorum-core
//!
//! The sans-IO heart of quorum: the parameter server's aggregation rule (synchronous SGD
//! with backup workers, asynchronous SGD, and a deadline variant), the worker's state
//! machine, and the numerical pieces the server applies (optimizers, learning-rate
//! schedules, global-norm clipping, parameter EMA).
//!
//! Nothing here performs I/O, reads a clock or draws random numbers. Time comes in as an
//! argument (`now`), inputs are method calls and outputs are values ([`Outputs`]) that a
//! driver carries out. Two drivers use this crate: the deterministic simulator
//! (`quorum-sim`) and the gRPC server (`quorum-net`).

#![deny(missing_docs)]

pub mod adaptive;
pub mod clip;
pub mod coordinator;
pub mod divergence;
pub mod ema;
pub mod error;
pub mod event;
pub mod ids;
pub mod layout;
pub mod message;
pub mod optim;
pub mod policy;
pub mod schedule;
pub mod server;
pub mod shard;
pub mod shard_plan;
pub mod worker;

pub use coordinator::Coordinator;
pub use divergence::diverged;
pub use error::{ConfigError, ProtocolError};
pub use event::{DropReason, Event, LeaveReason};
pub use ids::{Step, WorkerId};
pub use layout::{ParamLayout, TensorSpec};
pub use message::{ToServer, ToWorker};
pub use optim::{Optimizer, OptimizerConfig};
pub use policy::Policy;
pub use schedule::{Decay, LrSchedule};
pub use server::{Action, Liveness, OnStall, Outputs, Server, ServerConfig, ServerSnapshot};
pub use shard::{check_shardable, Commit, Shard, SliceOutcome};
pub use shard_plan::ShardPlan;
pub use worker::{OnNewerParams, Worker, WorkerAction};
