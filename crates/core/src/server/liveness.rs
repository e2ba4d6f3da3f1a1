//! Liveness: who is in. A join (one live process per worker index), a leave, any message
//! proving a worker alive, and the stall rule when fewer workers are alive than a step needs
//! (N lowered, raised back, or the run stopped).

use super::{secs, Action, OnStall, Outputs, Server, StopReason};
use crate::error::ProtocolError;
use crate::event::{Event, LeaveReason};
use crate::ids::WorkerId;
use crate::policy::Policy;
use std::time::Duration;

impl Server {
    /// Any message proves the worker alive; a worker declared gone comes back.
    pub(super) fn touch(&mut self, now: Duration, w: WorkerId) -> Outputs {
        let mut out = Outputs::default();
        let slot = &mut self.slots[w.index()];
        slot.last_seen = now;
        if !slot.alive {
            slot.alive = true;
            out.events.push(Event::WorkerJoined { worker: w, time: secs(now) });
            out.extend(self.check_stall(now));
        }
        out
    }

    pub(super) fn on_join(&mut self, now: Duration, w: WorkerId, session: u64) -> Result<Outputs, ProtocolError> {
        let slot = &mut self.slots[w.index()];
        let other_live_session = slot.alive && slot.session.is_some_and(|s| s != session);
        if other_live_session && self.cfg.liveness.worker_timeout.is_some() {
            // Another process holds the index and is alive: refuse, rather than let two
            // processes (or an impostor) speak as one worker. A restarted worker gets back
            // in once the old session times out.
            return Err(ProtocolError::IndexInUse {
                worker: w,
                timeout: self.cfg.liveness.worker_timeout.unwrap_or_default(),
            });
        }
        // `accepted` stays: a restarted process that holds the index now may send again the
        // gradient its predecessor was accepted for (it was killed before the reply).
        slot.session = Some(session);
        slot.joined = true;
        let mut out = Outputs::default();
        if slot.alive {
            // A restarted worker joining again: it just needs the parameters.
            slot.last_seen = now;
        } else {
            out = self.touch(now, w);
        }
        self.slots[w.index()].sent_at = now;
        out.actions.push(Action::SendParams { to: w, step: self.step });
        Ok(out)
    }

    pub(super) fn on_leave(&mut self, now: Duration, w: WorkerId) -> Outputs {
        let mut out = Outputs::default();
        let slot = &mut self.slots[w.index()];
        if slot.alive {
            slot.alive = false;
            out.events.push(Event::WorkerLeft { worker: w, reason: LeaveReason::Left, time: secs(now) });
        }
        if self.should_close(now) {
            out.extend(self.close(now));
        }
        out.extend(self.check_stall(now));
        out
    }

    pub(super) fn live_count(&self) -> u32 {
        self.slots.iter().filter(|s| s.alive).count() as u32
    }

    /// Lowers N to the `live` workers and closes the open step if that completes it.
    pub(super) fn lower_to_live(&mut self, now: Duration, live: u32, reason: &str, out: &mut Outputs) {
        self.change_aggregate(now, live, reason.into(), out);
        if self.should_close(now) {
            out.extend(self.close(now));
        }
    }

    pub(super) fn check_stall(&mut self, now: Duration) -> Outputs {
        let mut out = Outputs::default();
        if self.stopped || matches!(self.cfg.policy, Policy::Async { .. }) {
            return out;
        }
        let live = self.live_count();
        let configured = match self.cfg.policy {
            Policy::Sync { aggregate, .. } => aggregate,
            Policy::Deadline { min, .. } | Policy::Adaptive { min, .. } => min,
            Policy::Async { .. } => 1,
        };
        // Workers came back after N was lowered: raise it again, as far as they allow.
        if self.aggregate < configured && live > self.aggregate {
            self.change_aggregate(now, live.min(configured), "workers returned: N raised back".into(), &mut out);
        }
        // Adaptive: a worker gone while training is under way lowers N at once, as far as
        // `min` allows; the rule raises it again when it sees fit.
        if self.adaptive.is_some() && self.step > 0 && live < self.aggregate && live >= configured {
            self.lower_to_live(now, live, "adaptive: workers left, N lowered to the live workers", &mut out);
        }
        let missing = || -> Vec<WorkerId> {
            self.slots.iter().enumerate().filter(|(_, s)| !s.alive).map(|(i, _)| WorkerId(i as u32)).collect()
        };
        if live >= self.aggregate {
            self.stall_since = None;
            return out;
        }
        let since = match self.stall_since {
            Some(s) => s,
            None => {
                self.stall_since = Some(now);
                // Before the first update a shortfall is workers still starting: the clock
                // runs, but only a real stall (or the time-out) is worth an event.
                if self.step > 0 {
                    out.events.push(Event::Stalled {
                        live,
                        needed: self.aggregate,
                        missing: missing(),
                        time: secs(now),
                    });
                }
                now
            }
        };
        let Some(limit) = self.cfg.liveness.stall_timeout else {
            return out;
        };
        if now < since + limit {
            return out;
        }
        match self.cfg.liveness.on_stall {
            OnStall::LowerAggregate if live >= 1 => {
                self.stall_since = None;
                self.lower_to_live(now, live, "stalled: N lowered to the live workers", &mut out);
            }
            _ => {
                self.stopped = true;
                out.actions.push(Action::Stop {
                    reason: StopReason::TooFewWorkers { live, needed: self.aggregate, missing: missing() },
                });
            }
        }
        out
    }
}
