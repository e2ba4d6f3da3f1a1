//! `timings.csv`: every gradient's time, worker by worker in the order pushed — the raw
//! samples behind `workers.csv`'s means and percentiles. Its `worker,seconds` columns make it
//! a delay file the simulator replays (`--delay replay:timings.csv`), and `quorum advise`
//! replays it to choose the number of backups.

use crate::workers::WorkerStats;
use serde::Serialize;
use std::io::Write;

#[derive(Serialize)]
struct Row {
    worker: u32,
    /// compute + transfer: the time the worker took for this gradient.
    seconds: f64,
    compute_seconds: f64,
    transfer_seconds: f64,
}

/// Writes `timings.csv`: one row per pushed gradient, grouped by worker, in push order.
pub fn write(w: impl Write, workers: &[WorkerStats]) -> std::io::Result<()> {
    let mut c = csv::Writer::from_writer(w);
    for s in workers {
        for (i, &compute) in s.compute.iter().enumerate() {
            let transfer = s.transfer.get(i).copied().unwrap_or(0.0);
            let row = Row {
                worker: s.worker,
                seconds: compute + transfer,
                compute_seconds: compute,
                transfer_seconds: transfer,
            };
            c.serialize(row).map_err(std::io::Error::other)?;
        }
    }
    c.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_push_is_a_row_with_its_total_time_grouped_by_worker() {
        let a = WorkerStats { worker: 0, compute: vec![1.0, 3.0], transfer: vec![0.5, 0.25], ..Default::default() };
        let b = WorkerStats { worker: 1, compute: vec![2.0], transfer: vec![0.0], ..Default::default() };
        let mut out = Vec::new();
        write(&mut out, &[a, b, WorkerStats { worker: 2, ..Default::default() }]).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            "worker,seconds,compute_seconds,transfer_seconds\n0,1.5,1.0,0.5\n0,3.25,3.0,0.25\n1,2.0,2.0,0.0\n"
        );
    }
}
