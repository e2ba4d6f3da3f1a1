//! Sharded parameter servers on loopback: S servers each holding a range of the parameters,
//! shard 0 coordinating one quorum for the whole model.

mod common;

use common::Hooked;
use quorum_compute::{GradientSource, LeastSquares};
use quorum_core::{Policy, ServerConfig, ShardPlan};
use quorum_net::server::ShardOptions;
use quorum_net::{run_server, run_worker, ServerOptions, TrainSummary, WorkerOptions};
use std::path::Path;
use std::time::Duration;

type Task<T> = tokio::task::JoinHandle<Result<T, quorum_net::server::NetError>>;

fn source() -> LeastSquares {
    LeastSquares::new(90, 16, 0.1, 1)
}

fn config(workers: u32, policy: Policy, steps: u64) -> ServerConfig {
    let mut cfg = ServerConfig::new(workers, policy, 0.2);
    cfg.max_steps = Some(steps);
    cfg.liveness.stall_timeout = Some(Duration::from_secs(10));
    cfg.liveness.worker_timeout = Some(Duration::from_secs(2));
    cfg
}

/// Starts `shards` servers (shard `k` writing its run into `dir/shard-k`), with shard `k`
/// told the run has `claimed[k]` shards; their addresses, shard 0 first.
async fn start_shards(cfg: &ServerConfig, dir: &Path, claimed: &[u32]) -> (Vec<String>, Vec<Task<TrainSummary>>) {
    let src = source();
    let mut listeners = Vec::new();
    for _ in claimed {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs: Vec<String> = listeners.iter().map(|l| format!("http://{}", l.local_addr().unwrap())).collect();
    let mut tasks = Vec::new();
    for (k, listener) in listeners.into_iter().enumerate() {
        let mut opts = ServerOptions::new(cfg.clone(), src.layout().clone(), src.init_params(0));
        opts.out = Some(dir.join(format!("shard-{k}")));
        opts.batch = 16;
        opts.shard = Some(ShardOptions {
            index: k as u32,
            plan: ShardPlan::new(src.layout(), claimed[k]).unwrap(),
            coordinator: (k > 0).then(|| addrs[0].clone()),
        });
        tasks.push(tokio::spawn(run_server(listener, opts, std::future::pending())));
    }
    (addrs, tasks)
}

fn worker(
    i: u32,
    addrs: &[String],
) -> tokio::task::JoinHandle<Result<quorum_net::worker::WorkerReport, quorum_net::worker::WorkerError>> {
    worker_with(i, addrs, Box::new(source()))
}

fn worker_with(
    i: u32,
    addrs: &[String],
    src: Box<dyn GradientSource + Send>,
) -> tokio::task::JoinHandle<Result<quorum_net::worker::WorkerReport, quorum_net::worker::WorkerError>> {
    let mut wo = WorkerOptions::new(i, addrs[0].clone());
    wo.shards = addrs[1..].to_vec();
    wo.connect_timeout = Duration::from_secs(5);
    tokio::spawn(run_worker(wo, src))
}

/// `n` sources whose first gradients wait for each other (10 s at most): no worker's
/// updates can be applied before every worker has pulled, whatever the scheduler does.
fn meeting_sources(n: usize) -> Vec<Box<dyn GradientSource + Send>> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
    let arrived = std::sync::Arc::new(AtomicUsize::new(0));
    (0..n)
        .map(|_| {
            let arrived = arrived.clone();
            let first = AtomicBool::new(true);
            let src = Hooked::new(&source(), move |_| {
                if first.swap(false, SeqCst) {
                    arrived.fetch_add(1, SeqCst);
                    let deadline = std::time::Instant::now() + Duration::from_secs(10);
                    while arrived.load(SeqCst) < n && std::time::Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                Ok(())
            });
            Box::new(src) as Box<dyn GradientSource + Send>
        })
        .collect()
}

/// Every applied step in a run directory's events: (step, contributors).
fn applied(dir: &Path) -> Vec<(u64, Vec<u64>)> {
    let events = std::fs::read_to_string(dir.join("events.jsonl")).unwrap();
    events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "step_applied")
        .map(|v| {
            let c = v["contributors"].as_array().unwrap().iter().map(|w| w.as_u64().unwrap()).collect();
            (v["step"].as_u64().unwrap(), c)
        })
        .collect()
}

/// The mean loss the contributors reported at each step, from a run directory's metrics.
fn train_losses(dir: &Path) -> Vec<f64> {
    let metrics = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    let header: Vec<&str> = metrics.lines().next().unwrap().split(',').collect();
    let col = header.iter().position(|h| *h == "train_loss").expect("a train_loss column");
    metrics.lines().skip(1).filter_map(|l| l.split(',').nth(col)?.parse().ok()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shard_of_a_grpc_cluster_averages_the_same_workers_at_every_step_and_it_trains() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 120;
    let cfg = config(4, Policy::Sync { aggregate: 2, backups: 2 }, steps);
    let (addrs, servers) = start_shards(&cfg, dir.path(), &[3, 3, 3]).await;
    // The first gradients meet: two workers cannot close all 120 quick steps before the
    // other two join (they did on a loaded core).
    let workers: Vec<_> =
        meeting_sources(4).into_iter().enumerate().map(|(i, src)| worker_with(i as u32, &addrs, src)).collect();
    // An evaluator pulls every shard's part every 40 steps and reports to shard 0.
    let mut eval_opts = WorkerOptions::new(0, addrs[0].clone());
    eval_opts.shards = addrs[1..].to_vec();
    let mut src = source();
    let evaluate: quorum_net::evaluate::EvaluateFn = Box::new(move |_, p| src.evaluate(p));
    let evaluator = tokio::spawn(quorum_net::evaluate::run_evaluator(eval_opts, 90, 40, evaluate));
    let mut final_loss = None;
    for s in servers {
        // (A shard the evaluator pulled from waits for it to have the final parameters, not longer.)
        let summary = tokio::time::timeout(Duration::from_secs(60), s).await.expect("finishes").unwrap().unwrap();
        assert_eq!(summary.steps, steps);
        assert!(summary.stop_reason.is_none(), "{:?}", summary.stop_reason);
        final_loss = final_loss.or(Some(summary.final_test_loss));
    }
    let report = evaluator.await.unwrap().unwrap();
    assert_eq!(report.last_step, Some(steps), "the evaluator evaluated the final parameters");
    let final_loss = final_loss.flatten().expect("shard 0 recorded the evaluator's final figures");
    assert!(final_loss < 0.05, "the model put together from the shards' parts: test loss {final_loss}");
    let mut dropped = 0;
    for w in workers {
        let r = w.await.unwrap().unwrap();
        assert!(r.sent > 0);
        dropped += r.dropped;
    }
    let committed = applied(&dir.path().join("shard-0"));
    assert_eq!(committed.len() as u64, steps);
    for (i, (step, c)) in committed.iter().enumerate() {
        assert_eq!(*step, i as u64);
        assert_eq!(c.len(), 2, "step {step} took {c:?}");
    }
    for k in 1..3 {
        assert_eq!(applied(&dir.path().join(format!("shard-{k}"))), committed, "shard {k} applied other sets");
    }
    // With 2 backups some gradients were late: the quorum was not simply "everyone".
    let late_or_left_out = committed.iter().any(|(_, c)| c != &[0, 1]);
    assert!(dropped > 0 || late_or_left_out, "no step ever took other workers than w0 and w1");
    // The mean loss the contributors reported fell by an order of magnitude: the shards'
    // parts of the parameters were put together and updated as one model.
    let losses = train_losses(&dir.path().join("shard-0"));
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(last < first / 10.0, "loss {first} -> {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_grpc_cluster_applies_each_gradient_once_on_every_shard_with_its_staleness_and_trains() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 300;
    let mut cfg = config(4, Policy::Async { max_staleness: None }, steps);
    cfg.schedule = quorum_core::LrSchedule::constant(0.05);
    let (addrs, servers) = start_shards(&cfg, dir.path(), &[3, 3, 3]).await;
    // The first gradients meet: a worker that joined first cannot make all 300 quick updates
    // alone before the others join (it did on a loaded 2-core machine).
    let workers: Vec<_> =
        meeting_sources(4).into_iter().enumerate().map(|(i, src)| worker_with(i as u32, &addrs, src)).collect();
    for s in servers {
        let summary = tokio::time::timeout(Duration::from_secs(60), s).await.expect("finishes").unwrap().unwrap();
        assert_eq!(summary.steps, steps);
        assert!(summary.stop_reason.is_none(), "{:?}", summary.stop_reason);
    }
    for w in workers {
        w.await.unwrap().unwrap();
    }
    let committed = applied(&dir.path().join("shard-0"));
    assert_eq!(committed.len() as u64, steps);
    assert!(committed.iter().all(|(_, c)| c.len() == 1), "an async update applies one gradient");
    let who: std::collections::BTreeSet<u64> = committed.iter().map(|(_, c)| c[0]).collect();
    assert_eq!(who.len(), 4, "every worker's first gradient was applied: {who:?}");
    for k in 1..3 {
        assert_eq!(applied(&dir.path().join(format!("shard-{k}"))), committed, "shard {k} applied other updates");
    }
    let events = std::fs::read_to_string(dir.path().join("shard-0/events.jsonl")).unwrap();
    let stale = events
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["event"] == "gradient_accepted" && v["staleness"].as_u64().unwrap() > 0)
        .count();
    assert!(stale > 0, "four workers pushing as they finish: some gradients were computed on older parameters");
    let losses = train_losses(&dir.path().join("shard-0"));
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    assert!(last < first / 10.0, "loss {first} -> {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sharded_run_that_diverges_before_its_first_evaluation_ends_at_once_evaluator_included() {
    // The run stops at step 5, long before the evaluator's first evaluation (step 50): it had
    // pulled from shard 0 only. Both shards see the non-finite slices; the follower leaves the
    // stop to the coordinator, and waits for the evaluator's pull of the final parameters
    // (else shard 0 waits for an evaluation that can no longer come).
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(2, Policy::Sync { aggregate: 2, backups: 0 }, 1000);
    let src = source();
    let mut listeners = Vec::new();
    for _ in 0..2 {
        listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let addrs: Vec<String> = listeners.iter().map(|l| format!("http://{}", l.local_addr().unwrap())).collect();
    let mut servers = Vec::new();
    for (k, listener) in listeners.into_iter().enumerate() {
        let mut opts = ServerOptions::new(cfg.clone(), src.layout().clone(), src.init_params(0));
        opts.out = Some(dir.path().join(format!("shard-{k}")));
        opts.divergence_loss = Some(1e6);
        opts.shard = Some(ShardOptions {
            index: k as u32,
            plan: ShardPlan::new(src.layout(), 2).unwrap(),
            coordinator: (k > 0).then(|| addrs[0].clone()),
        });
        servers.push(tokio::spawn(run_server(listener, opts, std::future::pending())));
    }
    let mut eval_opts = WorkerOptions::new(0, addrs[0].clone());
    eval_opts.shards = addrs[1..].to_vec();
    let mut eval_src = source();
    let evaluate: quorum_net::evaluate::EvaluateFn = Box::new(move |_, p| eval_src.evaluate(p));
    let evaluator = tokio::spawn(quorum_net::evaluate::run_evaluator(eval_opts, 90, 50, evaluate));
    let mut workers = Vec::new();
    for i in 0..2 {
        let mut wo = WorkerOptions::new(i, addrs[0].clone());
        wo.shards = addrs[1..].to_vec();
        // Worker 0's gradients turn non-finite from step 5 on, in both shards' ranges.
        let diverging = Hooked::altering(&source(), |batch, grad| {
            if batch.step >= 5 {
                let last = grad.len() - 1;
                (grad[3], grad[last]) = (f32::NAN, f32::NAN);
            }
        });
        let src: Box<dyn GradientSource + Send> = if i == 0 { Box::new(diverging) } else { Box::new(source()) };
        workers.push(tokio::spawn(run_worker(wo, src)));
    }
    let started = std::time::Instant::now();
    for s in servers {
        let summary =
            tokio::time::timeout(Duration::from_secs(30), s).await.expect("every shard exits").unwrap().unwrap();
        let why = summary.stop_reason.unwrap_or_default();
        assert!(why.contains("training diverged"), "{why}");
    }
    let report = tokio::time::timeout(Duration::from_secs(30), evaluator).await.expect("the evaluator ends").unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    for w in workers {
        let _ = w.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_started_with_another_shard_count_is_refused_with_what_differs() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(2, Policy::Sync { aggregate: 2, backups: 0 }, 20);
    let (_, mut servers) = start_shards(&cfg, dir.path(), &[2, 3]).await;
    let follower = servers.pop().unwrap();
    let s = tokio::time::timeout(Duration::from_secs(30), follower).await.expect("stops").unwrap().unwrap();
    let why = s.stop_reason.unwrap_or_default();
    assert!(why.contains("shard 1 of 3 asked to follow, but this run has 2 shards"), "{why}");
    servers.pop().unwrap().abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_given_too_few_shard_addresses_is_refused_with_how_many_there_are() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(1, Policy::Sync { aggregate: 1, backups: 0 }, 20);
    let (addrs, servers) = start_shards(&cfg, dir.path(), &[2, 2]).await;
    let e = worker(0, &addrs[..1]).await.unwrap().unwrap_err().to_string();
    assert!(e.contains("is shard 0 of 2") && e.contains("given 1 server address"), "{e}");
    for s in servers {
        s.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_with_the_token_cannot_take_a_live_workers_index_on_another_shard() {
    let dir = tempfile::tempdir().unwrap();
    let steps = 300;
    let mut cfg = config(1, Policy::Sync { aggregate: 1, backups: 0 }, steps);
    cfg.liveness.stall_timeout = Some(Duration::from_secs(5));
    let (addrs, servers) = start_shards(&cfg, dir.path(), &[2, 2]).await;
    let real = worker(0, &addrs);
    // Once the real worker 0 trains, an impostor joins shard 1 as worker 0 in its own session.
    let events = dir.path().join("shard-1/events.jsonl");
    while std::fs::read_to_string(&events).map_or(0, |t| t.matches("step_applied").count()) < 5 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut impostor =
        quorum_net::proto::parameter_server_client::ParameterServerClient::connect(addrs[1].clone()).await.unwrap();
    let join = quorum_net::proto::JoinRequest { worker: 0, num_params: 90, session: 999_999, layout: vec![] };
    let e = impostor.join(join).await.unwrap_err();
    // Shard 1 serves as worker 0 only the process the coordinator (shard 0) took.
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("held by another live process"), "{}", e.message());
    // The real worker's slices still count on both shards: the run ends with all its steps.
    for s in servers {
        let summary = tokio::time::timeout(Duration::from_secs(60), s).await.expect("finishes").unwrap().unwrap();
        assert_eq!((summary.steps, summary.stop_reason), (steps, None));
    }
    assert!(real.await.unwrap().unwrap().sent >= steps);
    assert_eq!(applied(&dir.path().join("shard-1")), applied(&dir.path().join("shard-0")));
}

/// Shard 0 agreeing on the resume step with `shards` - 1 others on a fresh loopback port.
async fn agreeing(shards: u32, steps: Vec<u64>) -> (String, Task<(tokio::net::TcpListener, u64)>) {
    use quorum_net::server::agree::{agree_as_coordinator, Agreement};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let a = Agreement { shards, steps, token: None, tls: Default::default() };
    (addr, tokio::spawn(agree_as_coordinator(listener, a)))
}

fn offer(addr: &str, shard: u32, shards: u32, steps: Vec<u64>) -> Task<u64> {
    let mut to = WorkerOptions::new(shard, addr.to_string());
    to.connect_timeout = Duration::from_secs(5);
    tokio::spawn(async move { quorum_net::server::agree::agree_as_follower(&to, shard, shards, steps).await })
}

#[tokio::test]
async fn shards_with_different_checkpoints_all_resume_from_the_newest_step_every_one_of_them_has() {
    let (addr, coordinator) = agreeing(3, vec![300, 200, 100]).await;
    let one = offer(&addr, 1, 3, vec![200, 100]);
    // A worker that calls while the shards agree hears "not ready" (it tries again), not a refusal.
    let mut client =
        quorum_net::proto::parameter_server_client::ParameterServerClient::connect(addr.clone()).await.unwrap();
    let join = client.join(quorum_net::proto::JoinRequest { worker: 0, ..Default::default() }).await.unwrap_err();
    assert_eq!(join.code(), tonic::Code::Unavailable, "{join:?}");
    assert!(join.message().contains("every shard must be started with --resume"), "{}", join.message());
    // Shard 1 is still waiting: nobody starts until every shard has offered.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!one.is_finished() && !coordinator.is_finished());
    let two = offer(&addr, 2, 3, vec![300, 200]);
    assert_eq!(one.await.unwrap().unwrap(), 200);
    assert_eq!(two.await.unwrap().unwrap(), 200);
    let (listener, step) = coordinator.await.unwrap().unwrap();
    assert_eq!(step, 200);
    // The run gets its listener back, on the same address.
    assert_eq!(format!("http://{}", listener.local_addr().unwrap()), addr);
}

#[tokio::test]
async fn shards_without_a_common_checkpoint_are_all_told_which_steps_each_has() {
    let (addr, coordinator) = agreeing(2, vec![300]).await;
    let e = offer(&addr, 1, 2, vec![200]).await.unwrap().unwrap_err().to_string();
    assert!(e.contains("no step has a checkpoint on every shard (shard 0: 300; shard 1: 200)"), "{e}");
    let e = coordinator.await.unwrap().unwrap_err().to_string();
    assert!(e.contains("without --resume to start afresh"), "{e}");
}

#[tokio::test]
async fn a_shard_started_without_resume_while_the_coordinator_resumes_is_told_to_add_resume() {
    let (addr, coordinator) = agreeing(2, vec![300]).await;
    let mut client = quorum_net::proto::coordinator_client::CoordinatorClient::connect(addr.clone()).await.unwrap();
    let hello = quorum_net::proto::ShardReport { shard: 1, shards: 2, ..Default::default() };
    let e = client.follow(tokio_stream::iter([hello])).await.unwrap_err();
    assert!(e.message().contains("shard 1 was started without --resume"), "{}", e.message());
    // The coordinator still waits for shard 1's offer, and takes it when it comes.
    assert_eq!(offer(&addr, 1, 2, vec![300]).await.unwrap().unwrap(), 300);
    assert_eq!(coordinator.await.unwrap().unwrap().1, 300);
}
