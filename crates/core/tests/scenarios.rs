//! Protocol scenarios as text files: every unindented line is an input, the indented lines
//! below it are what the server answered. The test replays each file and compares.
//! After an intended behaviour change, `QUORUM_BLESS=1 cargo test -p quorum-core --test scenarios`
//! rewrites the expectations; review the diff before committing.
//!
//! Inputs:
//! - `config key=value ...` (first): workers, policy (sync|async|deadline|adaptive), aggregate,
//!   backups, min, max, timeout, max_staleness, params, lr, optimizer (sgd), clip, worker_timeout,
//!   stall_timeout, on_stall (stop|lower), max_steps
//! - `at T wK join|heartbeat|leave`, `at T wK push STEP v1,v2,... [loss]`, `at T tick`
//! - `at T wK join SESSION` joins as another process (by default the session is K).
//! - `state`: prints step, parameters and live workers; `wakeup`: the next time a tick is due.

use quorum_core::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

fn parse_config(line: &str) -> (ServerConfig, usize) {
    let kv: BTreeMap<&str, &str> =
        line.split_whitespace().skip(1).map(|p| p.split_once('=').expect("key=value")).collect();
    let get = |k: &str| kv.get(k).copied();
    let num = |k: &str, d: u32| get(k).map_or(d, |v| v.parse().unwrap());
    let secs = |k: &str| get(k).map(|v| Duration::from_secs_f64(v.parse().unwrap()));
    let workers = num("workers", 1);
    let policy = match get("policy").unwrap_or("sync") {
        "sync" => Policy::Sync { aggregate: num("aggregate", workers), backups: num("backups", 0) },
        "async" => Policy::Async { max_staleness: get("max_staleness").map(|v| v.parse().unwrap()) },
        "deadline" => Policy::Deadline { min: num("min", 1), timeout: secs("timeout").unwrap() },
        "adaptive" => Policy::Adaptive { min: num("min", 1), max: num("max", workers) },
        other => panic!("unknown policy {other}"),
    };
    let mut cfg = ServerConfig::new(workers, policy, get("lr").map_or(1.0, |v| v.parse().unwrap()));
    cfg.clip_norm = get("clip").map(|v| v.parse().unwrap());
    cfg.max_steps = get("max_steps").map(|v| v.parse().unwrap());
    cfg.liveness.worker_timeout = secs("worker_timeout");
    cfg.liveness.stall_timeout = secs("stall_timeout");
    if get("on_stall") == Some("lower") {
        cfg.liveness.on_stall = OnStall::LowerAggregate;
    }
    (cfg, num("params", 2) as usize)
}

fn render(out: &Outputs, lines: &mut Vec<String>) {
    for a in &out.actions {
        lines.push(format!("  action {a:?}"));
    }
    for e in &out.events {
        lines.push(format!("  event {}", serde_json::to_string(e).unwrap()));
    }
}

fn state(s: &Server) -> String {
    format!("  state step={} params={:?} live={:?}", s.step(), s.params(), s.live_workers())
}

fn run(text: &str) -> String {
    let mut lines = Vec::new();
    let mut server: Option<Server> = None;
    for raw in text.lines() {
        if raw.starts_with(' ') {
            continue; // an expectation: regenerated below
        }
        lines.push(raw.to_string());
        let words: Vec<&str> = raw.split_whitespace().collect();
        match words.first().copied() {
            None | Some("#") => {}
            Some("config") => {
                let (cfg, n) = parse_config(raw);
                let layout = ParamLayout::from_shapes([("theta", vec![n])]).unwrap();
                server = Some(Server::new(cfg, layout, vec![0.0; n]).unwrap());
            }
            Some("state") => lines.push(state(server.as_ref().unwrap())),
            Some("wakeup") => lines.push(format!("  wakeup {:?}", server.as_ref().unwrap().next_wakeup())),
            Some("at") => {
                let s = server.as_mut().expect("config first");
                let now = Duration::from_secs_f64(words[1].parse().unwrap());
                if words[2] == "tick" {
                    render(&s.tick(now), &mut lines);
                    continue;
                }
                let worker = WorkerId(words[2].trim_start_matches('w').parse().unwrap());
                let msg = match words[3] {
                    // `join` speaks as session = the worker's index; `join 7` as session 7.
                    "join" => {
                        ToServer::Join { session: words.get(4).map_or(u64::from(worker.0), |v| v.parse().unwrap()) }
                    }
                    "heartbeat" => ToServer::Heartbeat,
                    "leave" => ToServer::Leave,
                    "push" => ToServer::Push {
                        step: words[4].parse().unwrap(),
                        gradient: words[5].split(',').filter(|v| !v.is_empty()).map(|v| v.parse().unwrap()).collect(),
                        loss: words.get(6).map(|v| v.parse().unwrap()),
                    },
                    other => panic!("unknown message {other}"),
                };
                match s.handle(now, worker, msg) {
                    Ok(out) => render(&out, &mut lines),
                    Err(e) => lines.push(format!("  error {e}")),
                }
            }
            Some(other) => panic!("unknown input `{other}` in line `{raw}`"),
        }
    }
    lines.join("\n") + "\n"
}

#[test]
fn protocol_scenarios_match_their_recorded_outputs() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scenarios");
    let bless = std::env::var_os("QUORUM_BLESS").is_some();
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(!files.is_empty(), "no scenarios in {}", dir.display());
    let mut failures = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let got = run(&text);
        if got != text {
            if bless {
                std::fs::write(&path, &got).unwrap();
            } else {
                failures.push(format!("--- {}\n{}", path.display(), got));
            }
        }
    }
    assert!(failures.is_empty(), "scenarios differ (QUORUM_BLESS=1 to rewrite):\n{}", failures.join("\n"));
}
