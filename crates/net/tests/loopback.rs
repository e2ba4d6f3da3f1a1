//! The networked cluster on loopback (port 0) with the synthetic model.

use quorum_compute::{GradientSource, LeastSquares};
use quorum_core::{Policy, ServerConfig};
use quorum_net::{run_server, run_worker, ServerOptions, WorkerOptions};
use std::time::Duration;

fn options(workers: u32, policy: Policy, steps: u64, out: Option<std::path::PathBuf>) -> (ServerOptions, LeastSquares) {
    let src = LeastSquares::new(64, 16, 0.1, 1);
    let mut cfg = ServerConfig::new(workers, policy, 0.2);
    cfg.max_steps = Some(steps);
    cfg.liveness.stall_timeout = Some(Duration::from_secs(10));
    let opts = ServerOptions {
        config: cfg,
        layout: src.layout().clone(),
        init: src.init_params(0),
        out,
        evaluator: Some(Box::new(src.clone())),
        eval_every: None,
        batch: 16,
        progress: None,
    };
    (opts, src)
}

fn worker(
    i: u32,
    addr: std::net::SocketAddr,
    src: &LeastSquares,
) -> tokio::task::JoinHandle<Result<quorum_net::worker::WorkerReport, quorum_net::worker::WorkerError>> {
    let wo = WorkerOptions {
        index: i,
        server: format!("http://{addr}"),
        connect_timeout: Duration::from_secs(5),
        delay: None,
        seed: 1,
    };
    tokio::spawn(run_worker(wo, Box::new(src.clone()) as Box<dyn GradientSource + Send>))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_cluster_with_a_backup_trains_to_the_optimum_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, src) = options(3, Policy::Sync { aggregate: 2, backups: 1 }, 200, Some(dir.path().to_path_buf()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(run_server(listener, opts, std::future::pending()));
    let workers: Vec<_> = (0..3).map(|i| worker(i, addr, &src)).collect();
    let summary = tokio::time::timeout(Duration::from_secs(60), server).await.expect("finishes").unwrap().unwrap();
    assert_eq!(summary.steps, 200);
    assert!(summary.stop_reason.is_none());
    assert!(summary.final_test_loss.unwrap() < 0.05, "test loss {:?}", summary.final_test_loss);
    for w in workers {
        let r = w.await.unwrap().unwrap();
        assert!(r.sent > 0);
    }
    // Every applied step has exactly N = 2 distinct contributors.
    let events = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    let mut applied = 0;
    for line in events.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["event"] == "step_applied" {
            let c = v["contributors"].as_array().unwrap();
            assert_eq!(c.len(), 2);
            assert_ne!(c[0], c[1]);
            assert_eq!(v["step"], applied);
            applied += 1;
        }
    }
    assert_eq!(applied, 200);
    for f in ["summary.json", "metrics.csv", "workers.csv"] {
        assert!(dir.path().join(f).exists(), "{f} missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_backup_worker_mid_run_does_not_stop_training() {
    let (opts, src) = options(3, Policy::Sync { aggregate: 2, backups: 1 }, 300, None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(run_server(listener, opts, std::future::pending()));
    let victim = worker(0, addr, &src);
    let others: Vec<_> = (1..3).map(|i| worker(i, addr, &src)).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    victim.abort();
    let summary = tokio::time::timeout(Duration::from_secs(60), server).await.expect("finishes").unwrap().unwrap();
    assert_eq!(summary.steps, 300);
    for w in others {
        w.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_another_model_is_refused_with_a_clear_message() {
    let (opts, _) = options(1, Policy::Sync { aggregate: 1, backups: 0 }, 10, None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(run_server(listener, opts, std::future::pending()));
    let other = LeastSquares::new(8, 4, 0.1, 1);
    let err = worker(0, addr, &other).await.unwrap().unwrap_err().to_string();
    assert!(err.contains("8 parameters but the server's has 64"), "{err}");
    server.abort();
}

#[tokio::test]
async fn an_unreachable_server_is_named_after_the_timeout() {
    let src = LeastSquares::new(4, 4, 0.1, 1);
    let wo = WorkerOptions {
        index: 0,
        server: "http://127.0.0.1:1".into(),
        connect_timeout: Duration::from_millis(300),
        delay: None,
        seed: 1,
    };
    let err = run_worker(wo, Box::new(src)).await.unwrap_err().to_string();
    assert!(err.contains("cannot reach the parameter server at http://127.0.0.1:1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_cluster_applies_every_gradient() {
    let (opts, src) = options(3, Policy::Async { max_staleness: None }, 150, None);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(run_server(listener, opts, std::future::pending()));
    let _workers: Vec<_> = (0..3).map(|i| worker(i, addr, &src)).collect();
    let summary = tokio::time::timeout(Duration::from_secs(60), server).await.expect("finishes").unwrap().unwrap();
    assert_eq!(summary.steps, 150);
    assert_eq!(summary.accepted, 150);
}
