//! # quorum-net
//!
//! The gRPC driver of the quorum protocol core. The handlers only convert wire messages to
//! core types and hand them to one loop ([`server::run_server`]) that owns the
//! [`quorum_core::Server`] state machine and carries out its actions. Parameters and
//! gradients travel as raw little-endian `f32` (or `bf16`) bytes in chunks ([`encoding`]); push
//! and pull are read and written without tonic's codec copies, as the same gRPC messages
//! ([`framing`]).
//! The server writes checkpoints ([`checkpoint`]) and TensorBoard scalars ([`tensorboard`]).

#![deny(missing_docs)]

pub mod auth;
pub mod checkpoint;
pub mod encoding;
pub mod evaluate;
pub mod framing;
pub mod params_file;
pub mod server;
pub mod shm;
pub mod tensorboard;
pub mod tls;
pub mod worker;

/// Generated gRPC code for `proto/quorum.proto`.
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("quorum.v1");
}

/// Generated messages for `proto/tensorboard.proto`.
pub(crate) mod proto_tb {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("tensorboard");
}

pub use encoding::Encoding;
pub use server::{run_server, ServerOptions, TrainSummary};
pub use worker::{run_worker, WorkerOptions};
