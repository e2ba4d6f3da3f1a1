//! Messages between workers and the parameter server, as the core sees them.
//!
//! Drivers translate their wire format (gRPC) or their simulated deliveries into these.

use crate::ids::Step;
use serde::{Deserialize, Serialize};

/// What a worker can tell the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToServer {
    /// The worker is ready; the server answers with the current parameters.
    ///
    /// `session` names the process: a worker draws it once when it starts and keeps it
    /// across reconnects. While a session of that index is alive, a join from another
    /// session is refused ([`crate::ProtocolError::IndexInUse`]), and every later message
    /// must come from the session that joined ([`crate::Server::check_session`]).
    Join {
        /// The joining process's session id.
        session: u64,
    },
    /// A gradient computed on the parameters of `step`.
    Push {
        /// The step of the parameters the gradient was computed on.
        step: Step,
        /// Mean gradient over the worker's mini-batch, in layout order.
        gradient: Vec<f32>,
        /// The mini-batch loss, if the worker measured it (for metrics only).
        loss: Option<f32>,
    },
    /// The worker is alive but has nothing to send (keeps the liveness clock fresh).
    Heartbeat,
    /// The worker is leaving on purpose.
    Leave,
}

/// What the server can tell a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToWorker {
    /// Parameters of `step` are available (the driver attaches the numbers).
    Params {
        /// The parameters' step.
        step: Step,
    },
    /// Training is over; the worker should exit.
    Stop,
}
