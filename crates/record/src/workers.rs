//! `workers.csv`: what each worker sent, what became of it, and how long it took.

use crate::stats::{mean, quantile};
use serde::Serialize;
use std::io::Write;

/// One worker's counters and timing samples.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerStats {
    /// The worker.
    pub worker: u32,
    /// Gradients (and late notices) it pushed.
    pub sent: u64,
    /// Gradients the server averaged.
    pub accepted: u64,
    /// Gradients dropped (late or too stale).
    pub dropped: u64,
    /// Messages the server refused (a protocol error: wrong session, bad length, ...).
    pub rejected: u64,
    /// Computations given up: a simulated `abandon` or `finish_and_discard` worker's, never
    /// sent; a networked worker's, stopped half-way when its step closed without it and told
    /// the server with a late notice (so also among `sent` and `dropped`, without timings).
    pub abandoned: u64,
    /// Sum of seconds from the step's opening to each accepted gradient.
    pub wait_sum: f64,
    /// Seconds each pushed gradient took to compute.
    pub compute: Vec<f64>,
    /// Seconds fetching the parameters each pushed gradient was computed on.
    pub transfer: Vec<f64>,
    /// Running sums of `compute` and `transfer`, so the live "slowest worker" costs O(workers).
    pub compute_sum: f64,
    /// See `compute_sum`.
    pub transfer_sum: f64,
}

/// A `workers.csv` row: a statistic is empty where there are no samples (a worker that never
/// sent), never a made-up 0 or NaN.
#[derive(Serialize)]
struct Row {
    worker: u32,
    sent: u64,
    accepted: u64,
    dropped: u64,
    rejected: u64,
    abandoned: u64,
    mean_wait_seconds: Option<f64>,
    mean_compute_seconds: Option<f64>,
    p50_compute_seconds: Option<f64>,
    p99_compute_seconds: Option<f64>,
    mean_transfer_seconds: Option<f64>,
    p50_transfer_seconds: Option<f64>,
    p99_transfer_seconds: Option<f64>,
}

fn stat(v: &[f64], f: impl Fn(&[f64]) -> f64) -> Option<f64> {
    (!v.is_empty()).then(|| f(v))
}

impl WorkerStats {
    /// Mean compute seconds of its pushes (`None` before the first).
    pub fn mean_compute(&self) -> Option<f64> {
        stat(&self.compute, mean)
    }

    /// Median compute seconds of its pushes.
    pub fn p50_compute(&self) -> Option<f64> {
        stat(&self.compute, |v| quantile(v, 0.5))
    }

    /// 99th-percentile compute seconds of its pushes.
    pub fn p99_compute(&self) -> Option<f64> {
        stat(&self.compute, |v| quantile(v, 0.99))
    }

    fn row(&self) -> Row {
        Row {
            worker: self.worker,
            sent: self.sent,
            accepted: self.accepted,
            dropped: self.dropped,
            rejected: self.rejected,
            abandoned: self.abandoned,
            mean_wait_seconds: (self.accepted > 0).then(|| self.wait_sum / self.accepted as f64),
            mean_compute_seconds: self.mean_compute(),
            p50_compute_seconds: self.p50_compute(),
            p99_compute_seconds: self.p99_compute(),
            mean_transfer_seconds: stat(&self.transfer, mean),
            p50_transfer_seconds: stat(&self.transfer, |v| quantile(v, 0.5)),
            p99_transfer_seconds: stat(&self.transfer, |v| quantile(v, 0.99)),
        }
    }
}

/// Writes `workers.csv`, one row per worker.
pub fn write(w: impl Write, workers: &[WorkerStats]) -> std::io::Result<()> {
    let mut c = csv::Writer::from_writer(w);
    for s in workers {
        c.serialize(s.row()).map_err(std::io::Error::other)?;
    }
    c.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_that_never_sent_has_empty_statistics_not_zeros() {
        let mut out = Vec::new();
        let busy = WorkerStats {
            worker: 0,
            sent: 2,
            accepted: 1,
            wait_sum: 0.5,
            compute: vec![1.0, 3.0],
            ..Default::default()
        };
        write(&mut out, &[busy, WorkerStats { worker: 1, ..Default::default() }]).unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "worker,sent,accepted,dropped,rejected,abandoned,mean_wait_seconds,mean_compute_seconds,\
             p50_compute_seconds,p99_compute_seconds,mean_transfer_seconds,p50_transfer_seconds,p99_transfer_seconds"
        );
        assert_eq!(lines[1], "0,2,1,0,0,0,0.5,2.0,1.0,3.0,,,");
        assert_eq!(lines[2], "1,0,0,0,0,0,,,,,,,");
    }
}
