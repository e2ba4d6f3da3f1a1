//! Workers on the server's host move parameters and gradients through its shared memory
//! (`quorum_net::shm`); every request still goes over gRPC, on loopback here.

mod common;

use common::{serve, Hooked};
use quorum_compute::{GradientSource, LeastSquares};
use quorum_core::{Policy, ServerConfig};
use quorum_net::worker::WorkerReport;
use quorum_net::{run_worker, ServerOptions, WorkerOptions};
use std::time::Duration;

/// The synthetic model every run here trains.
fn model() -> LeastSquares {
    LeastSquares::new(64, 16, 0.1, 1)
}

/// Every worker's result.
type Results = Vec<Result<WorkerReport, quorum_net::worker::WorkerError>>;

/// A run of [`model`] on loopback: `n` workers under `policy`, `steps` steps, shared memory
/// offered when `offer`, the record in `out`;
/// `worker(i, address)` gives worker `i`'s options and gradient code. The final test loss and
/// the workers' results.
async fn cluster(
    n: u32,
    policy: Policy,
    steps: u64,
    offer: bool,
    out: Option<&std::path::Path>,
    worker: impl Fn(u32, String) -> (WorkerOptions, Box<dyn GradientSource + Send>),
) -> (f32, Results) {
    let src = model();
    let mut cfg = ServerConfig::new(n, policy, 0.2);
    cfg.max_steps = Some(steps);
    cfg.liveness.stall_timeout = Some(Duration::from_secs(10));
    let mut opts = ServerOptions::new(cfg, src.layout().clone(), src.init_params(0));
    opts.evaluator = Some(Box::new(src));
    opts.shared_memory = offer;
    opts.out = out.map(|p| p.to_path_buf());
    let (server, addr) = serve(opts).await;
    let workers: Vec<_> = (0..n)
        .map(|i| {
            let (wo, source) = worker(i, format!("http://{addr}"));
            tokio::spawn(run_worker(wo, source))
        })
        .collect();
    let summary = tokio::time::timeout(Duration::from_secs(60), server).await.expect("finishes").unwrap().unwrap();
    assert_eq!(summary.steps, steps);
    let mut results = Vec::new();
    for w in workers {
        results.push(w.await.unwrap());
    }
    (summary.final_test_loss.unwrap(), results)
}

/// A sync run of 2 workers, N = 2, over `steps` steps: the server offers shared memory when
/// `offer`, and worker `i` uses it when `use_it[i]`. Its final test loss and worker reports.
async fn run(offer: bool, use_it: [bool; 2], steps: u64) -> (f32, Vec<WorkerReport>) {
    let (loss, results) = cluster(2, Policy::Sync { aggregate: 2, backups: 0 }, steps, offer, None, |i, addr| {
        let mut wo = WorkerOptions::new(i, addr);
        wo.shared_memory = use_it[i as usize];
        (wo, Box::new(model()))
    })
    .await;
    (loss, results.into_iter().map(Result::unwrap).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_through_shared_memory_reach_bit_for_bit_the_parameters_they_reach_over_grpc() {
    // Two gradients a step: their sum is the same in either order, so the runs must agree
    // to the last bit whatever the transport.
    let (grpc, r) = run(false, [true, true], 60).await;
    assert!(r.iter().all(|w| w.sent == 60 && w.shm_pushes == 0), "no shared memory offered: {r:?}");
    let (shared, r) = run(true, [true, true], 60).await;
    assert!(r.iter().all(|w| w.sent == 60 && w.shm_pushes == 60), "every push through shared memory: {r:?}");
    assert_eq!(shared.to_bits(), grpc.to_bits(), "shared memory {shared} against gRPC {grpc}");
    assert!(grpc < 0.05, "it trains: test loss {grpc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_declines_shared_memory_trains_over_grpc_beside_one_that_uses_it() {
    // Worker 1's pulls are answered with the parameters encoded from the shared memory's slot
    // (the server writes each step there only); the evaluator's too.
    let (mixed, r) = run(true, [true, false], 60).await;
    assert_eq!((r[0].shm_pushes, r[1].shm_pushes), (60, 0), "{r:?}");
    let (grpc, _) = run(false, [false, false], 60).await;
    assert_eq!(mixed.to_bits(), grpc.to_bits(), "mixed {mixed} against gRPC {grpc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_the_servers_host_pulls_its_first_step_and_awaits_every_other_in_shared_memory() {
    // Worker 1 declines the shared memory: it pulls every step over gRPC.
    let (_, r) = run(true, [true, false], 60).await;
    assert_eq!((r[0].awaited, r[1].awaited), (59, 0), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_that_carry_no_values_keep_the_connection_through_a_long_run() {
    // A push through shared memory is a small message; an empty HTTP/2 data frame after it
    // would count against the server's flood guard, which closes the connection after a few
    // hundred of them (the workers would reconnect, "lost the parameter server").
    let (_, r) = run(true, [true, true], 1000).await;
    assert!(r.iter().all(|w| w.shm_pushes == 1000 && w.reconnects == 0), "{r:?}");
}

/// A server (shared memory on) for one worker and one step of the synthetic model (64
/// values), and a plain channel to it, for tests that speak the protocol by hand.
async fn one_worker_server(
    out: Option<&std::path::Path>,
) -> (tokio::task::JoinHandle<Result<quorum_net::TrainSummary, quorum_net::server::NetError>>, tonic::transport::Channel)
{
    let src = LeastSquares::new(64, 16, 0.1, 1);
    let mut cfg = ServerConfig::new(1, Policy::Sync { aggregate: 1, backups: 0 }, 0.2);
    cfg.max_steps = Some(1);
    let mut opts = ServerOptions::new(cfg, src.layout().clone(), src.init_params(0));
    opts.out = out.map(|p| p.to_path_buf());
    let (server, addr) = serve(opts).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    (server, channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_naming_a_write_the_servers_memory_does_not_hold_is_told_to_join_again() {
    // As a worker's push lands after a server restart: the new server's file holds nothing of
    // it. "Aborted" makes the worker join again (and open the new file); a refusal would end it.
    use quorum_net::proto::parameter_server_client::ParameterServerClient;
    use quorum_net::proto::GradientChunk;
    use quorum_net::proto::JoinRequest;
    let dir = tempfile::tempdir().unwrap();
    let (server, channel) = one_worker_server(Some(dir.path())).await;
    let mut client = ParameterServerClient::new(channel);
    // Joined (so the refusal is the slot's, not a stranger's), and pushing a write never made.
    client.join(JoinRequest { worker: 0, num_params: 64, session: 5, layout: vec![] }).await.unwrap();
    let push = GradientChunk { worker: 0, step: 0, total: 64, shm: true, shm_seq: 2, session: 5, ..Default::default() };
    let refused = client.push(tokio_stream::iter(vec![push])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Aborted, "{refused:?}");
    assert!(refused.message().contains("in shared memory"), "{}", refused.message());
    assert!(refused.message().contains("join again"), "{}", refused.message());
    // The run's record says so: the gradient's values, sent over gRPC, then end the run.
    let values = quorum_net::encoding::encode(&[0.0; 64]).into();
    let push = GradientChunk { worker: 0, step: 0, total: 64, data: values, session: 5, ..Default::default() };
    client.push(tokio_stream::iter(vec![push])).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), server).await.expect("the run ends").unwrap().unwrap();
    let events = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    let rejected: Vec<&str> = events.lines().filter(|l| l.contains("\"rejected\"")).collect();
    assert_eq!(rejected.len(), 1, "{events}");
    assert!(rejected[0].contains("in shared memory") && rejected[0].contains("join again"), "{}", rejected[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_answered_in_shared_memory_names_the_file_the_join_named() {
    // A worker compares the nonce with its file's: one opened from an earlier server (which
    // restarted) is not read.
    use quorum_net::proto::parameter_server_client::ParameterServerClient;
    use quorum_net::proto::{JoinRequest, ParamsChunk, PullRequest};
    let (server, mut channel) = one_worker_server(None).await;
    let join = ParameterServerClient::new(channel.clone())
        .join(JoinRequest { worker: 0, num_params: 64, session: 1, layout: vec![] })
        .await
        .unwrap()
        .into_inner();
    assert!(!join.shm_path.is_empty() && join.shm_nonce != 0, "{join:?}");
    let mut replies =
        quorum_net::framing::pull(&mut channel, &PullRequest { worker: 0, min_step: 0, shm: true }).await.unwrap();
    let (first, data): (ParamsChunk, _) = replies.next_chunk(quorum_net::framing::PARAMS_DATA).await.unwrap().unwrap();
    assert!(first.shm && data.is_empty(), "{first:?}");
    assert_eq!((first.step, first.total, first.shm_nonce), (0, 64, join.shm_nonce));
    server.abort();
}

/// A run of 3 workers under `policy` (sync: N = 2 of 3), `steps` steps, with `workers.csv` in
/// `out`, the server offering shared memory when `offer`: worker 0's computations take `stuck`
/// unless stopped ([`Hooked::stoppable`]), workers 1 and 2 take 10 ms each; worker 0 may
/// abandon overtaken work when `abandon`. The three workers' results.
async fn one_stuck_worker(
    policy: Policy,
    abandon: bool,
    stuck: Duration,
    steps: u64,
    out: &std::path::Path,
    offer: bool,
) -> Results {
    let ten_ms = Hooked::new(&model(), |_| {
        std::thread::sleep(Duration::from_millis(10));
        Ok(())
    });
    let (_, results) = cluster(3, policy, steps, offer, Some(out), |i, addr| {
        let mut wo = WorkerOptions::new(i, addr);
        wo.abandon = abandon;
        wo.heartbeat_every = Duration::from_millis(100);
        wo.connect_timeout = Duration::from_secs(5);
        let stuck = if i == 0 { stuck } else { Duration::ZERO };
        (wo, Box::new(ten_ms.clone().stoppable(stuck)))
    })
    .await;
    results
}

const N2_OF_3: Policy = Policy::Sync { aggregate: 2, backups: 1 };

/// `workers.csv`'s cell of worker `w` in column `col`.
fn workers_csv(dir: &std::path::Path, w: usize, col: &str) -> String {
    let text = std::fs::read_to_string(dir.join("workers.csv")).unwrap();
    let mut lines = text.lines().map(|l| l.split(',').map(str::to_string).collect::<Vec<_>>());
    let header = lines.next().unwrap();
    let at = header.iter().position(|h| h == col).unwrap_or_else(|| panic!("no column {col}"));
    lines.nth(w).unwrap()[at].clone()
}

/// A run where worker 0 may abandon and each of its computations would take 3 s (shared
/// memory offered when `offer`), checked: every computation of the stuck worker stopped once
/// its step closed, and after each it went on to newer parameters; each was told to the
/// server, which dropped it as late, but the last, which the run's end stopped ("stop" answers
/// it); the others finish theirs; the server's record counts them. The reports and run
/// directory.
async fn stuck_worker_abandons(offer: bool) -> (Vec<WorkerReport>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let r = one_stuck_worker(N2_OF_3, true, Duration::from_secs(3), 20, dir.path(), offer).await;
    let r: Vec<WorkerReport> = r.into_iter().map(Result::unwrap).collect();
    let stuck = &r[0];
    assert!(stuck.abandoned >= 2, "{stuck:?}");
    assert_eq!((stuck.sent, stuck.accepted), (stuck.abandoned, 0), "{stuck:?}");
    assert!(stuck.dropped + 1 >= stuck.abandoned, "{stuck:?}");
    assert!(r[1..].iter().all(|w| w.abandoned == 0 && w.accepted > 0), "the others finish theirs: {r:?}");
    assert_eq!(workers_csv(dir.path(), 0, "abandoned"), stuck.dropped.to_string());
    (r, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stops_a_gradient_half_way_when_its_step_closes_and_goes_on_to_the_newer_one() {
    let (r, dir) = stuck_worker_abandons(true).await;
    // The server's record counts them, with no timings (they did not finish).
    assert_eq!(workers_csv(dir.path(), 0, "dropped"), r[0].dropped.to_string());
    assert_eq!(workers_csv(dir.path(), 0, "mean_compute_seconds"), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_on_another_host_stops_a_gradient_half_way_when_the_next_steps_pull_is_answered() {
    // No shared memory: the worker hears that its step closed from the answer to the pull of
    // the next step, asked for as it starts computing.
    let (r, _dir) = stuck_worker_abandons(false).await;
    assert!(r.iter().all(|w| w.shm_pushes == 0), "no shared memory: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_told_not_to_abandon_finishes_its_overtaken_gradient_and_sends_it_late() {
    // 60 steps of at least 10 ms outlast the stuck worker's 300 ms gradient.
    let dir = tempfile::tempdir().unwrap();
    let r = one_stuck_worker(N2_OF_3, false, Duration::from_millis(300), 60, dir.path(), true).await;
    let stuck = r[0].as_ref().unwrap();
    assert_eq!(stuck.abandoned, 0, "{stuck:?}");
    assert!(stuck.dropped >= 1 && stuck.accepted == 0, "{stuck:?}");
    // It knew each had been overtaken (the shared memory says the server's newest step): a
    // notice without the values, never the gradient in full.
    assert_eq!(stuck.unsent_late, stuck.dropped, "{stuck:?}");
    assert_eq!(workers_csv(dir.path(), 0, "abandoned"), "0");
    assert_ne!(workers_csv(dir.path(), 0, "mean_compute_seconds"), "", "finished gradients are timed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_adaptive_policy_no_worker_abandons_since_its_rule_times_whole_gradients() {
    let dir = tempfile::tempdir().unwrap();
    let r =
        one_stuck_worker(Policy::Adaptive { min: 2, max: 3 }, true, Duration::from_millis(300), 60, dir.path(), true)
            .await;
    let stuck = r[0].as_ref().unwrap();
    assert_eq!(stuck.abandoned, 0, "{stuck:?}");
    assert!(stuck.sent >= 1, "{stuck:?}");
    assert_ne!(workers_csv(dir.path(), 0, "mean_compute_seconds"), "", "its gradients are timed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_hears_stop_while_it_computes_ends_cleanly_instead_of_losing_the_server() {
    // Its gradient (30 s, not stoppable: abandon off) outlasts the run. The server says "stop"
    // in a heartbeat's reply and may exit once every worker has heard it; a worker that went on
    // computing found the server gone and failed ("unreachable") a connect time-out later.
    let dir = tempfile::tempdir().unwrap();
    let r = one_stuck_worker(N2_OF_3, false, Duration::from_secs(30), 20, dir.path(), true).await;
    let stuck = r[0].as_ref().expect("a clean end");
    assert_eq!((stuck.abandoned, stuck.sent), (0, 0), "{stuck:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_that_read_the_parameters_in_place_reach_bit_for_bit_what_they_reach_over_grpc() {
    // A worker that abandons overtaken work computes on the parameters where the server wrote
    // them. Deadline with min = both workers: every step averages both gradients, whichever
    // way the values travel, so the runs must agree to the last bit. (A deadline step closes
    // once every joined worker is in: each worker's first gradient waits for the other's, so
    // that step 0 does not close on one worker while the other is still joining.)
    let run = |shm: bool| async move {
        use std::sync::atomic::{AtomicU32, Ordering};
        let policy = Policy::Deadline { min: 2, timeout: Duration::from_secs(10) };
        let first = std::sync::Arc::new(AtomicU32::new(0));
        let (loss, results) = cluster(2, policy, 60, shm, None, |i, addr| {
            let first = first.clone();
            let both_joined = move |b: quorum_compute::BatchId| {
                if b.step == 0 {
                    first.fetch_add(1, Ordering::SeqCst);
                    while first.load(Ordering::SeqCst) < 2 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                Ok(())
            };
            (WorkerOptions::new(i, addr), Box::new(Hooked::new(&model(), both_joined).stoppable(Duration::ZERO)))
        })
        .await;
        (loss, results.into_iter().map(Result::unwrap).collect::<Vec<_>>())
    };
    let (grpc, r) = run(false).await;
    assert!(r.iter().all(|w| w.params_in_place == 0), "{r:?}");
    let (in_place, r) = run(true).await;
    assert!(r.iter().all(|w| w.params_in_place == 60 && w.shm_pushes == 60), "{r:?}");
    assert_eq!(in_place.to_bits(), grpc.to_bits(), "in place {in_place} against gRPC {grpc}");
    assert!(grpc < 0.05, "it trains: test loss {grpc}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_awaiting_its_next_step_in_shared_memory_notices_that_the_server_died() {
    // Worker 1's gradients take 300 ms, so worker 0 (N = 2 of 2) spends its time awaiting the
    // next step in the shared memory, where no call of its own fails when the server dies.
    // Only its heartbeats can tell, and they must end the wait, as they end a pull's: the
    // worker then finds no server to reconnect to and says so, instead of waiting for ever.
    let src = model();
    let mut cfg = ServerConfig::new(2, Policy::Sync { aggregate: 2, backups: 0 }, 0.2);
    cfg.max_steps = Some(1000);
    let mut opts = ServerOptions::new(cfg, src.layout().clone(), src.init_params(0));
    let (stepped, three_steps) = std::sync::mpsc::channel();
    opts.progress = Some(Box::new(move |p: &quorum_net::server::Progress| {
        if p.step == 3 {
            let _ = stepped.send(());
        }
    }));
    let (server, addr) = serve(opts).await;
    let options = |i| {
        let mut wo = WorkerOptions::new(i, format!("http://{addr}"));
        wo.heartbeat_every = Duration::from_millis(100);
        wo.rpc_timeout = Duration::from_secs(1);
        wo.connect_timeout = Duration::from_secs(1);
        wo
    };
    let slow = Hooked::new(&model(), |_| {
        std::thread::sleep(Duration::from_millis(300));
        Ok(())
    });
    let w0 = tokio::spawn(run_worker(options(0), Box::new(model())));
    let w1 = tokio::spawn(run_worker(options(1), Box::new(slow)));
    tokio::task::spawn_blocking(move || three_steps.recv().unwrap()).await.unwrap();
    server.abort();
    let ended = tokio::time::timeout(Duration::from_secs(20), w0).await;
    let r0 = ended.expect("worker 0 still awaits a step of a server that died").unwrap();
    let Err(e @ quorum_net::worker::WorkerError::Unreachable { .. }) = r0 else {
        panic!("worker 0 should find the server gone: {r0:?}")
    };
    assert!(e.to_string().contains("cannot reach the parameter server"), "{e}");
    w1.abort();
}
