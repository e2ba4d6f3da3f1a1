//! # quorum-net
//!
//! The gRPC driver of the quorum protocol core. The handlers only convert wire messages to
//! core types and hand them to one loop ([`server::run_server`]) that owns the
//! [`quorum_core::Server`] state machine and carries out its actions. Parameters and
//! gradients travel as raw little-endian `f32` bytes in chunks ([`wire`]).

pub mod server;
pub mod wire;
pub mod worker;

/// Generated gRPC code for `proto/quorum.proto`.
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("quorum.v1");
}

pub use server::{run_server, ServerOptions, TrainSummary};
pub use worker::{run_worker, WorkerOptions};
