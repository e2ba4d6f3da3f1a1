//! Workers on the server's host move parameters and gradients through its shared memory
//! (`quorum_net::shm`); every request still goes over gRPC, on loopback here.

use quorum_compute::{GradientSource, LeastSquares};
use quorum_core::{Policy, ServerConfig};
use quorum_net::worker::WorkerReport;
use quorum_net::{run_server, run_worker, ServerOptions, WorkerOptions};
use std::time::Duration;

/// A sync run of 2 workers, N = 2, over `steps` steps: the server offers shared memory when
/// `offer`, and worker `i` uses it when `use_it[i]`. Its final test loss and worker reports.
async fn run(offer: bool, use_it: [bool; 2], steps: u64) -> (f32, Vec<WorkerReport>) {
    let src = LeastSquares::new(64, 16, 0.1, 1);
    let mut cfg = ServerConfig::new(2, Policy::Sync { aggregate: 2, backups: 0 }, 0.2);
    cfg.max_steps = Some(steps);
    cfg.liveness.stall_timeout = Some(Duration::from_secs(10));
    let mut opts = ServerOptions::new(cfg, src.layout().clone(), src.init_params(0));
    opts.evaluator = Some(Box::new(src.clone()));
    opts.shared_memory = offer;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(run_server(listener, opts, std::future::pending()));
    let workers: Vec<_> = (0..2)
        .map(|i| {
            let mut wo = WorkerOptions::new(i, format!("http://{addr}"));
            wo.shared_memory = use_it[i as usize];
            tokio::spawn(run_worker(wo, Box::new(src.clone()) as Box<dyn GradientSource + Send>))
        })
        .collect();
    let summary = tokio::time::timeout(Duration::from_secs(60), server).await.expect("finishes").unwrap().unwrap();
    assert_eq!(summary.steps, steps);
    let mut reports = Vec::new();
    for w in workers {
        reports.push(w.await.unwrap().unwrap());
    }
    (summary.final_test_loss.unwrap(), reports)
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
) -> (tokio::task::JoinHandle<Result<quorum_net::TrainSummary, quorum_net::server::NetError>>, tonic::transport::Channel)
{
    let src = LeastSquares::new(64, 16, 0.1, 1);
    let mut cfg = ServerConfig::new(1, Policy::Sync { aggregate: 1, backups: 0 }, 0.2);
    cfg.max_steps = Some(1);
    let opts = ServerOptions::new(cfg, src.layout().clone(), src.init_params(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(run_server(listener, opts, std::future::pending()));
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    (server, channel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_naming_a_write_the_servers_memory_does_not_hold_is_told_to_join_again() {
    // As a worker's push lands after a server restart: the new server's file holds nothing of
    // it. "Aborted" makes the worker join again (and open the new file); a refusal would end it.
    use quorum_net::proto::parameter_server_client::ParameterServerClient;
    use quorum_net::proto::GradientChunk;
    let (server, channel) = one_worker_server().await;
    let push = GradientChunk { worker: 0, step: 0, total: 64, shm: true, shm_seq: 2, ..Default::default() };
    let refused = ParameterServerClient::new(channel).push(tokio_stream::iter(vec![push])).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Aborted, "{refused:?}");
    assert!(refused.message().contains("join again"), "{}", refused.message());
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_answered_in_shared_memory_names_the_file_the_join_named() {
    // A worker compares the nonce with its file's: one opened from an earlier server (which
    // restarted) is not read.
    use quorum_net::proto::parameter_server_client::ParameterServerClient;
    use quorum_net::proto::{JoinRequest, ParamsChunk, PullRequest};
    let (server, mut channel) = one_worker_server().await;
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
