//! The record of a run: events in, `events.jsonl`, `metrics.csv`, `arrivals.csv`,
//! `workers.csv`, `summary.json` and TensorBoard scalars out; continued across resumes and
//! rebuilt after a SIGKILL.

use super::service::Timing;
use super::TrainSummary;
use crate::tensorboard::EventWriter;
use quorum_compute::Evaluation;
use quorum_core::{Event, WorkerId};
use quorum_record::RunRecord;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::SystemTime;

/// Everything the run records, fed by the loop's events.
pub(super) struct Recorder {
    pub(super) out: Option<PathBuf>,
    pub(super) events: Option<std::io::BufWriter<std::fs::File>>,
    pub(super) tensorboard: Option<EventWriter>,
    pub(super) started_unix: f64,
    pub(super) evals: BTreeMap<u64, Evaluation>,
    /// Counters, arrivals, updates and per-worker statistics: the record the simulator
    /// keeps too.
    pub(super) run: RunRecord,
    /// What a resumed run keeps of the run before it.
    pub(super) earlier: Earlier,
}

pub(super) const METRICS_HEADER: &str = "step,seconds,examples,train_loss,test_loss,test_accuracy";
pub(super) const ARRIVALS_HEADER: &str = quorum_record::arrivals::HEADER;

/// The records of the run a resumed run continues, up to the checkpointed step: the new
/// run's files continue them rather than replace them.
#[derive(Default)]
pub(super) struct Earlier {
    /// metrics.csv and arrivals.csv rows (without headers).
    pub(super) metrics: Vec<String>,
    pub(super) arrivals: Vec<String>,
    /// Seconds and examples at the checkpointed step: the new rows continue from there.
    pub(super) seconds: f64,
    pub(super) examples: u64,
}

impl Earlier {
    /// Reads `dir`'s files, keeping what happened up to `step` updates; rewrites
    /// events.jsonl to end at the `step`-th update (later events belong to updates the
    /// checkpoint does not have, which the resumed run makes again).
    pub(super) fn read(dir: &std::path::Path, step: u64, workers: u32, batch: u64) -> std::io::Result<Self> {
        let read = |name: &str| match std::fs::read_to_string(dir.join(name)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
            other => other,
        };
        let mut earlier = Earlier::default();
        let mut rows_up_to = 0;
        for line in read("metrics.csv")?.lines().skip(1) {
            let mut f = line.split(',');
            let (Some(Ok(s)), Some(Ok(secs)), Some(Ok(ex))) =
                (f.next().map(str::parse::<u64>), f.next().map(str::parse::<f64>), f.next().map(str::parse::<u64>))
            else {
                continue;
            };
            if s <= step {
                earlier.metrics.push(line.to_string());
                (earlier.seconds, earlier.examples, rows_up_to) = (secs, ex, s);
            }
        }
        for line in read("arrivals.csv")?.lines().skip(1) {
            if line.split(',').next().and_then(|s| s.parse::<u64>().ok()).is_some_and(|s| s < step) {
                earlier.arrivals.push(line.to_string());
            }
        }
        // Without the `step`-th update in the file (a killed server loses its last unflushed
        // events), every complete line is kept: nothing in it is past the checkpoint.
        let events = read("events.jsonl")?;
        let mut keep = events.rfind('\n').map_or(0, |i| i + 1);
        // Where the updates metrics.csv lacks begin: after the `rows_up_to`-th.
        let mut missing_from = (rows_up_to == 0).then_some(0);
        let mut at = 0;
        for line in events.split_inclusive('\n') {
            at += line.len();
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
            if v["event"] == "step_applied" {
                let applied = v["step"].as_u64().map(|s| s + 1);
                if applied == Some(rows_up_to) {
                    missing_from = Some(at);
                }
                if applied == Some(step) {
                    keep = at;
                    break;
                }
            }
        }
        std::fs::write(dir.join("events.jsonl"), &events[..keep])?;
        // A server killed with SIGKILL never wrote metrics.csv and arrivals.csv (written when
        // a run ends): rebuild the updates it made from its events, which follow the last
        // update metrics.csv has and run on that run's own clock.
        if let Some(from) = missing_from.filter(|&from| rows_up_to < step && from <= keep) {
            let mut replay = Recorder::new(None, workers, batch, None)?;
            for line in events[from..keep].lines() {
                if let Ok(e) = serde_json::from_str::<Event>(line) {
                    replay.event(&e)?;
                }
            }
            let (t0, ex0) = (earlier.seconds, earlier.examples);
            for u in replay.run.updates.iter().filter(|u| u.step > rows_up_to && u.step <= step) {
                let loss = u.loss.map(|l| l.to_string()).unwrap_or_default();
                earlier.metrics.push(format!("{},{},{},{loss},,", u.step, t0 + u.seconds, ex0 + u.examples));
                (earlier.seconds, earlier.examples) = (t0 + u.seconds, ex0 + u.examples);
            }
            for a in replay.run.arrivals.iter().filter(|a| a.step >= rows_up_to && a.step < step) {
                earlier.arrivals.push(a.line());
            }
        }
        // Written back now, so a later crash of the resumed run loses only its own records
        // (which its events, flushed at every checkpoint, rebuild again).
        let lines = |header: &str, rows: &[String]| rows.iter().fold(format!("{header}\n"), |s, r| s + r + "\n");
        std::fs::write(dir.join("metrics.csv"), lines(METRICS_HEADER, &earlier.metrics))?;
        std::fs::write(dir.join("arrivals.csv"), lines(ARRIVALS_HEADER, &earlier.arrivals))?;
        Ok(earlier)
    }
}

impl Recorder {
    /// `resumed_at`: the step a resumed run starts from (its files continue the earlier run's).
    pub(super) fn new(
        out: Option<PathBuf>,
        workers: u32,
        batch: u64,
        resumed_at: Option<u64>,
    ) -> std::io::Result<Self> {
        let started_unix = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        let mut earlier = Earlier::default();
        let (events, tensorboard) = match &out {
            Some(dir) => {
                std::fs::create_dir_all(dir)?;
                let path = dir.join("events.jsonl");
                let file = match resumed_at {
                    Some(step) => {
                        earlier = Earlier::read(dir, step, workers, batch)?;
                        std::fs::OpenOptions::new().append(true).create(true).open(path)?
                    }
                    None => std::fs::File::create(path)?,
                };
                (
                    Some(std::io::BufWriter::new(file)),
                    Some(EventWriter::create(&dir.join("tensorboard"), started_unix)?),
                )
            }
            None => (None, None),
        };
        Ok(Recorder {
            out,
            events,
            tensorboard,
            started_unix,
            evals: BTreeMap::new(),
            run: RunRecord::new(workers, batch, true),
            earlier,
        })
    }

    pub(super) fn flush_events(&mut self) -> std::io::Result<()> {
        match self.events.as_mut() {
            Some(f) => f.flush(),
            None => Ok(()),
        }
    }

    pub(super) fn log(&mut self, e: &Event) -> std::io::Result<()> {
        if let Some(f) = self.events.as_mut() {
            serde_json::to_writer(&mut *f, e).map_err(std::io::Error::other)?;
            f.write_all(b"\n")?;
        }
        Ok(())
    }

    /// A push the core took (accepted or dropped): its worker's compute and transfer seconds,
    /// or, for a computation stopped half-way, only the count.
    pub(super) fn pushed(&mut self, worker: WorkerId, t: Timing) {
        match t.abandoned {
            true => self.run.pushed_abandoned(worker),
            false => self.run.pushed(worker, t.compute, t.transfer),
        }
    }

    pub(super) fn evaluation(&mut self, step: u64, e: Evaluation) -> std::io::Result<()> {
        if let Some(tb) = self.tensorboard.as_mut() {
            let mut v = vec![("test/loss", e.loss)];
            if let Some(a) = e.accuracy {
                v.push(("test/accuracy", a));
            }
            tb.scalars(self.started_unix + self.run.last_step_at, step, &v)?;
        }
        self.evals.insert(step, e);
        Ok(())
    }

    /// Records one event; returns the step just completed when it is a `StepApplied`.
    pub(super) fn event(&mut self, e: &Event) -> std::io::Result<Option<u64>> {
        self.log(e)?;
        if let Event::AggregateChanged { from, to, reason, .. } = e {
            tracing::info!("gradients per step: {from} -> {to} ({reason})");
        }
        let done = self.run.observe(e);
        if let (Some(done), Some(tb), Event::StepApplied { loss, time, duration, contributors, .. }) =
            (done, self.tensorboard.as_mut(), e)
        {
            let mut v = vec![
                ("train/step_seconds", *duration as f32),
                ("train/dropped", self.run.dropped as f32),
                ("train/gradients_per_step", contributors.len() as f32),
            ];
            if let Some(l) = loss {
                v.push(("train/loss", *l));
            }
            tb.scalars(self.started_unix + time, done, &v)?;
        }
        Ok(done)
    }

    pub(super) fn write_files(&mut self, summary: &TrainSummary) -> std::io::Result<()> {
        let Some(dir) = self.out.clone() else { return Ok(()) };
        if let Some(f) = self.events.as_mut() {
            f.flush()?;
        }
        if let Some(tb) = self.tensorboard.as_mut() {
            tb.flush()?;
        }
        let opt = |v: Option<f32>| v.map(|x| x.to_string()).unwrap_or_default();
        let mut m = std::io::BufWriter::new(std::fs::File::create(dir.join("metrics.csv"))?);
        writeln!(m, "{METRICS_HEADER}")?;
        for row in &self.earlier.metrics {
            writeln!(m, "{row}")?;
        }
        // A resumed run continues the earlier run's clock and example count.
        let (t0, ex0) = (self.earlier.seconds, self.earlier.examples);
        for u in &self.run.updates {
            let e = self.evals.get(&u.step);
            writeln!(
                m,
                "{},{},{},{},{},{}",
                u.step,
                u.seconds + t0,
                u.examples + ex0,
                opt(u.loss),
                opt(e.map(|e| e.loss)),
                opt(e.and_then(|e| e.accuracy))
            )?;
        }
        m.flush()?;
        let a = std::io::BufWriter::new(std::fs::File::create(dir.join("arrivals.csv"))?);
        quorum_record::arrivals::write(a, &self.earlier.arrivals, &self.run.arrivals)?;
        let w = std::io::BufWriter::new(std::fs::File::create(dir.join("workers.csv"))?);
        quorum_record::workers::write(w, &self.run.workers)?;
        let t = std::io::BufWriter::new(std::fs::File::create(dir.join("timings.csv"))?);
        quorum_record::timings::write(t, &self.run.workers)?;
        std::fs::write(
            dir.join("summary.json"),
            serde_json::to_string_pretty(summary).map_err(std::io::Error::other)? + "\n",
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_run_keeps_the_earlier_records_up_to_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let metrics: String = (1..=5).map(|s| format!("{s},{}.5,{},0.1,,\n", s, 32 * s)).collect();
        std::fs::write(
            d.join("metrics.csv"),
            format!("step,seconds,examples,train_loss,test_loss,test_accuracy\n{metrics}"),
        )
        .unwrap();
        let arrivals: String = (0..5).map(|s| format!("{s},1,0,0.01,true\n")).collect();
        std::fs::write(d.join("arrivals.csv"), format!("step,k,worker,seconds,accepted\n{arrivals}")).unwrap();
        let line = |s: u64| {
            format!("{{\"event\":\"gradient_accepted\",\"step\":{s}}}\n{{\"event\":\"step_applied\",\"step\":{s}}}\n")
        };
        let events: String = (0..5).map(line).collect();
        std::fs::write(d.join("events.jsonl"), &events).unwrap();

        let e = Earlier::read(d, 3, 1, 32).unwrap();
        assert_eq!(e.metrics.len(), 3);
        assert_eq!((e.seconds, e.examples), (3.5, 96));
        assert_eq!(e.arrivals, ["0,1,0,0.01,true", "1,1,0,0.01,true", "2,1,0,0.01,true"]);
        let kept = std::fs::read_to_string(d.join("events.jsonl")).unwrap();
        assert_eq!(kept, (0..3).map(line).collect::<String>(), "events end at the 3rd update");

        // A killed server's log may stop before the checkpointed update, mid-line: the
        // complete lines are kept, the torn one is not.
        std::fs::write(d.join("events.jsonl"), format!("{}{{\"event\":\"step_ap", line(0))).unwrap();
        Earlier::read(d, 3, 1, 32).unwrap();
        assert_eq!(std::fs::read_to_string(d.join("events.jsonl")).unwrap(), line(0));
    }

    #[test]
    fn after_a_sigkill_the_records_the_killed_run_never_wrote_are_rebuilt_from_its_events() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // A first run stopped cleanly after 2 updates (its rows and events), then a resumed
        // run made updates 3..=5 on its own clock and was killed before writing any rows.
        std::fs::write(d.join("metrics.csv"), format!("{METRICS_HEADER}\n1,1,32,0.5,,\n2,2,64,0.4,0.3,0.9\n")).unwrap();
        std::fs::write(d.join("arrivals.csv"), format!("{ARRIVALS_HEADER}\n0,1,0,0.1,true\n1,1,0,0.1,true\n")).unwrap();
        let w = WorkerId(0);
        let update = |step: u64, time: f64| {
            [
                Event::GradientAccepted { worker: w, step, k: 1, since_open: 0.25, staleness: 0, time },
                Event::StepApplied {
                    step,
                    contributors: vec![w],
                    duration: 0.25,
                    lr: 0.1,
                    grad_norm: 1.0,
                    loss: Some(0.125),
                    time,
                },
            ]
        };
        let events: String = [update(0, 1.0), update(1, 2.0), update(2, 0.5), update(3, 1.0), update(4, 1.5)]
            .iter()
            .flatten()
            .map(|e| serde_json::to_string(e).unwrap() + "\n")
            .collect();
        std::fs::write(d.join("events.jsonl"), events).unwrap();

        // Resumed again from the checkpoint at 4 updates.
        let e = Earlier::read(d, 4, 1, 32).unwrap();
        assert_eq!(e.metrics, ["1,1,32,0.5,,", "2,2,64,0.4,0.3,0.9", "3,2.5,96,0.125,,", "4,3,128,0.125,,"]);
        assert_eq!((e.seconds, e.examples), (3.0, 128));
        assert_eq!(e.arrivals.len(), 4);
        assert_eq!(e.arrivals[3], "3,1,0,0.25,true");
        // Written back at once, and the log cut after the 4th update.
        let metrics = std::fs::read_to_string(d.join("metrics.csv")).unwrap();
        assert!(metrics.ends_with("3,2.5,96,0.125,,\n4,3,128,0.125,,\n"), "{metrics}");
        let log = std::fs::read_to_string(d.join("events.jsonl")).unwrap();
        assert_eq!(log.lines().count(), 8);
    }
}
