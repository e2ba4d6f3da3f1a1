//! End-to-end tests of the real `quorum` binary.

use std::path::Path;
use std::process::{Command, Output};

fn quorum(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_quorum")).args(args).output().expect("run quorum")
}

/// A temporary directory, removed when the test ends (pass or fail).
struct Tmp(tempfile::TempDir);

impl std::ops::Deref for Tmp {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

fn tmp(tag: &str) -> Tmp {
    Tmp(tempfile::Builder::new().prefix(&format!("quorum-cli-{tag}-")).tempdir().unwrap())
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn sim_writes_its_run_directory() {
    let dir = tmp("sim");
    let out = dir.join("run");
    let o = quorum(&[
        "sim",
        "--workers",
        "20",
        "--backups",
        "2",
        "--policy",
        "sync",
        "--delay",
        "paper",
        "--steps",
        "50",
        "--seed",
        "3",
        "--timing-only",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("sync N=18 b=2"), "{}", text(&o));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["steps"], 50);
    assert_eq!(summary["workers"], 20);
    assert_eq!(summary["backups"], 2);
    assert_eq!(summary["policy"], "sync");
    for key in ["virtual_seconds", "mean_step_seconds", "dropped"] {
        assert!(summary.get(key).is_some(), "summary.json lacks {key}");
    }
    let arrivals = std::fs::read_to_string(out.join("arrivals.csv")).unwrap();
    assert!(arrivals.starts_with("step,k,worker,seconds"));
    let step0: Vec<&str> = arrivals.lines().filter(|l| l.starts_with("0,")).collect();
    assert_eq!(step0.iter().filter(|l| l.ends_with(",true")).count(), 18, "18 gradients accepted in step 0");
    // The two backups finish their step-0 gradients too, and report them late (as real
    // workers do), ranked after the 18.
    assert_eq!(step0.len(), 20, "every worker reports step 0");
    assert!(step0.iter().filter(|l| l.ends_with(",false")).all(|l| l.starts_with("0,19,") || l.starts_with("0,20,")));
    let events = std::fs::read_to_string(out.join("events.jsonl")).unwrap();
    assert_eq!(events.lines().filter(|l| l.contains("\"step_applied\"")).count(), 50);
}

#[test]
fn the_same_seed_reproduces_the_same_files() {
    let dir = tmp("repro");
    let run = |name: &str| {
        let out = dir.join(name);
        let o = quorum(&[
            "sim",
            "--model",
            "synthetic",
            "--workers",
            "6",
            "--backups",
            "1",
            "--steps",
            "40",
            "--delay",
            "exp:1",
            "--seed",
            "9",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        std::fs::read_to_string(out.join("events.jsonl")).unwrap()
    };
    assert_eq!(run("a"), run("b"));
}

#[test]
fn sweep_prints_every_split_and_writes_csv() {
    let dir = tmp("sweep");
    let o = quorum(&[
        "sim",
        "--workers",
        "30",
        "--sweep-backups",
        "0..3",
        "--steps",
        "100",
        "--delay",
        "paper",
        "--out",
        dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let csv = std::fs::read_to_string(dir.join("sweep.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5, "header + b = 0..=3:\n{csv}");
    assert!(text(&o).contains("gradients/s"));
}

#[test]
fn unknown_config_key_is_named() {
    let dir = tmp("badkey");
    let cfg = dir.join("run.toml");
    std::fs::write(&cfg, "wrokers = 4\n").unwrap();
    let o = quorum(&["sim", "--config", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("unknown field `wrokers`") && t.contains("run.toml"), "{t}");
}

/// burn's engines are opt-in features: a build without one says how to get it, before any
/// data is read or any process started.
#[test]
#[cfg(not(feature = "wgpu"))]
fn an_engine_this_build_lacks_is_refused_with_the_feature_to_build_with() {
    let o = quorum(&["train", "--engine", "wgpu", "--steps", "5", "--out", "/nonexistent/run"]);
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("engine `wgpu` is not in this build") && t.contains("--features wgpu"), "{t}");
}

#[test]
fn bad_values_get_messages_that_say_what_to_do() {
    let t = text(&quorum(&["sim", "--delay", "gauss:1"]));
    assert!(t.contains("unknown delay model") && t.contains("exp:MEAN"), "{t}");
    let t = text(&quorum(&["sim", "--workers", "4", "--backups", "4"]));
    assert!(t.contains("backups (4) must be smaller than workers (4)"), "{t}");
    let t = text(&quorum(&["sim", "--policy", "fast"]));
    assert!(t.contains("unknown variant `fast`, expected one of `sync`, `async`, `deadline`"), "{t}");
    let t = text(&quorum(&["sim", "--model", "mlp", "--data", "/nonexistent"]));
    assert!(t.contains("fetch-data.sh"), "{t}");
}

#[test]
fn the_deadline_policy_finishes_when_its_timeout_passes_with_fewer_than_min_gradients() {
    // Once the timeout has passed with fewer than `min` gradients in, the step closes on the
    // push that brings the min-th: virtual time must go on (it used to stop at the deadline).
    let dir = tmp("deadline");
    let out = dir.join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_quorum"))
        .args(["sim", "--workers", "4", "--policy", "deadline", "--deadline-timeout", "0.5"])
        .args(["--deadline-min", "3", "--steps", "20", "--timing-only", "--out", out.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > std::time::Duration::from_secs(60) {
            let _ = child.kill();
            panic!("quorum sim with the deadline policy did not finish within 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(status.success());
    let events = std::fs::read_to_string(out.join("events.jsonl")).unwrap();
    let applied: Vec<serde_json::Value> = events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["event"] == "step_applied")
        .collect();
    assert_eq!(applied.len(), 20);
    assert!(applied.iter().all(|e| e["contributors"].as_array().unwrap().len() >= 3));
}

#[test]
fn sim_injects_the_faults_it_is_given_and_the_run_still_applies_every_step() {
    let dir = tmp("faults");
    let out = dir.join("run");
    let o = quorum(&[
        "sim",
        "--workers",
        "4",
        "--backups",
        "1",
        "--delay",
        "exp:0.5",
        "--steps",
        "100",
        "--timing-only",
        "--worker-timeout",
        "2",
        "--stall-timeout",
        "10",
        "--fault",
        "crash:1@5+1",
        "--fault",
        "freeze:2@8+4",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let events: Vec<serde_json::Value> = std::fs::read_to_string(out.join("events.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let left = |w: u64| events.iter().any(|e| e["event"] == "worker_left" && e["worker"] == w);
    assert!(left(1) && left(2), "the crashed and the frozen worker are declared gone");
    let applied = events.iter().filter(|e| e["event"] == "step_applied").count();
    assert_eq!(applied, 100);
    let bad = quorum(&["sim", "--workers", "2", "--timing-only", "--fault", "melt:1@2"]);
    assert!(!bad.status.success());
    assert!(text(&bad).contains("bad fault `melt:1@2`: use crash:W@T"), "{}", text(&bad));
}

#[test]
fn the_config_toml_a_sim_writes_reads_back_and_reruns_the_same_simulation() {
    let dir = tmp("sim-config");
    let first = dir.join("first");
    let o = quorum(&[
        "sim",
        "--workers",
        "12",
        "--backups",
        "2",
        "--delay",
        "exp:1",
        "--steps",
        "30",
        "--seed",
        "7",
        "--timing-only",
        "--fault",
        "crash:3@5+2",
        "--worker-timeout",
        "2",
        "--out",
        first.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let again = dir.join("again");
    let config = first.join("config.toml");
    let o = quorum(&["sim", "--config", config.to_str().unwrap(), "--out", again.to_str().unwrap()]);
    assert!(o.status.success(), "the written config.toml must read back: {}", text(&o));
    for f in ["summary.json", "arrivals.csv", "workers.csv", "timings.csv"] {
        let (a, b) = (std::fs::read_to_string(first.join(f)).unwrap(), std::fs::read_to_string(again.join(f)).unwrap());
        assert_eq!(a, b, "{f} differs between the run and its rerun from config.toml");
    }
}

#[test]
fn a_config_printed_by_any_command_reads_back_in_every_other() {
    let dir = tmp("cross-config");
    let stdout = |o: &std::process::Output| {
        assert!(o.status.success(), "{}", text(o));
        String::from_utf8(o.stdout.clone()).unwrap()
    };
    let train = stdout(&quorum(&[
        "train",
        "--print-config",
        "--workers",
        "6",
        "--backups",
        "2",
        "--optimizer",
        "nesterov:0.8",
        "--lr-decay",
        "exp:0.94,50",
    ]));
    let train_toml = dir.join("train.toml");
    std::fs::write(&train_toml, &train).unwrap();
    let sim = stdout(&quorum(&["sim", "--config", train_toml.to_str().unwrap(), "--print-config"]));
    assert_eq!(sim, train, "quorum sim reads quorum train's configuration to the same settings");
    // The simulator's own keys travel in a [sim] table that the cluster commands accept.
    let with_sim = stdout(&quorum(&[
        "sim",
        "--config",
        train_toml.to_str().unwrap(),
        "--latency",
        "0.01",
        "--fault",
        "crash:1@5",
        "--print-config",
    ]));
    assert!(with_sim.contains("[sim]") && with_sim.contains("crash:1@5"), "{with_sim}");
    let sim_toml = dir.join("sim.toml");
    std::fs::write(&sim_toml, &with_sim).unwrap();
    for cmd in ["train", "ps", "worker", "sim"] {
        let again = stdout(&quorum(&[cmd, "--config", sim_toml.to_str().unwrap(), "--print-config"]));
        assert_eq!(again, with_sim, "quorum {cmd} reads the configuration back unchanged");
    }
}

#[test]
fn advise_recommends_one_backup_when_one_of_four_machines_is_three_times_slower() {
    let dir = tmp("advise");
    let run = dir.join("run");
    let run_s = run.to_str().unwrap();
    let o = quorum(&[
        "sim",
        "--workers",
        "4",
        "--backups",
        "0",
        "--delay",
        "slow:1,3",
        "--timing-only",
        "--steps",
        "300",
        "--out",
        run_s,
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(run.join("timings.csv").exists());
    let o = quorum(&["advise", run_s, "--steps", "500"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    // Every split of the 4 machines, and the one to use: the slow machine as the backup.
    for split in ["    4    0", "    3    1", "    2    2", "    1    3"] {
        assert!(t.contains(split), "{t}");
    }
    assert!(t.contains("slowest worker: w0"), "{t}");
    assert!(t.contains("recommended: N = 3, b = 1"), "{t}");
    assert!(t.contains("2.25x b = 0"), "{t}");
    assert!(t.contains("the run itself (N = 4, b = 0): 3000.0 ms a step measured, 3000.0 ms replayed"), "{t}");
    assert!(t.contains("+1: 5 machines, b = 2"), "{t}");
}

#[test]
fn advise_says_when_the_data_are_too_few_to_tell() {
    let dir = tmp("advise-few");
    let run = dir.join("run");
    let run_s = run.to_str().unwrap();
    let o = quorum(&["sim", "--workers", "3", "--delay", "exp:1", "--timing-only", "--steps", "20", "--out", run_s]);
    assert!(o.status.success(), "{}", text(&o));
    let o = quorum(&["advise", run_s]);
    assert!(!o.status.success());
    assert!(text(&o).contains("too few gradients to tell"), "{}", text(&o));
    let o = quorum(&["advise", dir.to_str().unwrap()]);
    assert!(text(&o).contains("is it a run directory?") || text(&o).contains("a run directory"), "{}", text(&o));
}

#[test]
fn the_kubernetes_manifest_resolves_every_pod_to_its_role_and_a_wrong_replica_count_is_caught() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let manifest = root.join("deploy/k8s/quorum-tfjob.yaml");
    let check = |manifest: &Path| {
        Command::new("bash")
            .arg(root.join("deploy/k8s/check.sh"))
            .arg(manifest)
            .arg(env!("CARGO_BIN_EXE_quorum"))
            .output()
            .unwrap()
    };
    let o = check(&manifest);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("ok   ps-0 -> parameter server"), "{t}");
    assert!(t.contains("ok   worker-7 -> worker 7"), "{t}");
    // Seven worker pods for a configuration of eight workers: every pod is refused, named.
    let dir = tmp("k8s");
    let wrong = dir.join("wrong.yaml");
    let yaml = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&wrong, yaml.replace("    Worker:\n      replicas: 8", "    Worker:\n      replicas: 7")).unwrap();
    let o = check(&wrong);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("TF_CONFIG describes 7 workers but the configuration says workers = 8"), "{t}");
    // The sharded manifest: each PS pod is its own shard, ps-0 the coordinator.
    let sharded = root.join("deploy/k8s/quorum-sharded-tfjob.yaml");
    let o = check(&sharded);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("ok   ps-0 -> parameter server shard 0 of 2"), "{t}");
    assert!(t.contains("ok   ps-1 -> parameter server shard 1 of 2 (would run: quorum ps, shard 1 of 2, coordinator quorum-mnist-sharded-ps-0"), "{t}");
    assert!(t.contains("/runs/quorum-mnist-sharded/shard-1"), "{t}");
    // Three PS pods for a configuration of two shards: refused, named.
    let yaml = std::fs::read_to_string(&sharded).unwrap();
    std::fs::write(&wrong, yaml.replace("    PS:\n      replicas: 2", "    PS:\n      replicas: 3")).unwrap();
    let o = check(&wrong);
    let t = text(&o);
    assert!(!o.status.success(), "{t}");
    assert!(t.contains("TF_CONFIG lists 3 parameter server(s) but the configuration says shards = 2"), "{t}");
}

#[test]
fn under_slurm_the_first_tasks_are_the_shards_each_on_its_node_and_port_and_the_rest_workers() {
    let node = |procid: &str, me: &str| {
        let o = Command::new(env!("CARGO_BIN_EXE_quorum"))
            .args(["node", "--print-topology", "--shards", "2", "--workers", "3"])
            .env_remove("TF_CONFIG")
            .env("SLURM_PROCID", procid)
            .env("SLURM_NTASKS", "5")
            .env("SLURM_JOB_NODELIST", "n[1-2]")
            .env("SLURM_TASKS_PER_NODE", "1,4")
            .env("SLURMD_NODENAME", me)
            .output()
            .unwrap();
        (o.status.success(), text(&o))
    };
    let (ok, t) = node("1", "n2");
    assert!(ok, "{t}");
    assert!(t.contains("parameter server shard 1 of 2; 2 servers (shard 0 first) n1:7070,n2:7071; 3 workers"), "{t}");
    assert!(t.contains("coordinator n1:7070, listening on 0.0.0.0:7071"), "{t}");
    let (ok, t) = node("4", "n2");
    assert!(ok && t.contains("this process is the worker 2"), "{t}");
    // Task 1 placed on n1 (not the block distribution): refused, with what to do.
    let (ok, t) = node("1", "n1");
    assert!(!ok && t.contains("--distribution=block"), "{t}");
}
