//! Simulated processes' faults and liveness: crashes, restarts, freezes, slow links and
//! lagging compute injected at given virtual times, and the heartbeats a live worker sends.

use super::{at, Engine, SimEvent};
use quorum_core::{ToServer, Worker, WorkerId};
use std::time::Duration;

impl Engine<'_> {
    /// A crashed worker's new process starts: a fresh worker rule, a join in a new session.
    pub(super) fn restart(&mut self, now: Duration, id: WorkerId) {
        let w = &mut self.workers[id.index()];
        w.sm = Worker::new(id, self.cfg.on_newer, self.cfg.server.policy.late_notices());
        (w.down, w.joined, w.latest, w.computing_on) = (false, false, None, None);
        self.rule.forget_parts(id);
        let session = w.session(id);
        self.send_to_server(now, id, ToServer::Join { session });
        if let Some(beat) = self.beat_every() {
            let life = self.workers[id.index()].life;
            self.queue.push(now + beat, SimEvent::Beat { worker: id, life });
        }
    }

    /// Back from a freeze: join again (the same session), as a real worker whose link timed
    /// out does, to learn the newest step.
    pub(super) fn thaw(&mut self, now: Duration, id: WorkerId) {
        let w = &self.workers[id.index()];
        if !w.down && w.frozen_until <= now {
            let session = w.session(id);
            self.send_to_server(now, id, ToServer::Join { session });
        }
    }

    /// A live, joined, unfrozen worker heartbeats, and schedules its next beat.
    pub(super) fn beat(&mut self, now: Duration, worker: WorkerId, life: u32) {
        let w = &self.workers[worker.index()];
        if w.life == life && !w.down && !w.sm.is_stopped() {
            let joined = w.joined;
            let next = w.frozen_until.max(now) + self.beat_every().unwrap_or(Duration::from_secs(1));
            if w.frozen_until <= now && joined {
                self.send_to_server(now, worker, ToServer::Heartbeat);
            }
            self.queue.push(next, SimEvent::Beat { worker, life });
        }
    }

    /// How often workers heartbeat: a quarter of the server's worker time-out, as the real
    /// server tells its workers; none without a time-out.
    pub(super) fn beat_every(&self) -> Option<Duration> {
        self.cfg.server.liveness.worker_timeout.map(|t| t / 4)
    }

    pub(super) fn inject(&mut self, now: Duration, i: usize) {
        let f = &self.cfg.faults[i];
        let id = WorkerId(f.worker);
        let w = &mut self.workers[id.index()];
        match f.kind {
            crate::fault::FaultKind::Crash { restart_after } => {
                if w.down {
                    return;
                }
                w.down = true;
                w.life += 1;
                if let Some(r) = restart_after {
                    self.queue.push(at(now, r), SimEvent::Restart(id));
                }
            }
            crate::fault::FaultKind::Freeze { seconds } => {
                let until = at(now, seconds).max(w.frozen_until);
                w.frozen_until = until;
                self.queue.push(until, SimEvent::Thaw(id));
            }
            crate::fault::FaultKind::SlowLink { factor, seconds } => {
                w.slow = Some((factor, at(now, seconds)));
            }
            crate::fault::FaultKind::Lag { factor, seconds } => {
                w.lag = Some((factor, at(now, seconds)));
            }
        }
    }
}
