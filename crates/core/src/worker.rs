//! The worker's state machine: always compute on the newest parameters it has.
//!
//! The driver tells it when parameters arrive and when a computation finishes; it answers
//! with [`WorkerAction`]s (start computing on step t, cancel, push the result, discard it).

use crate::ids::{Step, WorkerId};
use serde::{Deserialize, Serialize};

/// What a worker does with a computation that newer parameters have overtaken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNewerParams {
    /// Stop computing at once and start on the newer parameters.
    #[default]
    Abandon,
    /// Finish, push anyway (the server drops it as late: the paper's behaviour), then start anew.
    FinishAndSend,
    /// Finish, throw the result away without sending it, then start anew.
    FinishAndDiscard,
}

/// Something the driver must do for the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerAction {
    /// Start computing a gradient on the parameters of `step`.
    Compute {
        /// The parameters' step.
        step: Step,
    },
    /// Stop the computation on `step`; its result must never be used.
    Cancel {
        /// The abandoned step.
        step: Step,
    },
    /// Send the finished gradient of `step` to the server.
    Push {
        /// The gradient's tag.
        step: Step,
    },
    /// Throw away the finished gradient of `step`.
    Discard {
        /// The overtaken step.
        step: Step,
    },
}

/// A worker's protocol state.
#[derive(Debug, Clone)]
pub struct Worker {
    id: WorkerId,
    on_newer: OnNewerParams,
    newest: Option<Step>,
    computing: Option<Step>,
    stopped: bool,
}

impl Worker {
    /// A worker that has no parameters yet.
    pub fn new(id: WorkerId, on_newer: OnNewerParams) -> Self {
        Worker { id, on_newer, newest: None, computing: None, stopped: false }
    }

    /// Its id.
    pub fn id(&self) -> WorkerId {
        self.id
    }

    /// The step it is computing on, if any.
    pub fn computing(&self) -> Option<Step> {
        self.computing
    }

    /// The newest parameters it has seen.
    pub fn newest(&self) -> Option<Step> {
        self.newest
    }

    /// Whether it was told to stop.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Parameters of `step` arrived.
    pub fn on_params(&mut self, step: Step) -> Vec<WorkerAction> {
        if self.stopped || self.newest.is_some_and(|n| n >= step) {
            return Vec::new();
        }
        self.newest = Some(step);
        match self.computing {
            None => {
                self.computing = Some(step);
                vec![WorkerAction::Compute { step }]
            }
            Some(old) if self.on_newer == OnNewerParams::Abandon => {
                self.computing = Some(step);
                vec![WorkerAction::Cancel { step: old }, WorkerAction::Compute { step }]
            }
            Some(_) => Vec::new(),
        }
    }

    /// The computation on `step` finished. A result the worker already abandoned is ignored.
    pub fn on_computed(&mut self, step: Step) -> Vec<WorkerAction> {
        if self.stopped || self.computing != Some(step) {
            return Vec::new();
        }
        self.computing = None;
        let newest = self.newest.unwrap_or(step);
        let mut actions = Vec::with_capacity(2);
        if newest == step || self.on_newer == OnNewerParams::FinishAndSend {
            actions.push(WorkerAction::Push { step });
        } else {
            actions.push(WorkerAction::Discard { step });
        }
        if newest > step {
            self.computing = Some(newest);
            actions.push(WorkerAction::Compute { step: newest });
        }
        actions
    }

    /// Training is over.
    pub fn on_stop(&mut self) -> Vec<WorkerAction> {
        self.stopped = true;
        self.computing.take().map(|step| vec![WorkerAction::Cancel { step }]).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use WorkerAction::*;

    #[test]
    fn computes_on_first_params_and_pushes_when_done() {
        let mut w = Worker::new(WorkerId(0), OnNewerParams::Abandon);
        assert_eq!(w.on_params(0), vec![Compute { step: 0 }]);
        assert_eq!(w.on_computed(0), vec![Push { step: 0 }]);
        assert_eq!(w.computing(), None);
    }

    #[test]
    fn abandon_switches_to_newer_params_at_once_and_ignores_the_old_result() {
        let mut w = Worker::new(WorkerId(1), OnNewerParams::Abandon);
        w.on_params(3);
        assert_eq!(w.on_params(4), vec![Cancel { step: 3 }, Compute { step: 4 }]);
        assert_eq!(w.on_computed(3), vec![]);
        assert_eq!(w.on_computed(4), vec![Push { step: 4 }]);
    }

    #[test]
    fn finish_and_send_pushes_the_late_gradient_then_computes_on_the_newest() {
        let mut w = Worker::new(WorkerId(1), OnNewerParams::FinishAndSend);
        w.on_params(3);
        assert_eq!(w.on_params(4), vec![]);
        assert_eq!(w.on_params(5), vec![]);
        assert_eq!(w.on_computed(3), vec![Push { step: 3 }, Compute { step: 5 }]);
    }

    #[test]
    fn finish_and_discard_never_sends_an_overtaken_gradient() {
        let mut w = Worker::new(WorkerId(1), OnNewerParams::FinishAndDiscard);
        w.on_params(3);
        w.on_params(4);
        assert_eq!(w.on_computed(3), vec![Discard { step: 3 }, Compute { step: 4 }]);
    }

    #[test]
    fn old_or_repeated_params_are_ignored() {
        let mut w = Worker::new(WorkerId(0), OnNewerParams::Abandon);
        w.on_params(5);
        assert_eq!(w.on_params(5), vec![]);
        assert_eq!(w.on_params(2), vec![]);
    }

    #[test]
    fn stop_cancels_the_running_computation() {
        let mut w = Worker::new(WorkerId(0), OnNewerParams::Abandon);
        w.on_params(0);
        assert_eq!(w.on_stop(), vec![Cancel { step: 0 }]);
        assert_eq!(w.on_params(1), vec![]);
    }
}
