//! The link between the shards of a sharded run and the coordinator (shard 0): one
//! `Coordinator.Follow` stream per other shard. Up it go the slices the shard holds whole;
//! down it come the steps the coordinator commits. Either end losing the stream stops the
//! run with a message that says which shard, rather than letting steps wait for ever.

use super::service::{shutting_down, Command};
use crate::proto::coordinator_client::CoordinatorClient;
use crate::proto::coordinator_server::Coordinator;
use crate::proto::{CommitNotice, ResumeAt, ResumeOffer, ShardReport};
use std::pin::Pin;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

/// What a run stopped by a lost shard says to do.
const RESTART: &str = "start every shard again with --resume (a sharded `quorum train --resume` finds the newest \
                       step every shard wrote; separate shards are told the step if theirs differ)";

/// Shard 0's side: the `Coordinator` service.
pub(super) struct CoordinatorService {
    pub(super) commands: mpsc::Sender<Command>,
    /// The step this run started from: what an offer of checkpoints is answered with.
    pub(super) start: u64,
}

type NoticeStream = Pin<Box<dyn Stream<Item = Result<CommitNotice, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    type FollowStream = NoticeStream;

    async fn follow(&self, req: Request<Streaming<ShardReport>>) -> Result<Response<NoticeStream>, Status> {
        let mut reports = req.into_inner();
        let hello = reports
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("a follower must first say which shard it is"))?;
        let shard = hello.shard;
        let (tx, rx) = mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        let follow = Command::Follow { hello, stream: tx, reply };
        self.commands.send(follow).await.map_err(shutting_down)?;
        answer.await.map_err(shutting_down)?.map_err(Status::failed_precondition)?;
        let commands = self.commands.clone();
        tokio::spawn(async move {
            let why = loop {
                match reports.message().await {
                    Ok(Some(r)) => {
                        if commands.send(Command::Report(r)).await.is_err() {
                            return;
                        }
                    }
                    Ok(None) => break format!("shard {shard} closed its link to the coordinator"),
                    Err(e) => break format!("shard {shard}'s link to the coordinator broke: {}", e.message()),
                }
            };
            // A stopped run no longer needs its followers; the driver ignores this then.
            let why = format!("{why}; no step can close without that shard's slices: {RESTART}");
            let _ = commands.send(Command::LinkLost(why)).await;
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))))
    }

    async fn resume(&self, req: Request<ResumeOffer>) -> Result<Response<ResumeAt>, Status> {
        super::agree::answer_running(self.start, req.get_ref()).map(Response::new)
    }
}

/// A follower's side: connects to the coordinator at `opts.server`, says `hello`, then sends
/// every report from `reports` and hands every notice to the loop, until either end stops.
pub(super) async fn follow_coordinator(
    opts: crate::worker::WorkerOptions,
    hello: ShardReport,
    reports: mpsc::UnboundedReceiver<ShardReport>,
    commands: mpsc::Sender<Command>,
) {
    let shard = hello.shard;
    let lost = |why: String| {
        Command::LinkLost(format!("shard {shard} lost the coordinator at {}: {why}; {RESTART}", opts.server))
    };
    let channel = match crate::worker::connect(&opts).await {
        Ok((_, channel)) => channel,
        Err(e) => {
            let _ = commands.send(lost(e.to_string())).await;
            return;
        }
    };
    let mut client = CoordinatorClient::new(channel);
    let up = tokio_stream::iter([hello]).chain(tokio_stream::wrappers::UnboundedReceiverStream::new(reports));
    let mut notices = match client.follow(up).await {
        Ok(r) => r.into_inner(),
        Err(s) => {
            let _ = commands.send(lost(s.message().to_string())).await;
            return;
        }
    };
    loop {
        match notices.message().await {
            Ok(Some(n)) => {
                let stop = n.stop;
                if commands.send(Command::Commit(n)).await.is_err() || stop {
                    return;
                }
            }
            Ok(None) => {
                let _ = commands.send(lost("the coordinator closed the link".into())).await;
                return;
            }
            Err(s) => {
                let _ = commands.send(lost(s.message().to_string())).await;
                return;
            }
        }
    }
}
