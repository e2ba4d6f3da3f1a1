//! A sharded run as a worker sees it: every shard joined, each step's parameters pulled from
//! all of them (never mixing steps), each gradient pushed to all of them at once, a slice
//! each.

use super::link::{connect_to, lost_or_refused, within, Channel_, PullTask};
use super::{Computed, Exit, Params, Pulled, Session, SessionEnd, WorkerError, WorkerOptions, WorkerReport};
use crate::proto::*;
use bytes::Bytes;
use std::time::Instant;

/// A shard other than 0: its connection and its range of the parameters.
pub(super) struct ShardLink {
    pub(super) channel: Channel_,
    pub(super) range: std::ops::Range<usize>,
}

/// A sharded run: joins every other shard, checking that each is the shard its place in the
/// worker's list says and that the list names them all. One server: nothing to do.
pub(super) async fn join_others(
    opts: &WorkerOptions,
    first: &JoinReply,
    request: &JoinRequest,
) -> Result<Vec<ShardLink>, Exit> {
    let w = opts.index;
    let shards = first.shards.max(1);
    let refuse = |message: String| Exit::Fail(WorkerError::Refused { worker: w, message });
    if shards as usize != opts.shards.len() + 1 || first.shard != 0 {
        return Err(refuse(format!(
            "the server at {} is shard {} of {shards}, but this worker was given {} server address(es); give it \
             every shard's address, shard 0 first",
            opts.server,
            first.shard,
            opts.shards.len() + 1
        )));
    }
    let mut links = Vec::with_capacity(opts.shards.len());
    for (i, addr) in opts.shards.iter().enumerate() {
        let (mut client, channel) = connect_to(opts, addr).await?;
        let reply = match within(opts.rpc_timeout, "join", client.join(request.clone())).await {
            Ok(r) => r.into_inner(),
            // This shard has not heard from the coordinator that this process holds the index
            // (yet, or another one does): wait and join again, as at shard 0.
            Err(s) if s.code() == tonic::Code::AlreadyExists => {
                return Err(Exit::End(SessionEnd::IndexHeld { why: s.message().to_string() }))
            }
            Err(s) => return Err(Exit::from(lost_or_refused(w, s))),
        };
        if reply.shard as usize != i + 1 || reply.shards != shards {
            return Err(refuse(format!(
                "the server at {addr} is shard {} of {}, but it is listed as shard {} of {shards}; list the shards in order",
                reply.shard,
                reply.shards,
                i + 1
            )));
        }
        links.push(ShardLink { channel, range: reply.start as usize..reply.end as usize });
    }
    Ok(links)
}

impl Session<'_> {
    /// A sharded run: every shard's part of one step. Shards apply a step one after another,
    /// so a part newer than the rest is matched by asking the others for that step.
    pub(super) async fn pull_shards(&mut self, first: PullTask, t_pull: Instant) -> Result<Pulled, Exit> {
        let w = self.opts.index;
        let n = self.others.len() + 1;
        let min_step = first.min_step;
        let mut tasks: Vec<Option<PullTask>> = std::iter::once(Some(first))
            .chain(self.others.iter().map(|l| Some(PullTask::start(&l.channel, w, min_step, false))))
            .collect();
        let mut steps = vec![0; n];
        let mut first_chunk: Option<Instant> = None;
        loop {
            for (i, task) in tasks.iter_mut().enumerate() {
                let Some(task) = task.take() else { continue };
                let len = if i == 0 { self.range.len() } else { self.others[i - 1].range.len() };
                let buffer = std::mem::take(&mut self.parts[i]);
                let (step, part, at) = self.read_pull(task, len, buffer).await?;
                self.parts[i] = part.into_owned();
                steps[i] = step;
                first_chunk = first_chunk.or(at);
            }
            let newest = steps.iter().copied().max().unwrap_or(min_step);
            if steps.iter().all(|&s| s == newest) {
                break;
            }
            for (i, task) in tasks.iter_mut().enumerate() {
                if steps[i] < newest {
                    let channel = if i == 0 { &self.channel } else { &self.others[i - 1].channel };
                    *task = Some(PullTask::start(channel, w, newest, false));
                }
            }
        }
        let mut params = std::mem::take(&mut self.params_buffer);
        params.resize(self.num_params, 0.0);
        let ranges = std::iter::once(self.range.clone()).chain(self.others.iter().map(|l| l.range.clone()));
        for (range, part) in ranges.zip(&self.parts) {
            params[range].copy_from_slice(part);
        }
        let seconds = first_chunk.map_or(t_pull.elapsed(), |t| t.elapsed()).as_secs_f64();
        Ok(Pulled { step: steps[0], params: Params::Owned(params), seconds })
    }

    /// A sharded run: every shard its slice, all at once. The gradient counts only if every
    /// shard holds its slice (the coordinator decides); a shard that says "late" means the
    /// step has closed for the whole model.
    pub(super) async fn push_shards(
        &mut self,
        done: Computed,
        report: &mut WorkerReport,
        notice: bool,
    ) -> Result<(), Exit> {
        let head = self.head(&done);
        let grad = done.grad.into_buffer();
        report.sent += 1;
        let links = std::iter::once((self.channel.clone(), self.range.clone()))
            .chain(self.others.iter().map(|l| (l.channel.clone(), l.range.clone())));
        let mut pushes = tokio::task::JoinSet::new();
        for (mut channel, range) in links {
            let head = GradientChunk { total: range.len() as u64, ..head.clone() };
            let enc = self.enc;
            let slice = grad[range].to_vec();
            let limit = self.opts.rpc_timeout;
            pushes.spawn(async move {
                if notice {
                    let frames =
                        crate::framing::push_frames(&GradientChunk { total: 0, ..head.clone() }, vec![Bytes::new()]);
                    match within(limit, "push", crate::framing::push(&mut channel, frames)).await {
                        Ok(r) if r.outcome() == PushOutcome::Late || r.stop => return (Ok(r), true),
                        // Anything else: send the slice in full below.
                        _ => {}
                    }
                }
                let frames = crate::framing::push_frames(&head, enc.encode_chunks(slice));
                (within(limit, "push", crate::framing::push(&mut channel, frames)).await, false)
            });
        }
        // Each shard's slice is a copy: the whole gradient's buffer serves the next one.
        self.grads.give(grad);
        let (mut late, mut stop, mut all_notices, mut failed) = (false, false, true, None);
        while let Some(joined) = pushes.join_next().await {
            let (pushed, was_notice) =
                joined.unwrap_or_else(|e| (Err(tonic::Status::unknown(format!("push task failed: {e}"))), false));
            match pushed {
                Ok(r) => {
                    stop |= r.stop || r.outcome() == PushOutcome::Stopped;
                    late |= matches!(r.outcome(), PushOutcome::Late | PushOutcome::TooStale);
                    all_notices &= was_notice;
                }
                // Heard out: another shard may say "stop" (a shard that stopped may be gone).
                Err(s) => failed = failed.or(Some(s)),
            }
        }
        if stop {
            return Err(Exit::End(SessionEnd::Stopped));
        }
        if let Some(s) = failed {
            return Err(self.push_failed(s).await);
        }
        report.unsent_late += u64::from(notice && late && all_notices);
        if late {
            report.dropped += 1;
        } else {
            report.held += 1;
        }
        Ok(())
    }
}
