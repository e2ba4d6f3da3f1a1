//! The one event vocabulary shared by every driver: metrics, logs, traces and plots all
//! read these; nothing is printed from inside the core.

use crate::ids::{Step, WorkerId};
use serde::{Deserialize, Serialize};

/// Why a gradient was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum DropReason {
    /// Its step already closed (sync / deadline).
    Late,
    /// Async: it is older than the configured staleness bound.
    TooStale {
        /// Updates applied between the read and this arrival.
        staleness: u64,
    },
}

/// Why a worker left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveReason {
    /// The worker said goodbye.
    Left,
    /// Nothing was heard from it within the liveness timeout.
    TimedOut,
}

/// Something that happened on the server. `time` is seconds on the driver's clock
/// (virtual in the simulator, wall-clock since start in the networked server).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum Event {
    /// A worker joined (or came back after timing out).
    WorkerJoined {
        /// Who.
        worker: WorkerId,
        /// When.
        time: f64,
    },
    /// A worker left or was declared gone.
    WorkerLeft {
        /// Who.
        worker: WorkerId,
        /// Why.
        reason: LeaveReason,
        /// When.
        time: f64,
    },
    /// A gradient was taken into the current step (sync) or applied (async).
    GradientAccepted {
        /// Who sent it.
        worker: WorkerId,
        /// The step it was tagged with.
        step: Step,
        /// It was the k-th gradient accepted for this step (1-based).
        k: u32,
        /// Seconds between the step opening and this arrival.
        since_open: f64,
        /// Updates applied between the worker's read and this arrival (async; 0 in sync).
        staleness: u64,
        /// When.
        time: f64,
    },
    /// A gradient was dropped.
    GradientDropped {
        /// Who sent it.
        worker: WorkerId,
        /// The step it was tagged with.
        step: Step,
        /// Why.
        reason: DropReason,
        /// Seconds between the tagged step opening and this arrival.
        since_open: f64,
        /// When.
        time: f64,
    },
    /// A worker sent again a gradient the server had already accepted (its reply was lost,
    /// or it restarted mid-step): answered "already accepted", applied only once.
    GradientRepeated {
        /// Who sent it.
        worker: WorkerId,
        /// The step it was tagged with.
        step: Step,
        /// When.
        time: f64,
    },
    /// The optimizer was applied: parameters moved from `step` to `step + 1`.
    StepApplied {
        /// The step that closed.
        step: Step,
        /// Distinct workers whose gradients were averaged, sorted.
        contributors: Vec<WorkerId>,
        /// Seconds the step was open.
        duration: f64,
        /// Learning rate used.
        lr: f32,
        /// Global norm of the averaged gradient before clipping.
        grad_norm: f32,
        /// Mean of the contributors' reported losses, if any reported one.
        loss: Option<f32>,
        /// When.
        time: f64,
    },
    /// Fewer workers are alive than a step needs.
    Stalled {
        /// Workers alive now.
        live: u32,
        /// Gradients a step needs.
        needed: u32,
        /// Workers not alive, sorted.
        missing: Vec<WorkerId>,
        /// When.
        time: f64,
    },
    /// The server changed the number of gradients per step: lowered to the live workers
    /// after a stall (`on_stall = lower_aggregate`), raised back as workers return, or
    /// chosen by the adaptive policy.
    AggregateChanged {
        /// Old N.
        from: u32,
        /// New N.
        to: u32,
        /// Why, with the figures that decided it.
        #[serde(default)]
        reason: String,
        /// When.
        time: f64,
    },
    /// A driver rejected a peer's input (a [`crate::ProtocolError`]); recorded for the log.
    Rejected {
        /// Who sent it.
        worker: WorkerId,
        /// The error's message.
        reason: String,
        /// When.
        time: f64,
    },
}

impl Event {
    /// The event's time in seconds.
    pub fn time(&self) -> f64 {
        match self {
            Event::WorkerJoined { time, .. }
            | Event::WorkerLeft { time, .. }
            | Event::GradientAccepted { time, .. }
            | Event::GradientDropped { time, .. }
            | Event::GradientRepeated { time, .. }
            | Event::StepApplied { time, .. }
            | Event::Stalled { time, .. }
            | Event::AggregateChanged { time, .. }
            | Event::Rejected { time, .. } => *time,
        }
    }
}
