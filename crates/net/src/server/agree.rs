//! Where a resumed sharded run starts when its shards are separate processes: the newest
//! step **every** shard has a checkpoint of. A shard killed with `kill -9` may have written
//! fewer checkpoints than the others, so each shard's own newest is not enough.
//!
//! Before its server starts, each other shard offers the coordinator (shard 0) the steps it
//! has checkpoints of (`Coordinator.Resume`); the coordinator, listening on its own address
//! but not serving workers yet, waits until every shard has offered, answers all of them with
//! the newest step in every list (its own included), and every shard then loads that step.
//! Workers that call meanwhile are told the server is not ready (UNAVAILABLE), which they
//! treat as a server still starting. A coordinator that is not resuming this way (a fresh
//! run, or `--resume-step`) answers an offer at once with the step it started from, when
//! the shard has it.

use super::NetError;
use crate::proto::coordinator_client::CoordinatorClient;
use crate::proto::coordinator_server::{Coordinator, CoordinatorServer};
use crate::proto::parameter_server_server::ParameterServerServer;
use crate::proto::{CommitNotice, ResumeAt, ResumeOffer, ShardReport};
use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::{Stream, StreamExt};
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

/// The newest step every list holds, if any.
pub fn newest_common<'a>(lists: impl IntoIterator<Item = &'a [u64]>) -> Option<u64> {
    let mut common: Option<BTreeSet<u64>> = None;
    for l in lists {
        let steps: BTreeSet<u64> = l.iter().copied().collect();
        common = Some(match common {
            None => steps,
            Some(c) => c.intersection(&steps).copied().collect(),
        });
    }
    common?.last().copied()
}

/// What the coordinator needs to agree: how many shards, its own checkpoint steps, and how
/// its listener is served meanwhile (the run's token and TLS).
pub struct Agreement {
    /// Shards in the run.
    pub shards: u32,
    /// Steps shard 0 has checkpoints of.
    pub steps: Vec<u64>,
    /// The run's join token.
    pub token: Option<crate::auth::Token>,
    /// The run's TLS files.
    pub tls: crate::tls::TlsFiles,
}

type Offer = (ResumeOffer, oneshot::Sender<Result<u64, Status>>);

/// Shard 0's side: serves `listener` only for offers until every other shard has offered,
/// answers them all, and gives the listener back with the agreed step.
pub async fn agree_as_coordinator(
    listener: tokio::net::TcpListener,
    a: Agreement,
) -> Result<(tokio::net::TcpListener, u64), NetError> {
    let listener = Arc::new(listener);
    let (tx, mut rx) = mpsc::channel::<Offer>(64);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let token = crate::auth::CheckToken(a.token.clone());
    let incoming = Accepting(listener.clone());
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = a.tls.server()? {
        builder = builder.tls_config(tls)?;
    }
    let not_ready = NotReady(format!(
        "shard 0 is not serving yet: it is waiting for the other {} shard(s) to say which checkpoints they have \
         (every shard must be started with --resume)",
        a.shards - 1
    ));
    let grpc = tokio::spawn(
        builder
            .add_service(not_ready)
            .add_service(InterceptedService::new(CoordinatorServer::new(Offers(tx)), token))
            .serve_with_incoming_shutdown(incoming, async {
                let _ = stop_rx.await;
            }),
    );
    let mut offers: BTreeMap<u32, Offer> = BTreeMap::new();
    while offers.len() + 1 < a.shards as usize {
        let Some((offer, reply)) = rx.recv().await else { break };
        let k = offer.shard;
        if offer.shards != a.shards || k == 0 || k >= a.shards {
            let _ = reply.send(Err(Status::failed_precondition(format!(
                "shard {k} of {} offered its checkpoints, but this run has {} shards (shard 0 coordinates): start \
                 every shard with the same number of shards",
                offer.shards, a.shards
            ))));
            continue;
        }
        if let Some((_, old)) = offers.insert(k, (offer, reply)) {
            let _ = old.send(Err(Status::already_exists(format!("another process offered as shard {k}"))));
        }
        let missing: Vec<String> = (1..a.shards).filter(|s| !offers.contains_key(s)).map(|s| s.to_string()).collect();
        if !missing.is_empty() {
            println!("shard {k} offered its checkpoints; waiting for shard(s) {}", missing.join(", "));
        }
    }
    let mut lists = vec![("0".to_string(), a.steps.clone())];
    lists.extend(offers.iter().map(|(k, (o, _))| (k.to_string(), o.steps.clone())));
    let agreed = newest_common(lists.iter().map(|(_, l)| l.as_slice()));
    for (_, (_, reply)) in std::mem::take(&mut offers) {
        let _ = reply.send(agreed.ok_or_else(|| Status::failed_precondition(no_common(&lists))));
    }
    let _ = stop_tx.send(());
    let mut grpc = grpc;
    if tokio::time::timeout(Duration::from_secs(3), &mut grpc).await.is_err() {
        grpc.abort();
        let _ = grpc.await;
    }
    let listener = Arc::try_unwrap(listener).map_err(|_| {
        NetError::Config(quorum_core::ConfigError::invalid("the listener is still in use after the agreement"))
    })?;
    let step = agreed.ok_or_else(|| NetError::Config(quorum_core::ConfigError::invalid(no_common(&lists))))?;
    Ok((listener, step))
}

/// The message when the shards have no checkpoint step in common.
fn no_common(lists: &[(String, Vec<u64>)]) -> String {
    let have: Vec<String> = lists
        .iter()
        .map(|(k, l)| {
            let steps: Vec<String> = l.iter().map(u64::to_string).collect();
            format!("shard {k}: {}", if steps.is_empty() { "none".into() } else { steps.join(", ") })
        })
        .collect();
    format!(
        "nothing to resume: no step has a checkpoint on every shard ({}); run every shard without --resume to \
         start afresh",
        have.join("; ")
    )
}

/// Another shard's side: offers `steps` to the coordinator at `opts.server` (waiting for it
/// to come up, within the connect time-out) and returns the step every shard starts from.
pub async fn agree_as_follower(
    opts: &crate::worker::WorkerOptions,
    shard: u32,
    shards: u32,
    steps: Vec<u64>,
) -> Result<u64, NetError> {
    let started = std::time::Instant::now();
    loop {
        let (_, channel) = crate::worker::connect(opts).await.map_err(|e| NetError::Agree(e.to_string()))?;
        let offer = ResumeOffer { shard, shards, steps: steps.clone() };
        match CoordinatorClient::new(channel).resume(offer).await {
            Ok(r) => return Ok(r.into_inner().step),
            // The coordinator restarting, or still in a previous run's shutdown: try again.
            Err(s) if s.code() == tonic::Code::Unavailable && started.elapsed() < opts.connect_timeout => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(s) => {
                return Err(NetError::Agree(format!(
                    "shard {shard} offered its checkpoints to the coordinator at {}: {}",
                    opts.server,
                    s.message()
                )))
            }
        }
    }
}

/// A running coordinator's answer to an offer: the step it started from, if the shard has it.
pub(super) fn answer_running(start: u64, offer: &ResumeOffer) -> Result<ResumeAt, Status> {
    if offer.steps.contains(&start) {
        return Ok(ResumeAt { step: start });
    }
    let have: Vec<String> = offer.steps.iter().map(u64::to_string).collect();
    Err(Status::failed_precondition(format!(
        "shard 0 (the coordinator) started at step {start} (it was not started with --resume, or with \
         --resume-step), and shard {} has no checkpoint of that step (it has: {}): start every shard the same \
         way, all with --resume",
        offer.shard,
        if have.is_empty() { "none".into() } else { have.join(", ") }
    )))
}

/// The coordinator's service while it agrees: takes offers; a follower that tries to follow
/// already was not started with --resume.
struct Offers(mpsc::Sender<Offer>);

type NoticeStream = Pin<Box<dyn Stream<Item = Result<CommitNotice, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for Offers {
    type FollowStream = NoticeStream;

    async fn follow(&self, req: Request<Streaming<ShardReport>>) -> Result<Response<NoticeStream>, Status> {
        let shard = match req.into_inner().next().await {
            Some(Ok(hello)) => hello.shard.to_string(),
            _ => "?".into(),
        };
        Err(Status::failed_precondition(format!(
            "shard 0 is resuming and waits for every shard to offer its checkpoints, but shard {shard} was started \
             without --resume: start it again with --resume"
        )))
    }

    async fn resume(&self, req: Request<ResumeOffer>) -> Result<Response<ResumeAt>, Status> {
        let (reply, answer) = oneshot::channel();
        self.0.send((req.into_inner(), reply)).await.map_err(super::service::shutting_down)?;
        let step = answer.await.map_err(super::service::shutting_down)??;
        Ok(Response::new(ResumeAt { step }))
    }
}

/// Connections accepted on a listener this phase shares (it goes back to the run after).
struct Accepting(Arc<tokio::net::TcpListener>);

impl Stream for Accepting {
    type Item = std::io::Result<tokio::net::TcpStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_accept(cx).map(|r| Some(r.map(|(s, _)| s)))
    }
}

/// Every worker call while the coordinator agrees: UNAVAILABLE, which a worker takes for a
/// server still starting (it tries again within its connect time-out).
#[derive(Clone)]
struct NotReady(String);

impl tonic::server::NamedService for NotReady {
    const NAME: &'static str = <ParameterServerServer<super::service::Service> as tonic::server::NamedService>::NAME;
}

impl tonic::codegen::Service<http::Request<tonic::body::Body>> for NotReady {
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
        std::future::ready(Ok(Status::unavailable(self.0.clone()).into_http()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agreed_step_is_the_newest_every_shard_has() {
        let lists: [&[u64]; 3] = [&[300, 200, 100], &[200, 100], &[300, 200]];
        assert_eq!(newest_common(lists), Some(200));
        let none: [&[u64]; 2] = [&[300], &[200]];
        assert_eq!(newest_common(none), None);
    }

    #[test]
    fn a_running_coordinator_answers_its_start_step_only_to_a_shard_that_has_it() {
        let offer = ResumeOffer { shard: 2, shards: 3, steps: vec![200, 100] };
        assert_eq!(answer_running(200, &offer).map(|a| a.step).ok(), Some(200));
        let e = answer_running(300, &offer).unwrap_err();
        assert!(e.message().contains("shard 2 has no checkpoint of that step (it has: 200, 100)"), "{}", e.message());
    }
}
