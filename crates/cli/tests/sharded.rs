//! End-to-end tests of sharded runs: `quorum ps --shards 2` processes on loopback with the
//! synthetic model, their workers, and faults (a killed worker, a killed shard).

mod common;

use common::*;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

/// Shard 0 and shard 1 of a two-shard run (`common` says `--shards 2`) as `quorum ps`
/// processes writing into `run0` and `run1`; and both addresses, as workers take them.
fn start_two_shards(common: &[&str], run0: &Path, run1: &Path) -> (Proc, Proc, String) {
    let (ps0, addr0) = start_ps(&[common, &["--shard", "0"]].concat(), run0);
    let (ps1, addr1) = start_ps(&[common, &["--shard", "1", "--coordinator", &addr0]].concat(), run1);
    (ps0, ps1, format!("{addr0},{addr1}"))
}

#[test]
fn shard_processes_apply_the_same_workers_at_every_step_even_when_a_contributing_worker_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let (run0, run1) = (dir.path().join("shard-0"), dir.path().join("shard-1"));
    let common = [
        "--workers",
        "3",
        "--backups",
        "1",
        "--steps",
        "1500",
        "--delay",
        "const:0.002",
        "--lr",
        "0.2",
        "--shards",
        "2",
    ];
    let (mut ps0, mut ps1, both) = start_two_shards(&common, &run0, &run1);
    let mut workers: Vec<Proc> = (0..3).map(|i| start_worker(&common, &both, i)).collect();
    // No shard holds the whole model: an evaluator puts every shard's part together.
    let mut evaluator = Proc(
        quorum()
            .args(["evaluate", "--model", "synthetic", "--ps", &both, "--eval-every", "500"])
            .args(common)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for_steps(&run0, 20_000, Duration::from_secs(60));
    // kill -9 a worker that counted in the newest applied step, mid-run, possibly between its
    // pushes to the two shards. (Which workers come first is up to the scheduler: on a loaded
    // machine one of the three can be the late one at every step so far.)
    let victim = applied_steps(&run0).last().expect("a step applied before the kill").1[0];
    workers[victim as usize].0.kill().unwrap();
    assert!(wait(&mut ps0, Duration::from_secs(120)).success());
    assert!(wait(&mut ps1, Duration::from_secs(20)).success());
    assert!(wait(&mut evaluator, Duration::from_secs(20)).success());
    let evaluated: Vec<String> = std::fs::read_to_string(run0.join("metrics.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| l.split(',').nth(4).is_some_and(|c| !c.is_empty()))
        .map(|l| l.split(',').next().unwrap().to_string())
        .collect();
    assert_eq!(evaluated, ["500", "1000", "1500"], "test evaluations in shard 0's metrics.csv");
    let loss = json(&run0.join("summary.json"))["final_test_loss"].as_f64().expect("the final evaluation");
    assert!(loss < 0.05, "the parts put together make a trained model: test loss {loss}");
    for (i, w) in workers.iter_mut().enumerate() {
        if i as u64 != victim {
            assert!(wait(w, Duration::from_secs(20)).success());
        }
    }
    let committed = applied_steps(&run0);
    assert_eq!(committed.len(), 1500);
    assert_eq!(applied_steps(&run1), committed, "shard 1 applied other contributor sets than the coordinator");
    assert!(committed.iter().all(|(_, c)| c.len() == 2));
    let last_with_victim = committed.iter().rposition(|(_, c)| c.contains(&victim)).unwrap();
    assert!(
        last_with_victim < 1450,
        "w{victim} was killed too late to matter (last counted at step {last_with_victim})"
    );
    assert!(json(&run0.join("summary.json"))["stop_reason"].is_null());
}

#[test]
fn a_worker_given_one_address_for_a_sharded_run_is_told_to_list_every_shard() {
    let o = quorum()
        .args(["worker", "--model", "synthetic", "--shards", "2", "--ps", "127.0.0.1:1", "--index", "0"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let t = text(&o);
    assert!(t.contains("1 server address(es) for a run of shards = 2") && t.contains("shard 0 first"), "{t}");
}

#[test]
fn a_shard_killed_with_kill_9_stops_the_run_and_every_shard_resumes_from_a_step_all_of_them_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let (run0, run1) = (dir.path().join("shard-0"), dir.path().join("shard-1"));
    let common = [
        "--workers",
        "2",
        "--backups",
        "0",
        "--steps",
        "2000",
        "--delay",
        "const:0.002",
        "--lr",
        "0.2",
        "--shards",
        "2",
        "--checkpoint-every",
        "100",
    ];
    let (mut ps0, mut ps1, both) = start_two_shards(&common, &run0, &run1);
    let (addr0, addr1) = both.split_once(',').unwrap();
    let mut workers: Vec<Proc> = (0..2).map(|i| start_worker(&common, &both, i)).collect();
    wait_for_steps(&run1, 40_000, Duration::from_secs(60));
    // Two checkpoints at least (one is removed below), however slowly a loaded machine runs.
    wait_until(Duration::from_secs(60), "shard 1 wrote fewer than two checkpoints", || {
        checkpoint_steps(&run1.join("checkpoints")).len() >= 2
    });
    ps1.0.kill().unwrap();
    ps1.0.wait().unwrap();
    // The coordinator cannot close a step without shard 1: it stops and says why.
    assert!(!wait(&mut ps0, Duration::from_secs(30)).success());
    let s = json(&run0.join("summary.json"));
    let why = s["stop_reason"].as_str().unwrap_or_default().to_string();
    assert!(why.contains("shard 1"), "{s}");
    let stopped_at = s["steps"].as_u64().unwrap();
    // Every shard's newest checkpoint of a step both wrote.
    let steps = |run: &Path| -> std::collections::BTreeSet<u64> {
        checkpoint_steps(&run.join("checkpoints")).into_iter().collect()
    };
    // Shard 1 loses its newest checkpoint (as if killed before writing it), so the shards'
    // newest checkpoints differ: each taking its own would start them at different steps.
    let newest1 = *steps(&run1).last().expect("shard 1 wrote checkpoints");
    for ext in ["json", "safetensors"] {
        std::fs::remove_file(run1.join("checkpoints").join(format!("ckpt-{newest1:010}.{ext}"))).unwrap();
    }
    let resume_at = *steps(&run0).intersection(&steps(&run1)).last().expect("a step both shards checkpointed");
    assert!(resume_at > 0 && resume_at <= stopped_at, "resume at {resume_at}, stopped at {stopped_at}");
    assert!(*steps(&run0).last().unwrap() > resume_at, "shard 0 has a newer checkpoint than the common one");
    // The workers were not told to stop: they wait for the servers, which come back on the
    // same addresses, each with a plain --resume, and agree on the newest common step. Shard 1
    // starts first and waits for the coordinator; the coordinator waits for shard 1's list.
    let shard1 = ["--shard", "1", "--coordinator", addr0, "--listen", addr1, "--resume"];
    let log = |k: u32| std::fs::File::create(dir.path().join(format!("ps{k}.log"))).unwrap();
    let mut ps1 = Proc(
        quorum()
            .args(["ps", "--model", "synthetic", "--out", run1.to_str().unwrap()])
            .args([&common[..], &shard1[..]].concat())
            .stdout(Stdio::null())
            .stderr(log(1))
            .spawn()
            .unwrap(),
    );
    let mut cmd = quorum();
    cmd.args(["ps", "--model", "synthetic", "--out", run0.to_str().unwrap()]);
    cmd.args([&common[..], &["--shard", "0", "--listen", addr0, "--resume"]].concat());
    let mut ps0 = Proc(spawn_ps(cmd.stderr(log(0))).0);
    let (ok0, ok1) =
        (wait(&mut ps0, Duration::from_secs(120)).success(), wait(&mut ps1, Duration::from_secs(20)).success());
    let logs = || {
        let read = |k: u32| std::fs::read_to_string(dir.path().join(format!("ps{k}.log"))).unwrap_or_default();
        format!(
            "shard 0: {}\nshard 1: {}\nsummary: {:?}",
            read(0),
            read(1),
            std::fs::read_to_string(run0.join("summary.json"))
        )
    };
    assert!(ok0 && ok1, "a resumed shard failed: {}", logs());
    for w in &mut workers {
        assert!(wait(w, Duration::from_secs(20)).success(), "a worker did not carry on after the shards resumed");
    }
    let s = json(&run0.join("summary.json"));
    assert_eq!((s["steps"].as_u64(), s["start_step"].as_u64()), (Some(2000), Some(resume_at)), "{s}");
    let resumed = |run: &Path| -> Vec<(u64, Vec<u64>)> {
        applied_steps(run).into_iter().filter(|(t, _)| *t >= resume_at).collect()
    };
    assert_eq!(resumed(&run0).len() as u64, 2000 - resume_at);
    assert_eq!(resumed(&run1), resumed(&run0), "after the resume the shards applied other sets");
}
