//! What the server state machine answers with: actions for the driver, events, and the
//! durable state it can be checkpointed as.

use crate::event::Event;
use crate::ids::{Step, WorkerId};
use serde::{Deserialize, Serialize};

/// Why the server stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum StopReason {
    /// `max_steps` updates were applied.
    Finished {
        /// Updates applied.
        steps: Step,
    },
    /// Too few workers stayed alive for longer than the stall timeout.
    TooFewWorkers {
        /// Workers alive.
        live: u32,
        /// Gradients a step needs.
        needed: u32,
        /// Workers not alive.
        missing: Vec<WorkerId>,
    },
}

/// Something the driver must do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Action {
    /// Send the current parameters (of `step`) to one worker.
    SendParams {
        /// Recipient.
        to: WorkerId,
        /// The parameters' step.
        step: Step,
    },
    /// Send the current parameters (of `step`) to every live worker.
    BroadcastParams {
        /// The parameters' step.
        step: Step,
    },
    /// Training is over: tell every worker to stop.
    Stop {
        /// Why.
        reason: StopReason,
    },
}

/// The result of one input.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outputs {
    /// What the driver must do, in order.
    pub actions: Vec<Action>,
    /// What happened, in order.
    pub events: Vec<Event>,
}

impl Outputs {
    /// True when nothing happened.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty() && self.events.is_empty()
    }

    pub(crate) fn extend(&mut self, other: Outputs) {
        self.actions.extend(other.actions);
        self.events.extend(other.events);
    }
}

/// The server's durable state, for checkpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerSnapshot {
    /// Current step.
    pub step: Step,
    /// Parameters.
    pub params: Vec<f32>,
    /// Parameter EMA, if kept.
    pub ema: Option<Vec<f32>>,
    /// Optimizer slots by name.
    pub optimizer_slots: Vec<(String, Vec<f32>)>,
    /// Optimizer updates so far.
    pub optimizer_updates: u64,
    /// Current N (may have been lowered after a stall).
    pub aggregate: u32,
}
