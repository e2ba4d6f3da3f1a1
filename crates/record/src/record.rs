//! The record itself: counters, arrivals, updates and per-worker statistics, built from the
//! events of a run.

use crate::arrivals::Arrival;
use crate::workers::WorkerStats;
use quorum_core::{Event, Step, WorkerId};
use std::collections::BTreeMap;

/// One applied update: a `metrics.csv` row before evaluation figures are joined to it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Update {
    /// Updates applied so far (the step just completed, counted from 1).
    pub step: Step,
    /// The driver's clock at the update (virtual or wall seconds since the start).
    pub seconds: f64,
    /// Training examples in the gradients applied so far.
    pub examples: u64,
    /// Mean mini-batch loss of this update's gradients.
    pub loss: Option<f32>,
}

/// Steps whose arrival counters are kept: a gradient tagged with an older step is rare.
const RANKED_STEPS: usize = 4096;

/// Everything a run records from its events.
#[derive(Debug, Clone)]
pub struct RunRecord {
    batch: u64,
    keep_arrivals: bool,
    /// Per worker, indexed by worker.
    pub workers: Vec<WorkerStats>,
    /// Every arrival (unless made without them).
    pub arrivals: Vec<Arrival>,
    /// Every update.
    pub updates: Vec<Update>,
    /// Seconds each step took, from its opening to its update.
    pub step_seconds: Vec<f64>,
    /// Gradients averaged.
    pub accepted: u64,
    /// Gradients dropped (late or too stale).
    pub dropped: u64,
    /// Messages refused.
    pub rejected: u64,
    /// Training examples in the gradients averaged.
    pub examples: u64,
    /// Sum of the staleness of averaged gradients (async).
    pub staleness_sum: u64,
    /// The clock at the last update.
    pub last_step_at: f64,
    /// Gradients seen so far per step: the arrival rank's counter.
    seen: BTreeMap<Step, u32>,
}

impl RunRecord {
    /// An empty record of `workers` workers whose gradients hold `batch` examples each.
    /// `keep_arrivals = false` skips `arrivals` (long sweeps that never write them).
    pub fn new(workers: u32, batch: u64, keep_arrivals: bool) -> Self {
        RunRecord {
            batch,
            keep_arrivals,
            workers: (0..workers).map(|worker| WorkerStats { worker, ..Default::default() }).collect(),
            arrivals: Vec::new(),
            updates: Vec::new(),
            step_seconds: Vec::new(),
            accepted: 0,
            dropped: 0,
            rejected: 0,
            examples: 0,
            staleness_sum: 0,
            last_step_at: 0.0,
            seen: BTreeMap::new(),
        }
    }

    fn worker(&mut self, w: WorkerId) -> Option<&mut WorkerStats> {
        self.workers.get_mut(w.index())
    }

    fn arrival(&mut self, step: Step, worker: WorkerId, seconds: f64, accepted: bool) {
        let k = self.seen.entry(step).or_insert(0);
        *k += 1;
        let k = *k;
        if self.seen.len() > RANKED_STEPS {
            self.seen.pop_first();
        }
        if self.keep_arrivals {
            self.arrivals.push(Arrival { step, k, worker: worker.0, seconds, accepted });
        }
    }

    /// Records one event; returns the number of updates applied when it is a `StepApplied`.
    pub fn observe(&mut self, e: &Event) -> Option<Step> {
        match e {
            Event::GradientAccepted { worker, step, since_open, staleness, .. } => {
                self.accepted += 1;
                self.staleness_sum += staleness;
                if let Some(w) = self.worker(*worker) {
                    w.accepted += 1;
                    w.wait_sum += since_open;
                }
                self.arrival(*step, *worker, *since_open, true);
            }
            Event::GradientDropped { worker, step, since_open, .. } => {
                self.dropped += 1;
                if let Some(w) = self.worker(*worker) {
                    w.dropped += 1;
                }
                self.arrival(*step, *worker, *since_open, false);
            }
            Event::Rejected { worker, .. } => {
                self.rejected += 1;
                if let Some(w) = self.worker(*worker) {
                    w.rejected += 1;
                }
            }
            Event::StepApplied { step, contributors, loss, time, duration, .. } => {
                self.examples += contributors.len() as u64 * self.batch;
                self.last_step_at = *time;
                self.step_seconds.push(*duration);
                let done = step + 1;
                self.updates.push(Update { step: done, seconds: *time, examples: self.examples, loss: *loss });
                return Some(done);
            }
            _ => {}
        }
        None
    }

    /// A push from `worker` reached the server, reporting `compute` seconds for its gradient
    /// and `transfer` seconds for fetching the parameters it used.
    pub fn pushed(&mut self, worker: WorkerId, compute: f64, transfer: f64) {
        if let Some(w) = self.worker(worker) {
            w.sent += 1;
            w.compute.push(compute);
            w.transfer.push(transfer);
            w.compute_sum += compute;
            w.transfer_sum += transfer;
        }
    }

    /// `worker` stopped a computation half-way, its step closed, and told the server with a
    /// late notice (a push without values, and without timings: it did not finish).
    pub fn pushed_abandoned(&mut self, worker: WorkerId) {
        if let Some(w) = self.worker(worker) {
            w.sent += 1;
            w.abandoned += 1;
        }
    }

    /// `worker` threw a computation away without sending it.
    pub fn abandoned(&mut self, worker: WorkerId) {
        if let Some(w) = self.worker(worker) {
            w.abandoned += 1;
        }
    }

    /// The worker with the highest mean compute + transfer time, and that time.
    pub fn slowest(&self) -> Option<(u32, f64)> {
        self.workers
            .iter()
            .filter(|w| !w.compute.is_empty())
            .map(|w| (w.worker, (w.compute_sum + w.transfer_sum) / w.compute.len() as f64))
            .max_by(|a, b| a.1.total_cmp(&b.1))
    }

    /// Mean staleness of the averaged gradients (0 when none).
    pub fn mean_staleness(&self) -> f64 {
        if self.accepted == 0 {
            0.0
        } else {
            self.staleness_sum as f64 / self.accepted as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quorum_core::DropReason;

    fn accepted(w: u32, step: Step, since_open: f64) -> Event {
        Event::GradientAccepted { worker: WorkerId(w), step, k: 1, since_open, staleness: 0, time: 0.0 }
    }

    fn late(w: u32, step: Step, since_open: f64) -> Event {
        Event::GradientDropped { worker: WorkerId(w), step, reason: DropReason::Late, since_open, time: 0.0 }
    }

    #[test]
    fn ranks_count_every_gradient_of_a_step_in_arrival_order_accepted_or_not() {
        let mut r = RunRecord::new(3, 8, true);
        // Async: the core ranks each accepted gradient 1 in its own update; the record ranks
        // the gradients tagged with step 0 as they came.
        for e in [accepted(0, 0, 0.1), accepted(1, 0, 0.2), late(2, 0, 0.3), accepted(2, 1, 0.1)] {
            r.observe(&e);
        }
        let ranks: Vec<(Step, u32, u32)> = r.arrivals.iter().map(|a| (a.step, a.k, a.worker)).collect();
        assert_eq!(ranks, [(0, 1, 0), (0, 2, 1), (0, 3, 2), (1, 1, 2)]);
        assert_eq!((r.accepted, r.dropped), (3, 1));
        assert_eq!(r.workers[2].dropped, 1);
        assert_eq!(r.workers[0].wait_sum, 0.1);
    }

    #[test]
    fn updates_count_examples_of_the_contributors() {
        let mut r = RunRecord::new(2, 32, false);
        let applied = Event::StepApplied {
            step: 0,
            contributors: vec![WorkerId(0), WorkerId(1)],
            duration: 0.5,
            lr: 0.1,
            grad_norm: 1.0,
            loss: Some(0.25),
            time: 0.5,
        };
        assert_eq!(r.observe(&applied), Some(1));
        assert_eq!(r.updates, [Update { step: 1, seconds: 0.5, examples: 64, loss: Some(0.25) }]);
        assert!(r.arrivals.is_empty());
    }

    #[test]
    fn the_slowest_worker_is_the_one_with_the_highest_mean_compute_plus_transfer() {
        let mut r = RunRecord::new(2, 1, false);
        r.pushed(WorkerId(0), 1.0, 0.1);
        r.pushed(WorkerId(1), 0.5, 0.1);
        r.pushed(WorkerId(1), 3.5, 0.1);
        assert_eq!(r.slowest().map(|(w, _)| w), Some(1));
        assert_eq!(r.workers[1].sent, 2);
    }
}
