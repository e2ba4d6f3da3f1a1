//! End-to-end tests of `quorum train`, `quorum ps` and `quorum worker` as real processes on
//! loopback, with the synthetic model.

mod common;

use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn train_with_the_synthetic_model_writes_every_output() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let o = quorum()
        .args(["train", "--model", "synthetic:32", "--workers", "3", "--backups", "1", "--steps", "300"])
        .args(["--lr", "0.2", "--eval-every", "100", "--checkpoint-every", "100", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("sync N=2 b=1"), "{}", text(&o));
    // Workers in the server's process are on its host: gradients go through shared memory.
    assert!(text(&o).contains("through shared memory"), "{}", text(&o));
    let s = json(&out.join("summary.json"));
    assert_eq!(s["steps"], 300);
    assert_eq!(s["policy"], "sync");
    assert_eq!(s["workers"], 3);
    assert_eq!(s["backups"], 1);
    for key in ["final_test_accuracy", "wall_seconds", "steps_per_second", "dropped"] {
        assert!(s.get(key).is_some(), "summary.json lacks {key}");
    }
    assert!(s["final_test_loss"].as_f64().unwrap() < 0.05, "{s}");
    for f in ["config.toml", "events.jsonl", "metrics.csv", "arrivals.csv", "workers.csv", "timings.csv"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert!(metrics.starts_with("step,seconds,examples,train_loss,test_loss,test_accuracy\n"));
    assert!(std::fs::read_dir(out.join("tensorboard")).unwrap().count() == 1);
    let ckpt = out.join("checkpoints");
    let json_files: Vec<_> = std::fs::read_dir(&ckpt)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .collect();
    assert_eq!(json_files.len(), 3, "steps 100, 200 and the final 300, kept 3");
    assert!(ckpt.join("ckpt-0000000300.safetensors").exists());
    // The written config reads back as a config.
    let again = quorum()
        .args(["train", "--config", out.join("config.toml").to_str().unwrap(), "--print-config"])
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", text(&again));
    assert_eq!(String::from_utf8_lossy(&again.stdout), std::fs::read_to_string(out.join("config.toml")).unwrap());
}

#[test]
fn print_config_merges_file_and_flags_and_names_bad_keys() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("run.toml");
    std::fs::write(&cfg, "workers = 8\nbackups = 2\nwire = \"bf16\"\n").unwrap();
    let o =
        quorum().args(["train", "--config", cfg.to_str().unwrap(), "--lr", "0.3", "--print-config"]).output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let t: toml::Table = String::from_utf8_lossy(&o.stdout).parse().unwrap();
    assert_eq!(t["workers"].as_integer(), Some(8));
    assert_eq!(t["wire"].as_str(), Some("bf16"));
    assert!((t["lr"].as_float().unwrap() - 0.3).abs() < 1e-6);
    assert_eq!(t["model"].as_str(), Some("mlp"), "defaults are filled in");

    std::fs::write(&cfg, "workers = 8\nbakups = 2\n").unwrap();
    let o = quorum().args(["ps", "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("unknown field `bakups`") && text(&o).contains("run.toml"), "{}", text(&o));
    let o = quorum().args(["train", "--workers", "2", "--backups", "2"]).output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("backups (2) must be smaller than workers (2)"), "{}", text(&o));
    assert_eq!(text(&o).lines().count(), 1, "one-line reason: {}", text(&o));
}

#[test]
fn tf_config_that_disagrees_with_the_config_is_refused() {
    let tf = r#"{"cluster": {"ps": ["127.0.0.1:7070"], "worker": ["a:1", "b:1", "c:1"]}, "task": {"type": "worker", "index": 1}}"#;
    let o = quorum().env("TF_CONFIG", tf).args(["worker", "--model", "synthetic", "--workers", "4"]).output().unwrap();
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("this process is the worker 1") && t.contains("TF_CONFIG describes 3 workers"), "{t}");
}

#[test]
fn separate_processes_train_and_a_killed_worker_does_not_pause_training() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("ps");
    let common = ["--workers", "3", "--backups", "1", "--steps", "1500", "--delay", "const:0.002", "--lr", "0.2"];
    let (mut ps, addr) = start_ps(&common, &run);
    let mut workers: Vec<Proc> = (0..3).map(|i| start_worker(&common, &addr, i)).collect();
    wait_for_steps(&run, 20_000, Duration::from_secs(60));
    // kill -9 a worker that counted in the newest applied step, mid-run: b = 1 absorbs it.
    let victim = applied_steps(&run).last().expect("a step applied before the kill").1[0];
    workers[victim as usize].0.kill().unwrap();
    let killed_at = Instant::now();
    assert!(wait(&mut ps, Duration::from_secs(120)).success());
    assert!(killed_at.elapsed() > Duration::from_millis(100), "the run was not over when the worker died");
    for (i, w) in workers.iter_mut().enumerate() {
        if i as u64 != victim {
            assert!(wait(w, Duration::from_secs(20)).success());
        }
    }
    let s = json(&run.join("summary.json"));
    assert_eq!(s["steps"], 1500);
    assert!(s["stop_reason"].is_null(), "{s}");
    // No step waited for the dead worker: every step closed well under the 10 s worker timeout.
    let t = step_times(&run);
    let worst = t.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    assert!(worst < 2.0, "a step took {worst} s");
}

#[test]
fn sigterm_checkpoints_and_resume_finishes_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("ps");
    let common = ["--workers", "2", "--backups", "0", "--steps", "3000", "--delay", "const:0.002", "--lr", "0.2"];
    let (mut ps, addr) = start_ps(&common, &run);
    let mut workers: Vec<Proc> = (0..2).map(|i| start_worker(&common, &addr, i)).collect();
    wait_for_steps(&run, 20_000, Duration::from_secs(60));
    let st = Command::new("kill").args(["-TERM", &ps.0.id().to_string()]).status().unwrap();
    assert!(st.success());
    let status = wait(&mut ps, Duration::from_secs(30));
    assert!(!status.success(), "an interrupted run is not a finished one");
    let s = json(&run.join("summary.json"));
    let stopped_at = s["steps"].as_u64().unwrap();
    assert!(stopped_at > 0 && stopped_at < 3000, "{s}");
    assert_eq!(s["stop_reason"], "interrupted");
    assert!(run.join(format!("checkpoints/ckpt-{stopped_at:010}.safetensors")).exists());
    for w in &mut workers {
        assert!(wait(w, Duration::from_secs(20)).success(), "workers exit 0 when told to stop");
    }
    // Resume: same config, continues at the checkpointed step and finishes.
    let mut args: Vec<&str> = common.to_vec();
    args.push("--resume");
    let (mut ps, addr) = start_ps(&args, &run);
    let mut workers: Vec<Proc> = (0..2).map(|i| start_worker(&common, &addr, i)).collect();
    assert!(wait(&mut ps, Duration::from_secs(120)).success());
    let s = json(&run.join("summary.json"));
    assert_eq!(s["start_step"].as_u64(), Some(stopped_at));
    assert_eq!(s["steps"], 3000);
    assert!(s["final_test_loss"].as_f64().unwrap() < 0.05, "{s}");
    // The run's files continue the interrupted run's instead of starting over: every update
    // once, in order, with the clock and the example count going on from where they were.
    let metrics = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let rows: Vec<Vec<f64>> =
        metrics.lines().skip(1).map(|l| l.split(',').take(3).map(|x| x.parse().unwrap()).collect()).collect();
    assert_eq!(rows.iter().map(|r| r[0] as u64).collect::<Vec<_>>(), (1..=3000).collect::<Vec<_>>());
    assert!(rows.windows(2).all(|w| w[1][1] >= w[0][1] && w[1][2] > w[0][2]), "seconds and examples go on");
    let applied: Vec<u64> = events(&run)
        .into_iter()
        .filter(|v| v["event"] == "step_applied")
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(applied, (0..3000).collect::<Vec<_>>(), "events.jsonl: every update once, in order");
    for w in &mut workers {
        assert!(wait(w, Duration::from_secs(20)).success());
    }
    // Resuming a finished run says so instead of training past its end.
    let o = quorum()
        .args(["ps", "--model", "synthetic", "--listen", "127.0.0.1:0", "--out", run.to_str().unwrap(), "--resume"])
        .args(common)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("already completes this run of 3000 steps"), "{}", text(&o));
}

#[test]
fn a_server_reachable_from_other_machines_requires_a_join_token() {
    let dir = tempfile::tempdir().unwrap();
    let o = quorum()
        .env_remove("QUORUM_TOKEN")
        .args(["ps", "--model", "synthetic", "--listen", "0.0.0.0:0", "--out", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("needs a join token") && text(&o).contains("QUORUM_TOKEN"), "{}", text(&o));
    // The token never reaches the written or printed configuration.
    let o = quorum()
        .env("QUORUM_TOKEN", "0123456789abcdef-secret")
        .args(["ps", "--model", "synthetic", "--print-config"])
        .output()
        .unwrap();
    assert!(o.status.success());
    assert!(!text(&o).contains("secret"));
}

#[test]
fn kill_9_of_the_server_then_resume_completes_the_run_with_the_same_accuracy() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("ps");
    let common = ["--workers", "2", "--backups", "0", "--steps", "2000", "--delay", "const:0.002", "--lr", "0.2"];
    let mut first: Vec<&str> = common.to_vec();
    first.extend(["--checkpoint-every", "50"]);
    let (mut ps, addr) = start_ps(&first, &run);
    let killed = ps.0.id();
    // Worker 0's report goes to a file: it says how its gradients travelled.
    let report = dir.path().join("w0.out");
    let w0 = quorum()
        .args(["worker", "--model", "synthetic", "--ps", &addr, "--index", "0"])
        .args(common)
        .stdout(std::fs::File::create(&report).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut workers = vec![Proc(w0), start_worker(&common, &addr, 1)];
    let ckpt = run.join("checkpoints");
    wait_until(Duration::from_secs(60), "no checkpoint written", || checkpoint_steps(&ckpt).iter().any(|&s| s >= 100));
    ps.0.kill().unwrap(); // SIGKILL: no final checkpoint, no goodbye
    ps.0.wait().unwrap();
    let saved = checkpoint_steps(&ckpt);
    // Restart on the same address; the workers, still running, reconnect on their own.
    let mut again: Vec<&str> = first.clone();
    again.extend(["--resume", "--listen", &addr]);
    let (mut ps, _) = start_ps(&again, &run);
    assert!(wait(&mut ps, Duration::from_secs(120)).success());
    let s = json(&run.join("summary.json"));
    let resumed = s["start_step"].as_u64().unwrap();
    assert!(
        resumed > 0 && resumed.is_multiple_of(50) && saved.contains(&resumed),
        "resumed at {resumed}, saved {saved:?}"
    );
    assert_eq!(s["steps"], 2000);
    assert!(s["final_test_loss"].as_f64().unwrap() < 0.05, "{s}");
    for w in &mut workers {
        assert!(wait(w, Duration::from_secs(20)).success(), "workers reconnect and finish");
    }
    // The workers, on the server's host, pushed through its shared memory, and through the
    // restarted server's after reconnecting; the file the killed server could not remove
    // was removed by the restarted one.
    let report = std::fs::read_to_string(&report).unwrap();
    assert!(report.contains("through shared memory"), "{report}");
    if let Ok(files) = std::fs::read_dir("/dev/shm") {
        let left: Vec<_> = files
            .flatten()
            .filter(|f| f.file_name().to_string_lossy().starts_with(&format!("quorum-{killed}-")))
            .collect();
        assert!(left.is_empty(), "the killed server's shared memory is still there: {left:?}");
    }
    // The killed server never wrote metrics.csv; the resumed one rebuilt the killed run's
    // rows from its event log, so the file has every update once, in order.
    let metrics = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let steps: Vec<u64> = metrics.lines().skip(1).map(|l| l.split(',').next().unwrap().parse().unwrap()).collect();
    assert_eq!(steps, (1..=2000).collect::<Vec<_>>());
}

#[test]
fn a_frozen_worker_is_declared_gone_and_training_does_not_wait_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("ps");
    let common = ["--workers", "3", "--backups", "1", "--steps", "1500", "--delay", "const:0.002", "--lr", "0.2"];
    let mut ps_args: Vec<&str> = common.to_vec();
    ps_args.extend(["--worker-timeout", "1"]);
    let (mut ps, addr) = start_ps(&ps_args, &run);
    let mut workers: Vec<Proc> = (0..3).map(|i| start_worker(&common, &addr, i)).collect();
    wait_for_steps(&run, 20_000, Duration::from_secs(60));
    // SIGSTOP: the process stays connected but sends nothing, not even heartbeats.
    let pid = workers[1].0.id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    assert!(wait(&mut ps, Duration::from_secs(120)).success());
    let _ = Command::new("kill").args(["-CONT", &pid]).status();
    for i in [0, 2] {
        assert!(wait(&mut workers[i], Duration::from_secs(20)).success());
    }
    let s = json(&run.join("summary.json"));
    assert_eq!(s["steps"], 1500);
    let events = std::fs::read_to_string(run.join("events.jsonl")).unwrap();
    assert!(
        events.lines().any(|l| l.contains("\"worker_left\"") && l.contains("\"worker\":1") && l.contains("timed_out")),
        "the frozen worker is reported gone"
    );
    let t = step_times(&run);
    let worst = t.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    assert!(worst < 2.0, "a step took {worst} s");
}

#[test]
fn too_few_workers_stop_the_server_after_the_stall_timeout_with_a_checkpoint_naming_the_missing() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("ps");
    // N = 3 with no backups, but only workers 0 and 1 ever come.
    let common = ["--workers", "3", "--backups", "0", "--steps", "100000", "--lr", "0.2"];
    let (mut ps, addr) = spawn_ps(
        quorum()
            .args(["ps", "--model", "synthetic", "--listen", "127.0.0.1:0", "--out", run.to_str().unwrap()])
            .args(common)
            .args(["--worker-timeout", "1", "--stall-timeout", "8"])
            .stderr(Stdio::piped()),
    );
    let mut workers: Vec<Proc> = (0..2).map(|i| start_worker(&common, &addr, i)).collect();
    let started = Instant::now();
    let status = loop {
        if let Some(s) = ps.try_wait().unwrap() {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the server waited forever");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut ps.stderr.take().unwrap(), &mut err).unwrap();
    assert!(!status.success());
    assert!(err.contains("missing: w2;"), "{err}");
    let s = json(&run.join("summary.json"));
    assert_eq!(s["steps"], 0, "no step closed without N gradients");
    assert!(s["stop_reason"].as_str().unwrap().contains("w2"), "{s}");
    assert!(!checkpoint_steps(&run.join("checkpoints")).is_empty(), "a checkpoint was written at the stop");
    // The workers are told to stop and exit on their own.
    for w in &mut workers {
        assert!(wait(w, Duration::from_secs(20)).success());
    }
}

#[test]
fn a_diverging_run_stops_with_a_clear_error_and_restarts_keep_the_best_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let common = ["train", "--model", "synthetic:16", "--workers", "2", "--backups", "0", "--steps", "200"];
    // A learning rate far too large: the loss blows up and the run stops instead of stalling.
    let out = dir.path().join("diverged");
    let o = quorum().args(common).args(["--lr", "50", "--out", out.to_str().unwrap()]).output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("training diverged"), "{}", text(&o));
    assert_eq!(json(&out.join("summary.json"))["diverged"], true);
    // Every attempt diverges: an error naming the restarts file.
    let out = dir.path().join("all");
    let o =
        quorum().args(common).args(["--lr", "50", "--restarts", "2", "--out", out.to_str().unwrap()]).output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("all 2 attempts diverged"), "{}", text(&o));
    // A sane rate: both attempts finish, exactly one is kept, chosen on validation.
    let out = dir.path().join("ok");
    let o = quorum()
        .args(common)
        .args(["--lr", "0.2", "--restarts", "2", "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let csv = std::fs::read_to_string(out.join("restarts.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{csv}");
    assert_eq!(rows.iter().filter(|r| r.ends_with(",true")).count(), 1, "{csv}");
    for k in 0..2 {
        let s = json(&out.join(format!("attempt-{k}/summary.json")));
        assert_eq!(s["steps"], 200);
        assert!(s["final_validation_loss"].as_f64().is_some(), "{s}");
    }
}

#[test]
fn workers_of_a_frozen_server_say_so_keep_trying_and_carry_on_after_it_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("ps");
    let common = ["--workers", "2", "--backups", "0", "--steps", "1500", "--delay", "const:0.002", "--lr", "0.2"];
    let mut args: Vec<&str> = common.to_vec();
    // Workers take a server silent for 3 worker time-outs (3 s) for lost.
    args.extend(["--worker-timeout", "1"]);
    let (mut ps, addr) = start_ps(&args, &run);
    let logs: Vec<_> = (0..2).map(|i| dir.path().join(format!("worker{i}.log"))).collect();
    let mut workers: Vec<Proc> =
        (0..2).map(|i| start_worker_to(&args, &addr, i, std::fs::File::create(&logs[i as usize]).unwrap())).collect();
    wait_for_steps(&run, 20_000, Duration::from_secs(60));
    // SIGSTOP: the connections stay open but the server answers nothing (a half-open link).
    let pid = ps.0.id().to_string();
    assert!(Command::new("kill").args(["-STOP", &pid]).status().unwrap().success());
    // The fault lasts 6 s: longer than the workers' 3 s wait for an answer.
    std::thread::sleep(Duration::from_secs(6));
    assert!(Command::new("kill").args(["-CONT", &pid]).status().unwrap().success());
    assert!(wait(&mut ps, Duration::from_secs(120)).success());
    for w in &mut workers {
        assert!(wait(w, Duration::from_secs(30)).success(), "a worker gave up on the frozen server");
    }
    for log in &logs {
        let said = std::fs::read_to_string(log).unwrap();
        assert!(said.contains("the server is frozen or cut off"), "the worker did not say so: {said}");
    }
    let s = json(&run.join("summary.json"));
    assert_eq!(s["steps"], 1500);
    assert!(s["stop_reason"].is_null(), "{s}");
}

/// Runs `scenario` through `quorum sim` and through `quorum train` (a real cluster on
/// loopback), each into its own directory under `dir`: the run directories and the outputs,
/// the simulator's first. Either failing fails the test with its output.
fn in_sim_and_for_real(dir: &Path, scenario: &[&str]) -> [(std::path::PathBuf, String); 2] {
    ["sim", "train"].map(|mode| {
        let run = dir.join(mode);
        let o = quorum().arg(mode).args(scenario).args(["--out", run.to_str().unwrap()]).output().unwrap();
        assert!(o.status.success(), "{mode}: {}", text(&o));
        (run, text(&o))
    })
}

#[test]
fn the_simulator_and_a_real_cluster_keep_the_same_record_of_the_same_scenario() {
    // Worker 0 is 8x slower than the other two; N = 2, b = 1. Whatever drives the rule, w0
    // never contributes: it finishes its overtaken gradients and reports them late (the
    // one worker rule), ranked 3rd among its step's arrivals, and its compute time says it
    // is the slow one.
    let dir = tempfile::tempdir().unwrap();
    let scenario = [
        "--model",
        "synthetic:16",
        "--workers",
        "3",
        "--backups",
        "1",
        "--steps",
        "40",
        "--delay",
        "slow:1,8,const:0.03",
    ];
    let [(sim, _), (real, _)] = in_sim_and_for_real(dir.path(), &scenario);

    let (sim_h, sim_w) = csv_rows(&sim.join("workers.csv"));
    let (real_h, real_w) = csv_rows(&real.join("workers.csv"));
    assert_eq!(sim_h, real_h, "workers.csv has the same columns");
    for (who, w) in [("sim", &sim_w), ("real", &real_w)] {
        let n = |i: usize, c: &str| w[i][c].parse::<f64>().unwrap_or_else(|_| panic!("{who} w{i} {c}: {:?}", w[i][c]));
        assert_eq!(n(0, "accepted"), 0.0, "{who}: the slow worker never counts");
        assert!(n(0, "dropped") >= 2.0, "{who}: the slow worker reports its late gradients");
        for i in 0..3 {
            assert_eq!(
                n(i, "sent"),
                n(i, "accepted") + n(i, "dropped"),
                "{who} w{i}: every push is accepted or dropped"
            );
            assert_eq!(n(i, "abandoned"), 0.0, "{who} w{i}: a worker finishes what it starts");
        }
        assert!(n(1, "accepted") + n(2, "accepted") == 80.0, "{who}: w1 and w2 make every step");
        assert!(n(0, "mean_compute_seconds") > 4.0 * n(1, "mean_compute_seconds"), "{who}: w0 is the slow one");
        assert!(n(0, "mean_transfer_seconds") >= 0.0, "{who}: transfer is measured");
    }

    let (sim_h, sim_a) = csv_rows(&sim.join("arrivals.csv"));
    let (real_h, real_a) = csv_rows(&real.join("arrivals.csv"));
    assert_eq!(sim_h, real_h);
    for (who, a) in [("sim", &sim_a), ("real", &real_a)] {
        for r in a {
            let (k, worker, accepted) = (&r["k"], &r["worker"], &r["accepted"]);
            match worker.as_str() {
                "0" => assert_eq!((k.as_str(), accepted.as_str()), ("3", "false"), "{who}: {r:?}"),
                _ => assert!(["1", "2"].contains(&k.as_str()) && accepted == "true", "{who}: {r:?}"),
            }
        }
    }
}

#[test]
fn a_server_started_from_a_parameter_file_serves_its_values_to_workers_with_the_same_layout() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("init.safetensors");
    // The synthetic model's layout (`quorum worker --model synthetic`), with starting values it
    // would never choose itself.
    let layout = quorum_core::ParamLayout::from_shapes([("theta", vec![64])]).unwrap();
    quorum_net::params_file::write(&file, &layout, &[100.0; 64]).unwrap();
    let run = dir.path().join("ps");
    let common = ["--workers", "2", "--backups", "0", "--lr", "0.001"];
    let f = file.to_str().unwrap();

    let o = quorum().args(["ps", "--params", f, "--listen", "127.0.0.1:0"]).args(common).output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("give steps (--steps N)"), "{}", text(&o));

    let mut cmd = quorum();
    cmd.args(["ps", "--params", f, "--steps", "3", "--listen", "127.0.0.1:0", "--out", run.to_str().unwrap()]);
    let (ps, addr) = spawn_ps(cmd.args(common).stderr(Stdio::null()));
    let mut ps = Proc(ps);
    let mut workers: Vec<Proc> = (0..2).map(|i| start_worker(&common, &addr, i)).collect();
    assert!(wait(&mut ps, Duration::from_secs(60)).success());
    for w in &mut workers {
        assert!(wait(w, Duration::from_secs(20)).success());
    }
    assert_eq!(json(&run.join("summary.json"))["steps"], 3);
    let newest = checkpoint_steps(&run.join("checkpoints"));
    let ckpt = run.join("checkpoints").join(format!("ckpt-{:010}.json", newest[0]));
    let (l, values) = quorum_net::params_file::read(&ckpt).unwrap();
    assert_eq!(l, layout);
    // Three small steps from 100: the file's values were the start.
    assert!(values.iter().all(|v| (*v - 100.0).abs() < 5.0 && *v != 100.0), "{values:?}");
}

#[test]
fn the_commands_that_compute_gradients_refuse_a_parameter_file() {
    let o = quorum().args(["train", "--params", "x.safetensors", "--steps", "1"]).output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("is for `quorum ps`"), "{}", text(&o));
}

#[test]
fn the_adaptive_policy_stops_waiting_for_a_slow_worker_in_the_simulator_and_on_a_real_cluster() {
    // Worker 0 computes 8× slower than the other two. The server starts at N = 3 and, after
    // its 8-step warm-up, chooses to wait for fewer: the choice is an event with its reason,
    // the slow worker stops counting, and the learning rate follows N.
    let dir = tempfile::tempdir().unwrap();
    let scenario = [
        "--model",
        "synthetic:16",
        "--workers",
        "3",
        "--policy",
        "adaptive",
        "--steps",
        "40",
        "--lr",
        "0.3",
        "--delay",
        "slow:1,8,const:0.03",
    ];
    for (mode, (run, out)) in ["sim", "train"].into_iter().zip(in_sim_and_for_real(dir.path(), &scenario)) {
        assert!(out.contains("adaptive N=1..3"), "{mode}: {out}");
        let ev = events(&run);
        let first =
            ev.iter().position(|e| e["event"] == "aggregate_changed").unwrap_or_else(|| panic!("{mode}: no choice"));
        let change = &ev[first];
        assert_eq!(change["from"], 3, "{mode}: {change}");
        assert!(change["to"].as_u64().unwrap() < 3, "{mode}: {change}");
        assert!(change["reason"].as_str().unwrap().starts_with("adaptive: N="), "{mode}: {change}");
        let applied: Vec<&serde_json::Value> = ev.iter().filter(|e| e["event"] == "step_applied").collect();
        let before = ev[..first].iter().filter(|e| e["event"] == "step_applied").count();
        assert_eq!(before, 8, "{mode}: the first choice comes after the warm-up");
        for e in &applied[..8] {
            assert_eq!(e["contributors"].as_array().unwrap().len(), 3, "{mode}: warm-up waits for all: {e}");
            assert!((e["lr"].as_f64().unwrap() - 0.3).abs() < 1e-6, "{mode}: {e}");
        }
        for e in &applied[20..] {
            let c = e["contributors"].as_array().unwrap();
            assert!(c.len() <= 2 && !c.contains(&serde_json::json!(0)), "{mode}: the slow worker still counts: {e}");
            let want = 0.3 * c.len() as f64 / 3.0;
            assert!((e["lr"].as_f64().unwrap() - want).abs() < 1e-6, "{mode}: lr scales with N: {e}");
        }
        assert_eq!(applied.len(), 40, "{mode}");
    }
}
