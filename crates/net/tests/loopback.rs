//! The networked cluster on loopback (port 0) with the synthetic model.

mod common;

use common::{options, serve, worker, Hooked};
use quorum_compute::{GradientSource, LeastSquares};
use quorum_core::Policy;
use quorum_net::{run_server, run_worker, WorkerOptions};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_cluster_with_a_backup_trains_to_the_optimum_over_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, src) = options(3, Policy::Sync { aggregate: 2, backups: 1 }, 200, Some(dir.path().to_path_buf()));
    let (server, addr) = serve(opts).await;
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
    for f in ["summary.json", "metrics.csv", "workers.csv", "arrivals.csv"] {
        assert!(dir.path().join(f).exists(), "{f} missing");
    }
    // arrivals.csv: two accepted arrivals (k = 1, 2) in every step.
    let arrivals = std::fs::read_to_string(dir.path().join("arrivals.csv")).unwrap();
    assert!(arrivals.starts_with("step,k,worker,seconds,accepted\n"));
    let accepted: Vec<&str> = arrivals.lines().filter(|l| l.ends_with(",true")).collect();
    assert_eq!(accepted.len(), 400);
    assert!(accepted.iter().filter(|l| l.starts_with("7,")).count() == 2);
    // workers.csv: per-worker timing columns, with every worker having sent something.
    let workers = std::fs::read_to_string(dir.path().join("workers.csv")).unwrap();
    let header: Vec<&str> = workers.lines().next().unwrap().split(',').collect();
    for col in ["sent", "accepted", "dropped", "p50_compute_seconds", "p99_compute_seconds", "p99_transfer_seconds"] {
        assert!(header.contains(&col), "workers.csv lacks {col}");
    }
    assert_eq!(workers.lines().count(), 4);
    // TensorBoard scalars, one record per step plus the version record and evaluations.
    let tb = std::fs::read_dir(dir.path().join("tensorboard")).unwrap().next().unwrap().unwrap().path();
    let records = quorum_net::tensorboard::read_events(&tb).unwrap();
    assert!(records.len() >= 201, "{} records", records.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_never_sent_has_empty_timing_cells_in_workers_csv() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, src) = options(2, Policy::Sync { aggregate: 1, backups: 1 }, 20, Some(dir.path().to_path_buf()));
    let (server, addr) = serve(opts).await;
    worker(0, addr, &src).await.unwrap().unwrap();
    assert_eq!(server.await.unwrap().unwrap().steps, 20);
    let workers = std::fs::read_to_string(dir.path().join("workers.csv")).unwrap();
    let rows: Vec<Vec<&str>> = workers.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 2);
    // Worker 0 sent 20 gradients, each with its timings; worker 1 never came.
    // (worker, sent, accepted, dropped, rejected, abandoned, then the timing statistics)
    assert_eq!(&rows[0][..6], ["0", "20", "20", "0", "0", "0"]);
    assert!(rows[0][6..].iter().all(|c| c.parse::<f64>().is_ok_and(|x| x.is_finite() && x >= 0.0)), "{:?}", rows[0]);
    assert_eq!(&rows[1][..6], ["1", "0", "0", "0", "0", "0"]);
    assert!(rows[1][6..].iter().all(|c| c.is_empty()), "{:?}", rows[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_straggler_that_knows_its_step_closed_reports_its_gradient_late_without_sending_it() {
    // N = 2 of 3: workers 0 and 1 take 20 ms per gradient, worker 2 takes 150 ms, long after
    // the other two have closed the step, and learns so from its pending pull of the next
    // parameters.
    let dir = tempfile::tempdir().unwrap();
    let (opts, src) = options(3, Policy::Sync { aggregate: 2, backups: 1 }, 40, Some(dir.path().to_path_buf()));
    let (server, addr) = serve(opts).await;
    let start = |i: u32, delay: &str| {
        let mut wo = WorkerOptions::new(i, format!("http://{addr}"));
        wo.delay = Some(delay.parse::<quorum_compute::DelayModel>().unwrap().sampler().unwrap());
        tokio::spawn(run_worker(wo, Box::new(src.clone()) as Box<dyn GradientSource + Send>))
    };
    let fast = [start(0, "const:0.02"), start(1, "const:0.02")];
    let slow = start(2, "const:0.15").await.unwrap().unwrap();
    let summary = server.await.unwrap().unwrap();
    assert_eq!(summary.steps, 40);
    for w in fast {
        w.await.unwrap().unwrap();
    }
    // Every gradient it finished while the run went on was late, and reported empty (the
    // last one may have met the end of the run instead).
    assert!(slow.unsent_late >= 1, "{slow:?}");
    assert_eq!((slow.accepted, slow.dropped), (0, slow.unsent_late), "{slow:?}");
    assert!(slow.sent <= slow.dropped + 1, "{slow:?}");
    // The server counted each notice as a late gradient, with its compute time (the
    // injected 150 ms included: it stands for a slower machine).
    let workers = std::fs::read_to_string(dir.path().join("workers.csv")).unwrap();
    let header: Vec<&str> = workers.lines().next().unwrap().split(',').collect();
    let row: Vec<&str> = workers.lines().nth(3).unwrap().split(',').collect();
    let n = slow.unsent_late.to_string();
    assert_eq!(row[..4], ["2", n.as_str(), "0", n.as_str()], "{row:?}");
    let compute = header.iter().position(|c| *c == "mean_compute_seconds").unwrap();
    assert!(row[compute].parse::<f64>().unwrap() >= 0.15, "{row:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bf16_on_the_wire_still_trains_to_the_optimum() {
    let (mut opts, src) = options(2, Policy::Sync { aggregate: 2, backups: 0 }, 200, None);
    opts.encoding = quorum_net::Encoding::Bf16;
    let (server, addr) = serve(opts).await;
    let workers: Vec<_> = (0..2).map(|i| worker(i, addr, &src)).collect();
    let summary = tokio::time::timeout(Duration::from_secs(60), server).await.expect("finishes").unwrap().unwrap();
    assert_eq!(summary.steps, 200);
    assert!(summary.final_test_loss.unwrap() < 0.05, "test loss {:?}", summary.final_test_loss);
    for w in workers {
        w.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_resumes_from_its_checkpoint_and_workers_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = quorum_net::server::CheckpointOptions {
        dir: dir.path().join("checkpoints"),
        every_steps: Some(10),
        every_seconds: None,
        keep: 2,
    };
    // First life: stopped by a shutdown signal after a while.
    let (mut opts, src) = options(2, Policy::Sync { aggregate: 2, backups: 0 }, 100_000, None);
    opts.checkpoint = Some(ckpt.clone());
    // Stopped mid-run: once 25 steps are applied (told by the progress callback, not hoped
    // for after a sleep).
    let (progressed, mid_run) = std::sync::mpsc::channel();
    opts.progress = Some(Box::new(move |p: &quorum_net::server::Progress| {
        if p.step == 25 {
            let _ = progressed.send(());
        }
    }));
    let (layout, cfg) = (opts.layout.clone(), opts.config.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run_server(listener, opts, async {
        let _ = stop_rx.await;
    }));
    let workers: Vec<_> = (0..2).map(|i| worker(i, addr, &src)).collect();
    tokio::task::spawn_blocking(move || mid_run.recv().unwrap()).await.unwrap();
    stop_tx.send(()).unwrap();

    let first = server.await.unwrap().unwrap();

    assert_eq!(first.stop_reason.as_deref(), Some("interrupted"));
    assert!(first.steps >= 25);
    for w in workers {
        w.await.unwrap().unwrap();
    }
    let (meta, snap, _) = quorum_net::checkpoint::load_latest(&ckpt.dir, &layout, &cfg).unwrap();
    assert_eq!(meta.step, first.steps, "the final checkpoint is at the step the server stopped");

    // Second life on the same address: workers started before it retry until it is up.
    let mut restarted_workers = Vec::new();
    for i in 0..2 {
        restarted_workers.push(worker(i, addr, &src));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (mut opts, _) = options(2, Policy::Sync { aggregate: 2, backups: 0 }, first.steps + 50, None);
    opts.restore = Some(snap);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(60), run_server(listener, opts, std::future::pending()))
        .await
        .expect("finishes")
        .unwrap();
    assert_eq!(second.start_step, first.steps);
    assert_eq!(second.steps, first.steps + 50);
    for w in restarted_workers {
        w.await.unwrap().unwrap();
    }
}

fn events_of(dir: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_backup_worker_mid_run_does_not_stop_training() {
    let dir = tempfile::tempdir().unwrap();
    let (opts, src) = options(3, Policy::Sync { aggregate: 2, backups: 1 }, 1000, Some(dir.path().to_path_buf()));
    let (server, addr) = serve(opts).await;
    // 1,000 steps of at least 5 ms outlast the 2 s worker time-out after the kill.
    // The victim is the fastest worker, so it contributes until it dies.
    let (done, computed) = std::sync::mpsc::channel();
    let done = std::sync::Mutex::new(done);
    let victim_src = Hooked::new(&src, move |batch| {
        let _ = done.lock().unwrap().send(batch.step);
        Ok(())
    });
    let mut wo = WorkerOptions::new(0, format!("http://{addr}"));
    wo.connect_timeout = Duration::from_secs(5);
    let victim = tokio::spawn(run_worker(wo, Box::new(victim_src) as Box<dyn GradientSource + Send>));
    let others: Vec<_> = (1..3)
        .map(|i| {
            let mut wo = WorkerOptions::new(i, format!("http://{addr}"));
            wo.delay = Some("const:0.005".parse::<quorum_compute::DelayModel>().unwrap().sampler().unwrap());
            tokio::spawn(run_worker(wo, Box::new(src.clone()) as Box<dyn GradientSource + Send>))
        })
        .collect();
    // Kill it once it has computed its 20th gradient (waiting on that, not on a sleep).
    let killed_after = tokio::task::spawn_blocking(move || computed.iter().nth(19).unwrap()).await.unwrap();
    victim.abort();
    let summary = tokio::time::timeout(Duration::from_secs(60), server).await.expect("finishes").unwrap().unwrap();
    assert_eq!(summary.steps, 1000);
    for w in others {
        w.await.unwrap().unwrap();
    }
    // The victim contributed before the kill and never after it (one more push may be on its
    // way while the test aborts it: step `killed_after + 1` at most), it was declared gone,
    // and steps
    // went on closing without it.
    let events = events_of(dir.path());
    let victim_steps: Vec<u64> = events
        .iter()
        .filter(|e| e["event"] == "gradient_accepted" && e["worker"] == 0)
        .map(|e| e["step"].as_u64().unwrap())
        .collect();
    assert!(victim_steps.len() >= 5, "the victim contributed only {} gradients before it died", victim_steps.len());
    assert!(
        victim_steps.iter().all(|&s| s <= killed_after + 1),
        "the victim contributed after it died: {victim_steps:?}"
    );
    assert!(
        events.iter().any(|e| e["event"] == "worker_left" && e["worker"] == 0),
        "the killed worker is declared gone"
    );
    let applied: Vec<&serde_json::Value> = events.iter().filter(|e| e["event"] == "step_applied").collect();
    assert!(applied.iter().any(|e| e["step"].as_u64().unwrap() > killed_after + 50), "the kill was not mid-run");
    for e in &applied {
        let c = e["contributors"].as_array().unwrap();
        assert!(c.len() == 2 && c[0] != c[1], "{e}");
    }
}

/// A TCP relay between a worker and the server that can swallow the server's answers and
/// then cut the link: a push the server read whose reply never reaches the worker.
struct Relay {
    addr: std::net::SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Relay {
    async fn start(server: std::net::SocketAddr) -> Relay {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let armed = cut.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let armed = armed.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let upstream = tokio::net::TcpStream::connect(server).await.unwrap();
                    let (mut cr, mut cw) = client.into_split();
                    let (mut ur, mut uw) = upstream.into_split();
                    let up = tokio::spawn(async move { tokio::io::copy(&mut cr, &mut uw).await });
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        let n = match ur.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        // Armed: the server's answer is lost, then so is the link.
                        if armed.swap(false, Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            break;
                        }
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    up.abort();
                });
            }
        });
        Relay { addr, cut }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_whose_reply_was_lost_is_sent_again_and_answered_already_accepted() {
    // N = 2 of 2: the step cannot close while worker 1 is slow, so worker 0's second push
    // of the same step finds it open.
    let dir = tempfile::tempdir().unwrap();
    let (opts, src) = options(2, Policy::Sync { aggregate: 2, backups: 0 }, 10, Some(dir.path().to_path_buf()));
    let (server, addr) = serve(opts).await;
    let relay = Relay::start(addr).await;
    let mut wo = WorkerOptions::new(0, format!("http://{}", relay.addr));
    wo.connect_timeout = Duration::from_secs(10);
    // Armed once, as the gradient of step 3 is computed: that push's answer is lost.
    let (cut, armed) = (relay.cut.clone(), std::sync::atomic::AtomicBool::new(false));
    let cutter = Hooked::new(&src, move |batch| {
        use std::sync::atomic::Ordering::SeqCst;
        if batch.step == 3 && !armed.swap(true, SeqCst) {
            cut.store(true, SeqCst);
        }
        Ok(())
    });
    let w0 = tokio::spawn(run_worker(wo, Box::new(cutter) as Box<dyn GradientSource + Send>));
    let mut wo = WorkerOptions::new(1, format!("http://{addr}"));
    wo.delay = Some("const:0.4".parse::<quorum_compute::DelayModel>().unwrap().sampler().unwrap());
    let w1 = tokio::spawn(run_worker(wo, Box::new(src.clone()) as Box<dyn GradientSource + Send>));
    let summary = tokio::time::timeout(Duration::from_secs(60), server).await.expect("finishes").unwrap().unwrap();
    assert_eq!(summary.steps, 10);
    let r0 = w0.await.unwrap().expect("the worker whose reply was lost carries on");
    w1.await.unwrap().unwrap();
    assert!(r0.reconnects >= 1, "the link was not cut: {r0:?}");
    assert_eq!(summary.rejected, 0);
    let events = events_of(dir.path());
    let repeated: Vec<_> = events.iter().filter(|e| e["event"] == "gradient_repeated").collect();
    assert_eq!(repeated.len(), 1, "{repeated:?}");
    assert_eq!((repeated[0]["worker"].as_u64(), repeated[0]["step"].as_u64()), (Some(0), Some(3)));
    // Applied once: each step has both workers exactly once.
    for e in events.iter().filter(|e| e["event"] == "step_applied") {
        assert_eq!(e["contributors"], serde_json::json!([0, 1]), "{e}");
    }
    assert_eq!(summary.accepted, 20);
}

#[tokio::test]
async fn an_unreachable_server_is_named_after_the_timeout() {
    let src = LeastSquares::new(4, 4, 0.1, 1);
    let mut wo = WorkerOptions::new(0, "http://127.0.0.1:1");
    wo.connect_timeout = Duration::from_millis(300);
    let err = run_worker(wo, Box::new(src)).await.unwrap_err().to_string();
    assert!(err.contains("cannot reach the parameter server at http://127.0.0.1:1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_cluster_applies_every_gradient() {
    let (opts, src) = options(3, Policy::Async { max_staleness: None }, 150, None);
    let (server, addr) = serve(opts).await;
    let _workers: Vec<_> = (0..3).map(|i| worker(i, addr, &src)).collect();
    let summary = tokio::time::timeout(Duration::from_secs(60), server).await.expect("finishes").unwrap().unwrap();
    assert_eq!(summary.steps, 150);
    assert_eq!(summary.accepted, 150);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_frozen_mid_stream_are_abandoned_and_do_not_block_the_other_workers() {
    use quorum_net::proto::parameter_server_client::ParameterServerClient;
    use quorum_net::proto::{GradientChunk, JoinRequest};
    use tokio_stream::StreamExt;
    let (opts, src) = options(3, Policy::Sync { aggregate: 2, backups: 1 }, 100, None);
    let (server, addr) = serve(opts).await;
    // Worker 2 starts more pushes than the server reassembles at once (at most 8), each
    // sending half of the gradient and then nothing, holding its stream open.
    let mut frozen = ParameterServerClient::connect(format!("http://{addr}")).await.unwrap();
    frozen.join(JoinRequest { worker: 2, num_params: 64, session: 7, layout: vec![] }).await.unwrap();
    let half = GradientChunk {
        worker: 2,
        step: 0,
        offset: 0,
        total: 64,
        data: quorum_net::encoding::encode(&[0.0; 32]).into(),
        loss: f32::NAN,
        session: 7,
        ..Default::default()
    };
    let pushes: Vec<_> = (0..10)
        .map(|_| {
            let mut c = frozen.clone();
            let stream = tokio_stream::iter(vec![half.clone()]).chain(tokio_stream::pending());
            tokio::spawn(async move { c.push(stream).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let workers: Vec<_> = (0..2).map(|i| worker(i, addr, &src)).collect();
    // The run finishes: each frozen push gives up its place after the chunk time-out (the
    // worker time-out, 2 s) instead of keeping it forever.
    let summary = tokio::time::timeout(Duration::from_secs(60), server).await.expect("finishes").unwrap().unwrap();
    assert_eq!(summary.steps, 100);
    for p in pushes {
        let err = p.await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
        assert!(err.message().contains("push abandoned"), "{}", err.message());
    }
    for w in workers {
        w.await.unwrap().unwrap();
    }
}

/// Worker 2 of 3 (N = 2, b = 1) runs `broken`: its error must name the worker and say
/// `expected`, the other two finish the run, and the server hears at once that it left
/// (not after the worker time-out). The other two take 5 ms a gradient, so the run lasts
/// at least 2 s: on a loaded machine the broken worker still joins and fails while the run
/// is on (when the tiny model's 400 steps were over in a fraction of a second, its leave
/// could come after the end, and the server rightly recorded nothing).
async fn a_failing_worker_is_named_and_the_server_told(
    broken: Hooked,
    src: &LeastSquares,
    dir: &std::path::Path,
    expected: &str,
) {
    let (opts, _) = options(3, Policy::Sync { aggregate: 2, backups: 1 }, 400, Some(dir.to_path_buf()));
    let (server, addr) = serve(opts).await;
    let spawn = |i: u32, source: Box<dyn GradientSource + Send>| {
        let mut wo = WorkerOptions::new(i, format!("http://{addr}"));
        wo.connect_timeout = Duration::from_secs(5);
        tokio::spawn(run_worker(wo, source))
    };
    let others: Vec<_> = (0..2)
        .map(|i| {
            let steady = Hooked::new(src, |_| {
                std::thread::sleep(Duration::from_millis(5));
                Ok(())
            });
            spawn(i, Box::new(steady))
        })
        .collect();
    let err = spawn(2, Box::new(broken)).await.unwrap().unwrap_err().to_string();
    assert!(err.contains(expected), "{err}");
    let summary = tokio::time::timeout(Duration::from_secs(60), server).await.expect("finishes").unwrap().unwrap();
    assert_eq!(summary.steps, 400);
    for w in others {
        w.await.unwrap().unwrap();
    }
    let left = events_of(dir).into_iter().find(|e| e["event"] == "worker_left" && e["worker"] == 2).unwrap();
    assert_eq!(left["reason"], "left", "{left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_in_gradient_code_is_an_error_naming_the_worker_and_the_server_is_told_it_left() {
    let dir = tempfile::tempdir().unwrap();
    let (_, src) = options(3, Policy::Sync { aggregate: 2, backups: 1 }, 400, None);
    let broken = Hooked::new(&src, |batch| {
        assert!(batch.step < 1, "index out of bounds in the user's model");
        Ok(())
    });
    let expected = "worker 2: the gradient code panicked (index out of bounds in the user's model)";
    a_failing_worker_is_named_and_the_server_told(broken, &src, dir.path(), expected).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gradient_code_that_fails_is_an_error_naming_the_worker_and_the_server_is_told_it_left() {
    let dir = tempfile::tempdir().unwrap();
    let (_, src) = options(3, Policy::Sync { aggregate: 2, backups: 1 }, 400, None);
    let broken = Hooked::new(&src, |batch| match batch.step {
        0 => Ok(()),
        _ => Err(quorum_compute::ComputeError::Failed("the data loader ran dry".into())),
    });
    a_failing_worker_is_named_and_the_server_told(broken, &src, dir.path(), "worker 2: the data loader ran dry").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evaluator_process_fills_the_test_columns_of_a_server_without_a_model_and_the_final_step_is_awaited() {
    let dir = tempfile::tempdir().unwrap();
    let (mut opts, src) = options(2, Policy::Sync { aggregate: 2, backups: 0 }, 60, Some(dir.path().to_path_buf()));
    opts.evaluator = None;
    opts.eval_every = None;
    let (server, addr) = serve(opts).await;
    let mut judge = src.clone();
    let evaluate: quorum_net::evaluate::EvaluateFn = Box::new(move |_step, params| {
        // Slow enough that the run ends while an evaluation is under way.
        std::thread::sleep(Duration::from_millis(300));
        judge.evaluate(params)
    });
    let eval_opts = WorkerOptions::new(0, format!("http://{addr}"));
    let evaluator = tokio::spawn(quorum_net::evaluate::run_evaluator(eval_opts, src.layout().len(), 20, evaluate));
    let workers: Vec<_> = (0..2).map(|i| worker(i, addr, &src)).collect();
    let summary = server.await.unwrap().unwrap();
    for w in workers {
        w.await.unwrap().unwrap();
    }
    let report = evaluator.await.unwrap().unwrap();
    assert_eq!(report.last_step, Some(60));
    // The server waited for the evaluation of its final step.
    let final_loss = summary.final_test_loss.expect("the final evaluation reached the summary");
    let metrics = std::fs::read_to_string(dir.path().join("metrics.csv")).unwrap();
    let evaluated: Vec<(u64, f64)> = metrics
        .lines()
        .skip(1)
        .filter_map(|l| {
            let c: Vec<&str> = l.split(',').collect();
            Some((c[0].parse().ok()?, c[4].parse().ok()?))
        })
        .collect();
    assert!(evaluated.len() >= 2, "{metrics}");
    assert_eq!(evaluated.last().unwrap().0, 60);
    assert!((evaluated.last().unwrap().1 - final_loss as f64).abs() < 1e-6);
    // Training made progress, and the evaluations saw it.
    assert!(evaluated.last().unwrap().1 < evaluated[0].1, "{evaluated:?}");
}
