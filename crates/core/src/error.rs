//! Errors of the protocol core.
//!
//! A [`ProtocolError`] means a peer broke the protocol; the server's state is left exactly
//! as it was before the offending input. Expected non-happy paths (a late gradient) are
//! [`crate::Event`]s, not errors.

use crate::ids::{Step, WorkerId};
use thiserror::Error;

/// A peer sent something the protocol does not allow. The state is unchanged.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ProtocolError {
    /// The worker id is outside `0..workers`.
    #[error("unknown worker {worker}: this cluster has workers w0..w{}; check the worker's --index", .workers.saturating_sub(1))]
    UnknownWorker {
        /// The offending id.
        worker: WorkerId,
        /// How many workers the server was configured with.
        workers: u32,
    },
    /// The worker pushed before joining.
    #[error("worker {worker} sent a gradient before joining; a worker must send Join first")]
    NotJoined {
        /// The offending worker.
        worker: WorkerId,
    },
    /// A gradient for a step the server has not reached: the worker cannot have those parameters.
    #[error("worker {worker} pushed a gradient for step {step}, but the server is at step {current}; a gradient can only be computed on parameters the server has published")]
    FutureStep {
        /// The offending worker.
        worker: WorkerId,
        /// The tag it sent.
        step: Step,
        /// The server's current step.
        current: Step,
    },
    /// The same worker already contributed to this step.
    #[error("worker {worker} pushed a second gradient for step {step}; each worker contributes at most once per step")]
    DuplicatePush {
        /// The offending worker.
        worker: WorkerId,
        /// The step it pushed twice.
        step: Step,
    },
    /// The gradient's length does not match the parameter layout.
    #[error("worker {worker} pushed a gradient of {got} values but the model has {expected} parameters; worker and server must use the same model config")]
    WrongLength {
        /// The offending worker.
        worker: WorkerId,
        /// Values received.
        got: usize,
        /// Values expected.
        expected: usize,
    },
    /// The gradient holds NaN or infinity.
    #[error("worker {worker} pushed a non-finite gradient (value {value} at index {index}); the worker's loss has probably diverged, lower the learning rate or enable clipping")]
    NonFinite {
        /// The offending worker.
        worker: WorkerId,
        /// First offending index.
        index: usize,
        /// The value there.
        value: f32,
    },
    /// Another live process already holds this worker index.
    #[error("worker index {worker} is held by another live process (two workers started with the same --index, or a restarted worker whose old session has not yet timed out); a restarted worker gets in once the old one has been silent for {:.0} s, otherwise give each worker its own index", .timeout.as_secs_f64())]
    IndexInUse {
        /// The index asked for.
        worker: WorkerId,
        /// How long silence takes to free the index (the worker time-out).
        timeout: std::time::Duration,
    },
    /// A shard other than 0 has not yet heard from the coordinator which process holds this
    /// worker index (the worker joined shard 0 a moment ago): join again.
    #[error("this shard has not yet heard from the coordinator (shard 0) that this process is worker {worker}; join again in a moment")]
    NotConfirmed {
        /// The index asked for.
        worker: WorkerId,
    },
    /// A message for a worker index from a process that is not the one that joined as it.
    #[error("a message for worker {worker} came from a process that did not join as it (another process holds worker {worker}'s session); each worker must use its own index")]
    WrongSession {
        /// The index the message claimed.
        worker: WorkerId,
    },
    /// The server has stopped and takes no more input.
    #[error("the server has stopped and accepts no more messages")]
    Stopped,
    /// A shard number outside `0..shards`.
    #[error("unknown shard {shard}: this run has shards 0..{}; check the server's --shard and --shards", .shards.saturating_sub(1))]
    UnknownShard {
        /// The offending number.
        shard: u32,
        /// How many shards the run has.
        shards: u32,
    },
    /// A whole gradient sent to the coordinator of a sharded run.
    #[error("worker {worker} sent a whole gradient to the coordinator; in a sharded run a worker pushes each shard its slice")]
    MisroutedPush {
        /// The offending worker.
        worker: WorkerId,
    },
    /// A commit a shard cannot apply: the coordinator and the shard disagree about the run.
    #[error("shard {shard} cannot apply the commit of step {step}: {why} (is every shard of this run started from the same checkpoint?)")]
    BadCommit {
        /// The shard.
        shard: u32,
        /// The step the commit closes.
        step: Step,
        /// What does not fit.
        why: String,
    },
}

/// A configuration that cannot work.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ConfigError {
    /// Some value is out of range; the message says which and why.
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl ConfigError {
    /// Shorthand for an [`ConfigError::Invalid`] with a formatted message.
    pub fn invalid(msg: impl Into<String>) -> Self {
        ConfigError::Invalid(msg.into())
    }
}
