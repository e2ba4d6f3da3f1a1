//! A step's computation on the worker: the parameters it reads (a buffer, or in place in the
//! server's shared memory), where its gradient goes, the gradient computed on a blocking thread
//! with heartbeats meanwhile, and giving up work that its step's closing overtook.

use super::{tally, within, Exit, Local, PullTask, Pulled, Session, SessionEnd, WorkerError, WorkerReport};
use crate::proto::*;
use bytes::Bytes;
use quorum_compute::BatchId;
use quorum_core::WorkerId;
use std::time::{Duration, Instant};

/// A step's parameters as pulled.
pub(super) enum Params {
    /// In this worker's buffer.
    Owned(Vec<f32>),
    /// Where the server wrote them in its shared memory, not copied: only for a worker that
    /// abandons overtaken work, since the slot is rewritten only once the step is 4 steps
    /// overtaken ([`crate::shm::ParamsView`]).
    Shared(crate::shm::ParamsView),
}

impl Params {
    pub(super) fn values(&self) -> &[f32] {
        match self {
            Params::Owned(v) => v,
            Params::Shared(view) => view.values(),
        }
    }

    /// Whether the values are still the step's (a view's slot not rewritten since).
    pub(super) fn intact(&self) -> bool {
        match self {
            Params::Owned(_) => true,
            Params::Shared(view) => view.intact(),
        }
    }

    /// The values in a buffer (copied out of a view, which sharded runs never use).
    pub(super) fn into_owned(self) -> Vec<f32> {
        match self {
            Params::Owned(v) => v,
            Params::Shared(view) => view.values().to_vec(),
        }
    }
}

/// A gradient computed on a step's parameters.
pub(super) struct Computed {
    pub(super) step: u64,
    pub(super) grad: Gradient,
    pub(super) loss: f32,
    pub(super) seconds: f64,
    pub(super) pull_seconds: f64,
}

/// Where a gradient was computed into.
pub(super) enum Gradient {
    /// A buffer, sent over gRPC.
    Buffer(Vec<f32>),
    /// This worker's slot of the server's shared memory, written in place: the push names it.
    Shared(crate::shm::GradientWrite),
}

impl Gradient {
    pub(super) fn len(&self) -> usize {
        match self {
            Gradient::Buffer(g) => g.len(),
            Gradient::Shared(w) => w.len(),
        }
    }

    /// The values in a buffer (copied out of a shared slot, which sharded runs never use).
    pub(super) fn into_buffer(self) -> Vec<f32> {
        match self {
            Gradient::Buffer(g) => g,
            Gradient::Shared(mut w) => w.values().to_vec(),
        }
    }
}

impl Session<'_> {
    /// Sleeps the injected delay, then computes the gradient on a blocking thread, with
    /// heartbeats meanwhile so a slow gradient is not taken for death. `None`: the worker's
    /// rule abandons overtaken work, and the step closed before the gradient was done.
    pub(super) async fn compute(&mut self, pulled: Pulled, local: &mut Local<'_>) -> Result<Option<Computed>, Exit> {
        let w = self.opts.index;
        // Where the worker abandons overtaken work without the server's shared memory, the
        // answer to a pull of the next step, asked for now (and used next), tells it that its
        // step closed.
        let next_told = match self.rule.abandons() && self.shm.is_none() {
            true => {
                let told = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let pull = PullTask::start_told(&self.channel, w, pulled.step + 1, false, Some(told.clone()));
                self.pending = Some(pull);
                Some(told)
            }
            false => None,
        };
        // The injected delay stands for a slower machine: it counts in the compute time the
        // push reports (workers.csv, the slowest worker), as the simulator counts it.
        let started = Instant::now();
        if let Some(d) = &self.opts.delay {
            let secs = d.sample(w, *local.draws, local.rng);
            *local.draws += 1;
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        }
        let Pulled { step, params, seconds: pull_seconds } = pulled;
        local.report.params_in_place += u64::from(matches!(params, Params::Shared(_)));
        // Where the worker abandons overtaken work: the shared memory says when the step closed,
        // else the answer to the pull above. (And "stop", heard below, ends any computation
        // that can stop.)
        let watch = self.shm.clone().filter(|_| self.rule.abandons());
        let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop_seen = std::sync::Arc::clone(&stopped);
        let closed = move || {
            stop_seen.load(std::sync::atomic::Ordering::Relaxed)
                || next_told.as_ref().is_some_and(|t| t.load(std::sync::atomic::Ordering::Relaxed))
                || watch.as_ref().and_then(|r| r.newest()).is_some_and(|newest| newest > step)
        };
        if closed() {
            // (It closed while the injected delay slept: nothing computed.)
            self.keep(params);
            return self.abandon(step, local.report).await.map(|()| None);
        }
        let mut src = local.source.take().expect("source is returned after every computation");
        let t0 = Instant::now();
        // Into this worker's slot of the server's shared memory where there is one (no copy
        // there afterwards), else (or while the server still reads the slot, for a process of
        // this index before this one) into a buffer for gRPC.
        let mut grad = match self.shm.as_ref().and_then(|region| region.gradient_write(w)) {
            Some(slot) => Gradient::Shared(slot),
            None => Gradient::Buffer(self.grads.take()),
        };
        let (stoppable, len) = (self.rule.abandons(), self.num_params);
        let mut task = tokio::task::spawn_blocking(move || {
            let batch = BatchId { worker: WorkerId(w), step };
            let loss = match &mut grad {
                Gradient::Buffer(g) if stoppable => {
                    g.resize(len, 0.0);
                    src.gradient_into_unless(params.values(), batch, g, &closed)
                }
                Gradient::Buffer(g) => src.gradient(params.values(), batch, g),
                Gradient::Shared(slot) => src.gradient_into_unless(params.values(), batch, slot.values(), &closed),
            };
            (src, loss.map(|loss| (loss, grad)), params)
        });
        let beat = self.heartbeat_request();
        let (src, result, params) = loop {
            tokio::select! {
                done = &mut task => match done {
                    Ok(done) => break done,
                    Err(e) => {
                        let message = match e.try_into_panic() {
                            Ok(p) => p
                                .downcast_ref::<&str>()
                                .map(|m| m.to_string())
                                .or_else(|| p.downcast_ref::<String>().cloned())
                                .unwrap_or_else(|| "no message".into()),
                            Err(e) => e.to_string(),
                        };
                        return Err(Exit::Fail(WorkerError::Panicked { worker: w, message }));
                    }
                },
                _ = tokio::time::sleep(self.heartbeat_every) => {
                    // Failures here are noticed by the push that follows. "Stop" ends the worker
                    // now: nothing it computes will be used, and the server, having told it, may
                    // be gone by the time the gradient is done. (The computation stops too where
                    // it can; else its thread finishes it unheeded.)
                    let beat = within(self.opts.rpc_timeout, "heartbeat", self.client.heartbeat(beat)).await;
                    if beat.is_ok_and(|r| r.get_ref().stop) {
                        stopped.store(true, std::sync::atomic::Ordering::Relaxed);
                        return Err(Exit::End(SessionEnd::Stopped));
                    }
                }
            }
        };
        local.report.compute_seconds += t0.elapsed().as_secs_f64();
        let seconds = started.elapsed().as_secs_f64();
        *local.source = Some(src);
        // Parameters read in place whose slot a later step took meanwhile: what was computed
        // is not the step's gradient (and the step closed long ago).
        let overwritten = !params.intact();
        self.keep(params);
        let (loss, grad) = match result {
            Err(quorum_compute::ComputeError::Abandoned) => {
                return self.abandon(step, local.report).await.map(|()| None)
            }
            _ if overwritten => return self.abandon(step, local.report).await.map(|()| None),
            r => r.map_err(|source| WorkerError::Compute { worker: w, source })?,
        };
        Ok(Some(Computed { step, grad, loss, seconds, pull_seconds }))
    }

    /// Gives up the computation on `step`, whose step closed without it: the rule hears of
    /// the newer step, and the server gets a late notice flagged `abandoned` (no values, no
    /// timings), so its records count the worker's work on the step.
    async fn abandon(&mut self, step: u64, report: &mut WorkerReport) -> Result<(), Exit> {
        report.abandoned += 1;
        if let Some(newest) = self.shm.as_ref().and_then(|r| r.newest()) {
            self.rule.on_news(newest);
        }
        let head = GradientChunk {
            worker: self.opts.index,
            step,
            loss: f32::NAN,
            session: self.id,
            abandoned: true,
            ..Default::default()
        };
        report.sent += 1;
        let frames = crate::framing::push_frames(&head, vec![Bytes::new()]);
        match within(self.opts.rpc_timeout, "push", crate::framing::push(&mut self.channel, frames)).await {
            Ok(reply) => {
                report.unsent_late += u64::from(reply.outcome() == PushOutcome::Late);
                tally(&reply, report)
            }
            Err(s) => Err(self.push_failed(s).await),
        }
    }
}
