//! The deadline policy over loopback, alone in its test binary so that the process's CPU
//! time is this test's.

use quorum_compute::{GradientSource, LeastSquares};
use quorum_core::{Policy, ServerConfig};
use quorum_net::{run_server, run_worker, ServerOptions, WorkerOptions};
use std::time::{Duration, Instant};

/// CPU seconds this process has used (user + system), from /proc.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after the name.
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_its_timeout_a_deadline_step_closes_on_the_min_th_gradient_without_spinning() {
    // min = 3 of 4 workers, a 10 ms timeout, and gradients that take 100 ms: every step's
    // deadline passes with none in, then the step closes on the third push. The server used
    // to sleep until the past deadline in a loop for those 90 ms, spinning a core.
    let src = LeastSquares::new(64, 16, 0.1, 1);
    let mut cfg = ServerConfig::new(4, Policy::Deadline { min: 3, timeout: Duration::from_millis(10) }, 0.2);
    cfg.max_steps = Some(15);
    cfg.liveness.worker_timeout = Some(Duration::from_secs(5));
    let dir = tempfile::tempdir().unwrap();
    let mut opts = ServerOptions::new(cfg, src.layout().clone(), src.init_params(0));
    opts.out = Some(dir.path().to_path_buf());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (cpu0, wall0) = (cpu_seconds(), Instant::now());
    let server = tokio::spawn(run_server(listener, opts, std::future::pending()));
    let workers: Vec<_> = (0..4)
        .map(|i| {
            let mut wo = WorkerOptions::new(i, format!("http://{addr}"));
            let delay = if i == 3 { "const:0.4" } else { "const:0.1" };
            wo.delay = Some(delay.parse::<quorum_compute::DelayModel>().unwrap().sampler().unwrap());
            tokio::spawn(run_worker(wo, Box::new(src.clone()) as Box<dyn GradientSource + Send>))
        })
        .collect();
    let summary = tokio::time::timeout(Duration::from_secs(60), server).await.expect("finishes").unwrap().unwrap();
    let (cpu, wall) = (cpu_seconds() - cpu0, wall0.elapsed().as_secs_f64());
    assert_eq!(summary.steps, 15);
    for w in workers {
        w.await.unwrap().unwrap();
    }
    let events = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    for e in events.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()) {
        if e["event"] == "step_applied" {
            assert!(e["contributors"].as_array().unwrap().len() >= 3, "{e}");
        }
    }
    // Waiting costs nothing: a spinning loop would use about one core for the whole run.
    assert!(cpu < 0.5 * wall, "{cpu:.2} CPU seconds in {wall:.2} s of wall time: the server spins");
}
