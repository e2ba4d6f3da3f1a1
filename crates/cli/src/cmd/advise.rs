//! `quorum advise RUN_DIR`: how many of a run's machines should be backups?
//!
//! Replays the time every gradient took in a real run (its `timings.csv`: each worker's own
//! sequence of compute + transfer times) through the simulator, for every split of the same
//! machines into N aggregated + b backups, and for a few machines more; prints the projected
//! step time and gradients per second of each, and the split to use, with the reason.

use crate::config::RunConfig;
use anyhow::{bail, Context, Result};
use clap::Args;
use quorum_compute::DelayModel;
use quorum_core::{OnNewerParams, Policy};
use quorum_sim::{simulate, sweep_backups, SimConfig, SweepRow};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Fewest gradients per worker (after the warm-up) worth advising on.
const FEWEST: usize = 30;

/// A split is as good as the best when its gradients per second are within this fraction.
const AS_GOOD: f64 = 0.02;

/// Flags of `quorum advise`.
#[derive(Args, Debug)]
pub struct AdviseArgs {
    /// A run directory of `quorum train`, `ps` or `sim` (its config.toml and timings.csv).
    run: PathBuf,
    /// Also show what adding 1..=ADD machines as backups would gain.
    #[arg(long, default_value_t = 2)]
    add: u32,
    /// Steps to simulate for each split.
    #[arg(long, default_value_t = 2000)]
    steps: u64,
    /// Gradients of each worker to leave out at the start (connecting, loading data, warm caches).
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Seed of the simulation.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// Each worker's measured gradient times, in push order, after the warm-up.
fn read_timings(path: &Path, warmup: usize) -> Result<BTreeMap<u32, Vec<f64>>> {
    let mut r = csv::Reader::from_path(path).with_context(|| {
        format!("cannot read {}: advise needs a run directory written by this version of quorum", path.display())
    })?;
    let mut by_worker: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
    for row in r.deserialize::<(u32, f64, f64, f64)>() {
        let (worker, seconds, _, _) = row.with_context(|| format!("{} has a malformed row", path.display()))?;
        by_worker.entry(worker).or_default().push(seconds);
    }
    for v in by_worker.values_mut() {
        v.drain(..warmup.min(v.len()));
    }
    Ok(by_worker)
}

/// Runs `quorum advise`.
pub fn run(a: AdviseArgs) -> Result<()> {
    let cfg_path = a.run.join("config.toml");
    let text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("cannot read {}: is {} a run directory?", cfg_path.display(), a.run.display()))?;
    let cfg: RunConfig =
        toml::from_str(&text).with_context(|| format!("{} is not a run's config", cfg_path.display()))?;
    let machines = cfg.workers;
    let timings = read_timings(&a.run.join("timings.csv"), a.warmup)?;
    let silent: Vec<u32> = (0..machines).filter(|w| timings.get(w).is_none_or(|v| v.is_empty())).collect();
    if !silent.is_empty() {
        println!("note: no gradient times from worker(s) {silent:?} (dead or never started); they are left out");
    }
    let fewest = timings.iter().filter(|(_, v)| !v.is_empty()).map(|(w, v)| (v.len(), *w)).min();
    match fewest {
        None => bail!("{} holds no gradient times: nothing to advise on", a.run.display()),
        Some((n, w)) if n < FEWEST => bail!(
            "too few gradients to tell: worker {w} has {n} after the first {} (at least {FEWEST} per worker are \
             needed); run a few hundred steps and ask again",
            a.warmup
        ),
        _ => {}
    }
    let measured: Vec<(u32, Vec<f64>)> = timings.into_iter().filter(|(_, v)| !v.is_empty()).collect();
    let machines = measured.len() as u32;
    if machines < 2 {
        bail!("one machine has no backups to choose: advise needs a run with two workers or more");
    }
    // The replay file: recorded worker i is simulated worker i (and i + machines, ... for
    // machines added beyond the run's).
    let replay = std::env::temp_dir().join(format!("quorum-advise-{}.csv", std::process::id()));
    {
        let mut w = csv::Writer::from_path(&replay).context("cannot write the replay file")?;
        w.write_record(["worker", "seconds"])?;
        for (i, (_, v)) in measured.iter().enumerate() {
            for s in v {
                w.write_record([i.to_string(), s.to_string()])?;
            }
        }
        w.flush()?;
    }
    let result = advise(&a, &cfg, &measured, &replay);
    let _ = std::fs::remove_file(&replay);
    result.map(|_| ())
}

fn advise(a: &AdviseArgs, cfg: &RunConfig, measured: &[(u32, Vec<f64>)], replay: &Path) -> Result<()> {
    let machines = measured.len() as u32;
    let mut sim = SimConfig::new(
        machines,
        Policy::Sync { aggregate: machines, backups: 0 },
        a.steps,
        DelayModel::Replay(replay.to_path_buf()),
        a.seed,
    );
    // A networked worker finishes and sends an overtaken gradient (as a late notice).
    sim.on_newer = OnNewerParams::FinishAndSend;
    sim.record_events = false;
    sim.record_arrivals = false;
    let samples: usize = measured.iter().map(|(_, v)| v.len()).sum();
    let mean = measured.iter().flat_map(|(_, v)| v).sum::<f64>() / samples as f64;
    println!(
        "{}: {machines} workers, {samples} gradient times (mean {:.1} ms), replayed for {} steps per split",
        a.run.display(),
        1000.0 * mean,
        a.steps
    );
    let slowest = measured
        .iter()
        .map(|(w, v)| (*w, v.iter().sum::<f64>() / v.len() as f64))
        .max_by(|x, y| x.1.total_cmp(&y.1))
        .expect("two workers or more");
    println!("slowest worker: w{} ({:.1} ms a gradient on average)", slowest.0, 1000.0 * slowest.1);
    let rows = sweep_backups(&sim, machines, 0..machines)?;
    let base = rows[0].gradients_per_second;
    println!();
    println!(
        "{:>5} {:>4} {:>14} {:>13} {:>12} {:>9}",
        "N", "b", "mean step ms", "p99 step ms", "gradients/s", "vs b = 0"
    );
    for r in &rows {
        println!(
            "{:>5} {:>4} {:>14.1} {:>13.1} {:>12.1} {:>8.2}x",
            r.aggregate,
            r.backups,
            1000.0 * r.mean_step_seconds,
            1000.0 * r.p99_step_seconds,
            r.gradients_per_second,
            r.gradients_per_second / base
        );
    }
    let chosen = recommend(&rows);
    println!();
    println!("recommended: {}", reason(&rows, chosen));
    let run_b = match cfg.policy()? {
        Policy::Sync { backups, .. } if cfg.workers == machines => Some(backups),
        _ => None,
    };
    if let (Some(b), Some(measured_ms)) = (run_b, measured_step_ms(&a.run, a.warmup as u64)) {
        if let Some(replayed) = rows.iter().find(|r| r.backups == b) {
            println!(
                "  the run itself (N = {}, b = {b}): {measured_ms:.1} ms a step measured, {:.1} ms replayed",
                replayed.aggregate,
                1000.0 * replayed.mean_step_seconds
            );
        }
    }
    if let Some(b) = run_b.filter(|&b| b != chosen.backups) {
        if let Some(now) = rows.iter().find(|r| r.backups == b) {
            println!(
                "  (the run used N = {}, b = {b}: {:.1} gradients/s projected, {:.2}x less)",
                now.aggregate,
                now.gradients_per_second,
                chosen.gradients_per_second / now.gradients_per_second
            );
        }
    }
    if a.add > 0 {
        println!();
        println!(
            "adding machines as backups (N = {} kept; the new machines replay the measured ones in turn):",
            chosen.aggregate
        );
        for k in 1..=a.add {
            let mut more = sim.clone();
            more.server.workers = machines + k;
            more.server.policy = Policy::Sync { aggregate: chosen.aggregate, backups: chosen.backups + k };
            let r = simulate(&more, None)?;
            let gps = chosen.aggregate as f64 / r.summary.mean_step_seconds;
            println!(
                "  +{k}: {} machines, b = {}: mean step {:.1} ms, {gps:.1} gradients/s, {:.2}x now ({:.2}x per machine)",
                machines + k,
                chosen.backups + k,
                1000.0 * r.summary.mean_step_seconds,
                gps / chosen.gradients_per_second,
                (gps / (machines + k) as f64) / (chosen.gradients_per_second / machines as f64)
            );
        }
    }
    Ok(())
}

/// The run's own mean step time (its `metrics.csv`), after the first `warmup` steps.
fn measured_step_ms(run: &Path, warmup: u64) -> Option<f64> {
    let mut r = csv::Reader::from_path(run.join("metrics.csv")).ok()?;
    // The second column is the time: `seconds` (train, ps) or `virtual_seconds` (sim).
    let times: Vec<(u64, f64)> = r
        .records()
        .filter_map(|row| {
            let row = row.ok()?;
            Some((row.get(0)?.parse().ok()?, row.get(1)?.parse().ok()?))
        })
        .filter(|(step, _)| *step >= warmup)
        .collect();
    match (times.first(), times.last()) {
        (Some(first), Some(last)) if last.0 > first.0 => Some(1000.0 * (last.1 - first.1) / (last.0 - first.0) as f64),
        // A timing-only simulation writes no metrics rows: its summary has the mean.
        _ => {
            let summary: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).ok()?).ok()?;
            summary.get("mean_step_seconds")?.as_f64().map(|s| 1000.0 * s)
        }
    }
}

/// The smallest b whose gradients per second are within [`AS_GOOD`] of the best: more
/// gradients averaged per step for the same speed.
fn recommend(rows: &[SweepRow]) -> &SweepRow {
    let best = rows.iter().map(|r| r.gradients_per_second).fold(0.0, f64::max);
    rows.iter().find(|r| r.gradients_per_second >= (1.0 - AS_GOOD) * best).expect("the best is one of them")
}

/// The recommendation in one line, with why.
fn reason(rows: &[SweepRow], chosen: &SweepRow) -> String {
    let zero = &rows[0];
    let more = rows.iter().filter(|r| r.backups > chosen.backups).map(|r| r.gradients_per_second).fold(0.0, f64::max);
    let beyond = if rows.len() as u32 > chosen.backups + 1 {
        format!("; more backups: {:+.1}% at best", 100.0 * (more / chosen.gradients_per_second - 1.0))
    } else {
        String::new()
    };
    if chosen.backups == 0 {
        return format!(
            "N = {}, b = 0: no backups — the workers are even enough that waiting for all of them costs less than \
             the gradients a backup would not average{beyond}",
            chosen.aggregate
        );
    }
    format!(
        "N = {}, b = {}: {:.1} gradients/s, {:.2}x b = 0 (steps of {:.1} ms instead of {:.1} ms){beyond}",
        chosen.aggregate,
        chosen.backups,
        chosen.gradients_per_second,
        chosen.gradients_per_second / zero.gradients_per_second,
        1000.0 * chosen.mean_step_seconds,
        1000.0 * zero.mean_step_seconds
    )
}
