//! What the end-to-end tests share: the `quorum` binary, its processes (`quorum ps` on port 0
//! and the address it prints, workers, waiting with a limit), and reading a run's record.
// Each test crate uses part of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn quorum() -> Command {
    Command::new(env!("CARGO_BIN_EXE_quorum"))
}

pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

pub fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// Seconds of each applied step from metrics.csv.
pub fn step_times(run: &Path) -> Vec<f64> {
    let m = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    m.lines().skip(1).map(|l| l.split(',').nth(1).unwrap().parse().unwrap()).collect()
}

/// The run's events, parsed; a line still being written (no newline yet) is left out, so a
/// running server's record can be read.
pub fn events(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("events.jsonl")).unwrap();
    text.split_inclusive('\n').filter(|l| l.ends_with('\n')).map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Each applied step of a run directory: (step, contributors).
pub fn applied_steps(run: &Path) -> Vec<(u64, Vec<u64>)> {
    events(run)
        .into_iter()
        .filter(|e| e["event"] == "step_applied")
        .map(|e| {
            let c = e["contributors"].as_array().unwrap().iter().map(|w| w.as_u64().unwrap()).collect();
            (e["step"].as_u64().unwrap(), c)
        })
        .collect()
}

/// A child process, killed and reaped when dropped (a failing test leaves none behind).
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `quorum ps` on port 0 and returns it with the address it printed.
pub fn start_ps(args: &[&str], out: &Path) -> (Proc, String) {
    let mut cmd = quorum();
    cmd.args(["ps", "--model", "synthetic", "--out", out.to_str().unwrap()]);
    if !args.contains(&"--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    let (child, addr) = spawn_ps(cmd.args(args).stderr(Stdio::null()));
    (Proc(child), addr)
}

/// Spawns a `quorum ps` command and reads the address it prints.
pub fn spawn_ps(cmd: &mut Command) -> (Child, String) {
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("ps prints its address").unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

pub fn start_worker(args: &[&str], addr: &str, index: u32) -> Proc {
    start_worker_to(args, addr, index, Stdio::null())
}

/// A `quorum worker` whose standard error goes to `stderr` (a log the test reads).
pub fn start_worker_to(args: &[&str], addr: &str, index: u32, stderr: impl Into<Stdio>) -> Proc {
    Proc(
        quorum()
            .args(["worker", "--model", "synthetic", "--ps", addr, "--index", &index.to_string()])
            .args(args)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    )
}

pub fn wait(p: &mut Proc, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = p.0.try_wait().unwrap() {
            return s;
        }
        assert!(start.elapsed() < limit, "process did not exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `done` every 20 ms until it holds; fails the test with `what` after `limit`.
pub fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_for_steps(run: &Path, events_min: usize, limit: Duration) {
    wait_until(limit, "training did not start", || {
        std::fs::read_to_string(run.join("events.jsonl")).map_or(0, |e| e.len()) >= events_min
    });
}

pub fn checkpoint_steps(dir: &Path) -> Vec<u64> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let n = e.file_name().into_string().ok()?;
                    n.strip_prefix("ckpt-")?.strip_suffix(".json")?.parse().ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `(header, rows)` of a CSV file as maps from column to cell.
pub fn csv_rows(path: &Path) -> (String, Vec<std::collections::BTreeMap<String, String>>) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines();
    let header = lines.next().unwrap().to_string();
    let cols: Vec<&str> = header.split(',').collect();
    let rows =
        lines.map(|l| cols.iter().map(|c| c.to_string()).zip(l.split(',').map(String::from)).collect()).collect();
    (header, rows)
}
