//! What a simulated run produces, and how it is written to a run directory.

use quorum_core::{Event, Step};
pub use quorum_record::{Arrival, WorkerStats};
use serde::Serialize;
use std::io::{BufWriter, Write};
use std::path::Path;

/// One row of `metrics.csv`: written after every update.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MetricRow {
    /// Updates applied so far.
    pub step: Step,
    /// Virtual seconds since the start.
    pub virtual_seconds: f64,
    /// Training examples in the gradients applied so far.
    pub examples: u64,
    /// Mean mini-batch loss of this update's gradients.
    pub train_loss: Option<f32>,
    /// Test loss, on evaluation steps.
    pub test_loss: Option<f32>,
    /// Test accuracy, on evaluation steps (classification only).
    pub test_accuracy: Option<f32>,
}

/// `summary.json`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Updates applied.
    pub steps: u64,
    /// Virtual seconds until the last update.
    pub virtual_seconds: f64,
    /// Mean seconds per update.
    pub mean_step_seconds: f64,
    /// Median step duration.
    pub p50_step_seconds: f64,
    /// 99th percentile step duration.
    pub p99_step_seconds: f64,
    /// Gradients dropped (late or too stale).
    pub dropped: u64,
    /// Gradients used.
    pub accepted: u64,
    /// Policy name.
    pub policy: String,
    /// Workers (N + b).
    pub workers: u32,
    /// Backup workers b.
    pub backups: u32,
    /// Mean staleness of applied gradients (async; 0 for sync).
    pub mean_staleness: f64,
    /// Training examples in applied gradients.
    pub examples: u64,
    /// Mean train loss over the last 10% of updates.
    pub final_train_loss: Option<f32>,
    /// Test loss at the end.
    pub final_test_loss: Option<f32>,
    /// Test accuracy at the end.
    pub final_test_accuracy: Option<f32>,
    /// Whether the run stopped early because its loss diverged.
    pub diverged: bool,
    /// Updates applied when test accuracy first reached the target (`None`: never, or no target).
    pub target_step: Option<u64>,
    /// Virtual seconds at that point.
    pub target_seconds: Option<f64>,
    /// Training examples at that point.
    pub target_examples: Option<u64>,
    /// Accuracy on the validation split (set when restarts chose between attempts).
    pub validation_accuracy: Option<f32>,
    /// Delay model.
    pub delay: String,
    /// Seed.
    pub seed: u64,
    /// A sharded run (`network.shards` > 1): what the one-quorum check found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shards: Option<ShardCheck>,
}

/// A sharded run's check: every shard applied the coordinator's contributors at every step
/// (the run fails otherwise), and how often each shard's own first N would have differed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShardCheck {
    /// Shards (servers) in the run.
    pub shards: u32,
    /// Steps every shard applied with exactly the coordinator's contributors.
    pub steps_agreed: u64,
    /// Steps at which some shard's first N slices (what a per-shard "first N" rule, such as
    /// TensorFlow's per-variable accumulators, would have averaged) were not the coordinator's
    /// set: there different parts of the model would have averaged different workers' work.
    /// Async: updates at which some shard's own arrival order would have applied another
    /// gradient than the coordinator's.
    pub first_n_would_differ: u64,
    /// Gradients that reached some shards but not all (a worker that died half-way through
    /// its pushes, or a slice that reached a shard after the step closed): none of them counted.
    pub partial: u64,
}

/// Everything a run produced.
#[derive(Debug, Clone)]
pub struct SimReport {
    /// Headline numbers.
    pub summary: Summary,
    /// Every event, if recorded.
    pub events: Vec<Event>,
    /// Every arrival, if recorded.
    pub arrivals: Vec<Arrival>,
    /// One row per update.
    pub metrics: Vec<MetricRow>,
    /// Per-worker counters.
    pub workers: Vec<WorkerStats>,
    /// Duration of every step, seconds.
    pub step_seconds: Vec<f64>,
    /// The final parameters.
    pub final_params: Vec<f32>,
    /// The parameters evaluation reads at the end (the EMA when evaluating on it).
    pub final_eval_params: Vec<f32>,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("cannot write {}: {e}", path.display()))
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map(|x| x.to_string()).unwrap_or_default()
}

impl SimReport {
    /// Writes `summary.json`, `events.jsonl`, `arrivals.csv`, `metrics.csv` and `workers.csv`.
    pub fn write_to(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let p = dir.join("summary.json");
        std::fs::write(&p, serde_json::to_string_pretty(&self.summary)? + "\n").map_err(|e| io_err(&p, e))?;

        let p = dir.join("events.jsonl");
        let mut w = BufWriter::new(std::fs::File::create(&p).map_err(|e| io_err(&p, e))?);
        for e in &self.events {
            serde_json::to_writer(&mut w, e)?;
            w.write_all(b"\n")?;
        }
        w.flush()?;

        let p = dir.join("arrivals.csv");
        let w = BufWriter::new(std::fs::File::create(&p).map_err(|e| io_err(&p, e))?);
        quorum_record::arrivals::write(w, &[], &self.arrivals).map_err(|e| io_err(&p, e))?;

        let p = dir.join("metrics.csv");
        let mut w = BufWriter::new(std::fs::File::create(&p).map_err(|e| io_err(&p, e))?);
        writeln!(w, "step,virtual_seconds,examples,train_loss,test_loss,test_accuracy")?;
        for m in &self.metrics {
            writeln!(
                w,
                "{},{},{},{},{},{}",
                m.step,
                m.virtual_seconds,
                m.examples,
                opt(m.train_loss),
                opt(m.test_loss),
                opt(m.test_accuracy)
            )?;
        }
        w.flush()?;

        let p = dir.join("workers.csv");
        let w = BufWriter::new(std::fs::File::create(&p).map_err(|e| io_err(&p, e))?);
        quorum_record::workers::write(w, &self.workers).map_err(|e| io_err(&p, e))?;

        let p = dir.join("timings.csv");
        let w = BufWriter::new(std::fs::File::create(&p).map_err(|e| io_err(&p, e))?);
        quorum_record::timings::write(w, &self.workers).map_err(|e| io_err(&p, e))?;
        Ok(())
    }

    /// Mean over steps of the time to the k-th accepted gradient, k = 1..=max (from arrivals).
    pub fn mean_time_to_kth(&self) -> Vec<f64> {
        let max_k = self.arrivals.iter().map(|a| a.k).max().unwrap_or(0) as usize;
        let mut sum = vec![0.0; max_k];
        let mut count = vec![0u64; max_k];
        for a in &self.arrivals {
            sum[a.k as usize - 1] += a.seconds;
            count[a.k as usize - 1] += 1;
        }
        sum.iter().zip(&count).map(|(s, &c)| if c == 0 { f64::NAN } else { s / c as f64 }).collect()
    }
}
