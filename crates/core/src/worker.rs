//! The worker's rule, the one both drivers run: the simulator's virtual workers and the
//! networked worker (`quorum worker`, `quorum train`) alike.
//!
//! A worker always computes on the newest parameters it holds. The driver tells it when
//! parameters arrive ([`Worker::on_params`]), when it hears that the server has moved on
//! without getting the parameters yet ([`Worker::on_news`]: a heartbeat's reply), and when a
//! computation finishes ([`Worker::on_computed`]); it answers with [`WorkerAction`]s.
//!
//! What happens to a computation that newer parameters have overtaken is
//! [`OnNewerParams`]. The default, [`OnNewerParams::FinishAndSend`], is what a networked
//! worker does when its computation cannot be stopped half-way (burn's engines, a PyTorch
//! worker, a sharded run): it finishes, and the overtaken gradient goes to the server as a
//! *late notice* (the step and the worker, without the values the server would drop unread)
//! when the server accepts notices, or in full when it does not. The built-in native engine
//! stops within layers, so a networked worker running it abandons where the server allows it.

use crate::ids::{Step, WorkerId};
use serde::{Deserialize, Serialize};

/// What a worker does with a computation that newer parameters have overtaken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNewerParams {
    /// Stop computing at once and start on the newer parameters: the simulator at once, a
    /// networked worker at the computation's next chance to stop (within a layer). A
    /// computation that finished before the worker heard of the newer step goes as a late
    /// notice where the server takes them.
    Abandon,
    /// Finish, report it to the server (a late notice, or the gradient in full: the paper's
    /// behaviour, the server drops it as late), then start on the newest parameters. What a
    /// networked worker does.
    #[default]
    FinishAndSend,
    /// Finish, throw the result away without telling the server, then start anew.
    FinishAndDiscard,
}

impl OnNewerParams {
    /// Every choice, as written in a configuration.
    pub const NAMES: [&'static str; 3] = ["abandon", "finish_and_send", "finish_and_discard"];

    /// Its configuration name.
    pub fn name(self) -> &'static str {
        match self {
            OnNewerParams::Abandon => Self::NAMES[0],
            OnNewerParams::FinishAndSend => Self::NAMES[1],
            OnNewerParams::FinishAndDiscard => Self::NAMES[2],
        }
    }
}

impl std::str::FromStr for OnNewerParams {
    type Err = crate::ConfigError;
    fn from_str(s: &str) -> Result<Self, crate::ConfigError> {
        match s {
            "abandon" => Ok(OnNewerParams::Abandon),
            "finish_and_send" => Ok(OnNewerParams::FinishAndSend),
            "finish_and_discard" => Ok(OnNewerParams::FinishAndDiscard),
            other => Err(crate::ConfigError::invalid(format!(
                "unknown on_newer {other:?}: expected one of {}",
                Self::NAMES.join(", ")
            ))),
        }
    }
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
    /// Tell the server the gradient of `step` is done but late, without its values (the
    /// server counts it as dropped, as it would the full gradient, and reads nothing).
    NotifyLate {
        /// The overtaken step.
        step: Step,
    },
    /// Throw away the finished gradient of `step`.
    Discard {
        /// The overtaken step.
        step: Step,
    },
    /// The worker is idle: it needs parameters newer than `step` (a networked worker asks
    /// for them; the simulated server sends them when the step closes, which is the same
    /// long-poll in virtual time).
    AwaitParams {
        /// The newest step it computed on.
        after: Step,
    },
}

/// A worker's protocol state.
#[derive(Debug, Clone)]
pub struct Worker {
    id: WorkerId,
    on_newer: OnNewerParams,
    late_notices: bool,
    /// The newest parameters it holds.
    newest: Option<Step>,
    /// The newest step it heard of (its parameters or only news of them).
    heard: Option<Step>,
    computing: Option<Step>,
    stopped: bool,
}

impl Worker {
    /// A worker that has no parameters yet. `late_notices`: the server accepts late notices
    /// ([`crate::Policy::late_notices`]); without them an overtaken gradient is sent in full.
    pub fn new(id: WorkerId, on_newer: OnNewerParams, late_notices: bool) -> Self {
        Worker { id, on_newer, late_notices, newest: None, heard: None, computing: None, stopped: false }
    }

    /// Its id.
    pub fn id(&self) -> WorkerId {
        self.id
    }

    /// The step it is computing on, if any.
    pub fn computing(&self) -> Option<Step> {
        self.computing
    }

    /// The newest parameters it has.
    pub fn newest(&self) -> Option<Step> {
        self.newest
    }

    /// Whether it stops a computation that newer parameters overtake ([`OnNewerParams::Abandon`]).
    pub fn abandons(&self) -> bool {
        self.on_newer == OnNewerParams::Abandon
    }

    /// Whether it reports overtaken gradients as late notices.
    pub fn late_notices(&self) -> bool {
        self.late_notices
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
        self.heard = self.heard.max(Some(step));
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

    /// The server is at `step` (a heartbeat's reply), its parameters not fetched yet.
    pub fn on_news(&mut self, step: Step) {
        self.heard = self.heard.max(Some(step));
    }

    /// The computation on `step` finished. A result the worker already abandoned is ignored.
    pub fn on_computed(&mut self, step: Step) -> Vec<WorkerAction> {
        if self.stopped || self.computing != Some(step) {
            return Vec::new();
        }
        self.computing = None;
        let overtaken = self.heard.is_some_and(|h| h > step);
        let report = match self.on_newer {
            _ if !overtaken => WorkerAction::Push { step },
            OnNewerParams::FinishAndSend if self.late_notices => WorkerAction::NotifyLate { step },
            OnNewerParams::FinishAndSend => WorkerAction::Push { step },
            // Abandon gets here only when it heard of, but does not hold, newer parameters:
            // the news came after the computation's last chance to stop. The work was done,
            // so the server's records should count it, as they count a stopped one.
            OnNewerParams::Abandon if self.late_notices => WorkerAction::NotifyLate { step },
            OnNewerParams::FinishAndDiscard | OnNewerParams::Abandon => WorkerAction::Discard { step },
        };
        match self.newest {
            Some(newest) if newest > step => {
                self.computing = Some(newest);
                vec![report, WorkerAction::Compute { step: newest }]
            }
            _ => vec![WorkerAction::AwaitParams { after: step }, report],
        }
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
        let mut w = Worker::new(WorkerId(0), OnNewerParams::Abandon, true);
        assert_eq!(w.on_params(0), vec![Compute { step: 0 }]);
        assert_eq!(w.on_computed(0), vec![AwaitParams { after: 0 }, Push { step: 0 }]);
        assert_eq!(w.computing(), None);
    }

    #[test]
    fn abandon_switches_to_newer_params_at_once_and_ignores_the_old_result() {
        let mut w = Worker::new(WorkerId(1), OnNewerParams::Abandon, true);
        w.on_params(3);
        assert_eq!(w.on_params(4), vec![Cancel { step: 3 }, Compute { step: 4 }]);
        assert_eq!(w.on_computed(3), vec![]);
        assert_eq!(w.on_computed(4), vec![AwaitParams { after: 4 }, Push { step: 4 }]);
    }

    #[test]
    fn finish_and_send_without_late_notices_pushes_the_late_gradient_then_computes_on_the_newest() {
        let mut w = Worker::new(WorkerId(1), OnNewerParams::FinishAndSend, false);
        w.on_params(3);
        assert_eq!(w.on_params(4), vec![]);
        assert_eq!(w.on_params(5), vec![]);
        assert_eq!(w.on_computed(3), vec![Push { step: 3 }, Compute { step: 5 }]);
    }

    #[test]
    fn finish_and_send_with_late_notices_sends_a_notice_instead_of_the_overtaken_gradient() {
        let mut w = Worker::new(WorkerId(1), OnNewerParams::default(), true);
        w.on_params(3);
        w.on_params(4);
        assert_eq!(w.on_computed(3), vec![NotifyLate { step: 3 }, Compute { step: 4 }]);
        assert_eq!(w.on_computed(4), vec![AwaitParams { after: 4 }, Push { step: 4 }]);
    }

    #[test]
    fn news_of_a_closed_step_without_its_parameters_makes_the_result_late_and_the_worker_ask_for_newer() {
        let mut w = Worker::new(WorkerId(2), OnNewerParams::FinishAndSend, true);
        w.on_params(3);
        w.on_news(5);
        assert_eq!(w.on_computed(3), vec![AwaitParams { after: 3 }, NotifyLate { step: 3 }]);
        assert_eq!(w.on_params(5), vec![Compute { step: 5 }]);
    }

    #[test]
    fn an_abandoning_worker_reports_a_gradient_finished_after_news_of_its_steps_close_as_a_late_notice() {
        // It heard of the close only after the computation's last chance to stop: the work
        // was done, and the server's records count it (the gradient itself is not sent).
        let finished_after_news = |late_notices| {
            let mut w = Worker::new(WorkerId(2), OnNewerParams::Abandon, late_notices);
            w.on_params(3);
            w.on_news(4);
            w.on_computed(3)
        };
        assert_eq!(finished_after_news(true), vec![AwaitParams { after: 3 }, NotifyLate { step: 3 }]);
        assert_eq!(finished_after_news(false), vec![AwaitParams { after: 3 }, Discard { step: 3 }], "no notices taken");
    }

    #[test]
    fn news_of_the_workers_own_step_changes_nothing() {
        let mut w = Worker::new(WorkerId(2), OnNewerParams::FinishAndSend, true);
        w.on_params(3);
        w.on_news(3);
        assert_eq!(w.on_computed(3), vec![AwaitParams { after: 3 }, Push { step: 3 }]);
    }

    #[test]
    fn on_newer_names_read_back() {
        for name in OnNewerParams::NAMES {
            assert_eq!(name.parse::<OnNewerParams>().unwrap().name(), name);
        }
        assert!("abandn".parse::<OnNewerParams>().unwrap_err().to_string().contains("finish_and_send"));
    }

    #[test]
    fn finish_and_discard_never_sends_an_overtaken_gradient() {
        let mut w = Worker::new(WorkerId(1), OnNewerParams::FinishAndDiscard, true);
        w.on_params(3);
        w.on_params(4);
        assert_eq!(w.on_computed(3), vec![Discard { step: 3 }, Compute { step: 4 }]);
    }

    #[test]
    fn old_or_repeated_params_are_ignored() {
        let mut w = Worker::new(WorkerId(0), OnNewerParams::Abandon, true);
        w.on_params(5);
        assert_eq!(w.on_params(5), vec![]);
        assert_eq!(w.on_params(2), vec![]);
    }

    #[test]
    fn stop_cancels_the_running_computation() {
        let mut w = Worker::new(WorkerId(0), OnNewerParams::Abandon, true);
        w.on_params(0);
        assert_eq!(w.on_stop(), vec![Cancel { step: 0 }]);
        assert_eq!(w.on_params(1), vec![]);
    }
}
