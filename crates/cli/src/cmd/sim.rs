//! `quorum sim`: run the deterministic simulator from flags and/or a TOML file.

use crate::config::{RunConfig, RunFlags, SimFlags};
use crate::restarts;
use anyhow::{bail, Context, Result};
use clap::Args;
use quorum_compute::{GradientSource, LeastSquares};
use quorum_core::Event;
use quorum_record::Restart;
use quorum_sim::{simulate, sweep_backups, SimConfig, SimReport};
use std::ops::RangeInclusive;

/// Flags of `quorum sim`: every key of a run's configuration (as `quorum train`), with the
/// same defaults, and the simulator's own keys (the `[sim]` table of a config file). A run's
/// `config.toml` is the resolved configuration and reads back with `--config`.
#[derive(Args, Debug)]
pub struct SimArgs {
    #[command(flatten)]
    flags: RunFlags,
    #[command(flatten)]
    sim: SimFlags,
}

/// Runs `quorum sim`.
pub fn run(args: SimArgs) -> Result<()> {
    let cfg = args.flags.resolve_with(&args.sim)?;
    if args.flags.print_config {
        print!("{}", cfg.to_toml()?);
        return Ok(());
    }
    if let Some(range) = &cfg.sim.sweep_backups {
        let mut sim = cfg.sim_config(cfg.total_steps(cfg.epoch_examples(None))?)?;
        (sim.record_events, sim.record_arrivals) = (false, false);
        return sweep(&cfg, &sim, range.0.clone());
    }
    if let Some(n) = cfg.threads {
        rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global().context("setting threads")?;
    }
    let report = if cfg.sim.timing_only {
        let sim = recorded(&cfg, cfg.sim_config(cfg.total_steps(cfg.epoch_examples(None))?)?);
        let r = simulate(&sim, None)?;
        print_summary(&sim, &r);
        r
    } else if let Some(dim) = cfg.synthetic_dim()? {
        let mut src = LeastSquares::new(dim, cfg.batch, 0.1, cfg.seed);
        let sim = recorded(&cfg, cfg.sim_config(cfg.total_steps(cfg.train_examples(&src))?)?);
        let r = attempts(&cfg, &sim, &mut src)?;
        print_summary(&sim, &r);
        println!("  distance to optimum   {:.5}", src.distance(&r.final_params));
        r
    } else {
        let mut src = cfg.source()?;
        let examples = cfg.train_examples(&*src);
        let sim = recorded(&cfg, cfg.sim_config(cfg.total_steps(examples)?)?);
        println!(
            "model {} on {}: {} parameters, {examples} training examples, batch {}, {} steps",
            cfg.model,
            cfg.dataset,
            src.layout().len(),
            cfg.batch,
            sim.steps
        );
        let r = attempts(&cfg, &sim, &mut *src)?;
        print_summary(&sim, &r);
        r
    };
    if let Some(dir) = &cfg.out {
        report.write_to(dir)?;
        cfg.write_to(dir)?;
        println!(
            "  wrote {}/{{summary.json,events.jsonl,arrivals.csv,metrics.csv,workers.csv,timings.csv,config.toml}}",
            dir.display()
        );
    }
    Ok(())
}

/// Per-event records only when a run directory will hold them.
fn recorded(cfg: &RunConfig, mut sim: SimConfig) -> SimConfig {
    (sim.record_events, sim.record_arrivals) = (cfg.out.is_some(), cfg.out.is_some());
    sim
}

/// One run, or with `restarts = K` the best of K attempts (see [`restarts::best_of`]).
fn attempts(cfg: &RunConfig, sim: &SimConfig, src: &mut dyn GradientSource) -> Result<SimReport> {
    if cfg.restarts <= 1 {
        let r = simulate(sim, Some(src))?;
        if r.summary.diverged {
            bail!(
                "training diverged at step {} (a loss was non-finite or above divergence-loss); lower --lr, \
                 add --warmup or --join-ramp, clip with --clip, or try --restarts 3",
                r.summary.steps
            );
        }
        return Ok(r);
    }
    let (report, _) = restarts::best_of(cfg.restarts, cfg.seed, cfg.out.as_deref(), |a, seed| {
        let mut c = sim.clone();
        c.seed = seed;
        let mut r = simulate(&c, Some(&mut *src))?;
        let mut row = Restart {
            attempt: a,
            seed,
            diverged: r.summary.diverged,
            steps: r.summary.steps,
            validation_loss: None,
            validation_accuracy: None,
            test_accuracy: r.summary.final_test_accuracy,
            chosen: false,
        };
        if !r.summary.diverged {
            let v = src.validate(&r.final_eval_params)?;
            (row.validation_loss, row.validation_accuracy) = (Some(v.loss), v.accuracy);
            r.summary.validation_accuracy = v.accuracy;
        }
        Ok((row, r))
    })?;
    Ok(report)
}

fn print_summary(cfg: &SimConfig, r: &SimReport) {
    let s = &r.summary;
    let shape = &cfg.server.policy;
    println!("sim: {shape}, {} workers, delay {}, seed {}", s.workers, s.delay, s.seed);
    println!("  steps                 {}", s.steps);
    println!("  virtual time          {:.2} s", s.virtual_seconds);
    println!(
        "  step time             mean {:.4} s, p50 {:.4} s, p99 {:.4} s",
        s.mean_step_seconds, s.p50_step_seconds, s.p99_step_seconds
    );
    println!("  gradients             {} accepted, {} dropped", s.accepted, s.dropped);
    if s.policy == "async" {
        println!("  mean staleness        {:.2}", s.mean_staleness);
    }
    if let Some(c) = &s.shards {
        let own = if s.policy == "async" { "arrival order" } else { "first N" };
        println!(
            "  one quorum            all {} shards applied the coordinator's contributors at all {} steps \
             (each shard's own {own} would have differed at {}; {} gradients reached some shards only)",
            c.shards, c.steps_agreed, c.first_n_would_differ, c.partial
        );
    }
    if s.policy == "adaptive" {
        let changes = r.events.iter().filter(|e| matches!(e, Event::AggregateChanged { .. })).count();
        let mean = s.accepted as f64 / s.steps.max(1) as f64;
        match changes {
            0 if r.events.is_empty() => println!("  gradients per step    mean {mean:.1}"),
            _ => println!("  gradients per step    mean {mean:.1}, N changed {changes} times (events.jsonl says why)"),
        }
    }
    // The straggler is the worker whose work was wasted most often (abandoned or dropped late).
    if let Some(w) = r.workers.iter().max_by_key(|w| (w.abandoned + w.dropped, std::cmp::Reverse(w.worker))) {
        let wasted = w.abandoned + w.dropped;
        println!(
            "  straggler             w{}: {} of {} computations wasted (abandoned or late), mean compute {:.3} s",
            w.worker,
            wasted,
            w.accepted + wasted,
            w.mean_compute().unwrap_or(f64::NAN)
        );
    }
    if let Some(l) = s.final_test_loss {
        println!("  final test loss       {l:.5}");
    }
    if let Some(a) = s.final_test_accuracy {
        println!("  final test accuracy   {:.2}%", 100.0 * a);
    }
    if let Some(t) = cfg.target {
        match (s.target_step, s.target_seconds) {
            (Some(step), Some(secs)) => {
                println!("  reached {:.2}%         at step {step}, {secs:.1} virtual s", 100.0 * t)
            }
            _ => println!("  target {:.2}%          not reached", 100.0 * t),
        }
    }
}

fn sweep(run: &RunConfig, cfg: &SimConfig, range: RangeInclusive<u32>) -> Result<()> {
    let budget = run.sim.budget.unwrap_or(run.workers);
    let rows = sweep_backups(cfg, budget, range)?;
    let base = rows.first().map(|r| r.gradients_per_second).unwrap_or(1.0);
    println!("sweep: {budget} machines, delay {}, {} steps each, seed {}", cfg.delay, cfg.steps, cfg.seed);
    println!(
        "{:>5} {:>4} {:>12} {:>10} {:>10} {:>14} {:>9}",
        "N", "b", "mean step s", "p50 s", "p99 s", "gradients/s", "vs first"
    );
    for r in &rows {
        println!(
            "{:>5} {:>4} {:>12.4} {:>10.4} {:>10.4} {:>14.2} {:>8.2}x",
            r.aggregate,
            r.backups,
            r.mean_step_seconds,
            r.p50_step_seconds,
            r.p99_step_seconds,
            r.gradients_per_second,
            r.gradients_per_second / base
        );
    }
    if let Some(dir) = &run.out {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("sweep.csv");
        let mut w = csv::Writer::from_path(&path)?;
        for r in &rows {
            w.serialize(r)?;
        }
        w.flush()?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
