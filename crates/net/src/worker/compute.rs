//! A step's computation on the worker: the parameters it reads (a buffer, or in place in the
//! server's shared memory), where its gradient goes, the gradient computed on a blocking thread
//! with heartbeats meanwhile, and giving up work that its step's closing overtook.

use super::{tally, within, Exit, Local, PullTask, Pulled, Session, SessionEnd, WorkerError, WorkerReport};
use crate::proto::*;
use crate::shm::SharedRegion;
use bytes::Bytes;
use quorum_compute::BatchId;
use quorum_core::{WorkerAction, WorkerId};
use std::sync::Arc;
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

/// What a computation starts from.
pub(super) enum Next {
    /// Parameters pulled (over gRPC, or the place of their step in the shared memory).
    Pulled(Pulled),
    /// A worker on the server's host: the first step of at least `min_step`, awaited in the
    /// server's shared memory by the thread that then computes on it
    /// ([`crate::shm::SharedRegion::wait_newest`]), with no pull: the step's publication sets
    /// the gradient going without a hop through the network or the async runtime.
    Awaited {
        /// The oldest step it may compute on.
        min_step: u64,
    },
}

/// How a computation ended.
pub(super) enum Ended {
    /// A gradient, to be pushed (or noticed late) as the rule says.
    Computed(Computed),
    /// Stopped (or not started) because its step closed without it ([`Session::abandon`]
    /// told the server).
    Abandoned {
        /// Its step.
        step: u64,
    },
    /// An awaited step whose parameters are not to be had from the shared memory (the server
    /// published "stop", or went on so far that the slot was rewritten): pull it over gRPC.
    PullInstead,
}

/// What the computing thread hands back: always the source, and the step it computed on once
/// it knows it.
struct Ran {
    src: Box<dyn quorum_compute::GradientSource + Send>,
    step: Option<u64>,
    params: Option<Params>,
    /// When its parameters were there (before the injected delay).
    opened: Instant,
    /// When the computation began (after the injected delay).
    began: Instant,
    /// `None`: the wait was given up or found no usable parameters.
    result: Option<Result<(f32, Gradient), quorum_compute::ComputeError>>,
}

/// Where a computation's parameters are as its thread starts.
enum Start {
    /// Pulled (and the injected delay slept).
    Ready { step: u64, params: Params, opened: Instant },
    /// To be awaited in the shared memory, then read where they lie (`in_place`) or copied
    /// into `buffer`; the injected delay is slept after.
    Await { region: Arc<SharedRegion>, min_step: u64, in_place: bool, buffer: Vec<f32>, delay: Option<Duration> },
}

impl Start {
    /// The step, its parameters and when they were there; `None` if the wait was given up or
    /// the shared memory cannot give them ("stop" published, or the slot rewritten).
    fn open(self, give_up: &dyn Fn() -> bool) -> Option<(u64, Params, Instant)> {
        match self {
            Start::Ready { step, params, opened } => Some((step, params, opened)),
            Start::Await { region, min_step, in_place, mut buffer, delay } => {
                let step = region.wait_newest(min_step, give_up)?;
                if region.is_closed() {
                    return None;
                }
                let params = match in_place {
                    true => Params::Shared(region.view_params(step).ok()?),
                    false => {
                        region.read_params(step, &mut buffer).ok()?;
                        Params::Owned(buffer)
                    }
                };
                let opened = Instant::now();
                if let Some(d) = delay {
                    std::thread::sleep(d);
                }
                Some((step, params, opened))
            }
        }
    }
}

impl Session<'_> {
    /// Sleeps the injected delay, then computes the gradient on a blocking thread (which
    /// first waits for an awaited step), with heartbeats meanwhile so a slow gradient, or a
    /// step slow to open, is not taken for death.
    pub(super) async fn compute(&mut self, next: Next, local: &mut Local<'_>) -> Result<Ended, Exit> {
        let w = self.opts.index;
        let mut pulled_step = None;
        // Where the worker abandons overtaken work without the server's shared memory, the
        // answer to a pull of the next step, asked for now (and used next), tells it that its
        // step closed.
        let next_told = match (&next, self.rule.abandons() && self.shm.is_none()) {
            (Next::Pulled(p), true) => {
                let told = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let pull = PullTask::start_told(&self.channel, w, p.step + 1, false, Some(told.clone()));
                self.pending = Some(pull);
                Some(told)
            }
            _ => None,
        };
        // The injected delay stands for a slower machine: it counts in the compute time the
        // push reports (workers.csv, the slowest worker), as the simulator counts it. After a
        // pull it is slept here; an awaited step's thread sleeps it once the step opened.
        let delay = self.opts.delay.as_ref().map(|d| {
            let secs = d.sample(w, *local.draws, local.rng);
            *local.draws += 1;
            Duration::from_secs_f64(secs)
        });
        let (start, pull_seconds) = match next {
            Next::Pulled(Pulled { step, params, seconds }) => {
                let opened = Instant::now();
                if let Some(d) = delay {
                    tokio::time::sleep(d).await;
                }
                pulled_step = Some(step);
                (Start::Ready { step, params, opened }, seconds)
            }
            Next::Awaited { min_step } => {
                let region = self.shm.clone().expect("a step is awaited only in shared memory");
                let buffer = std::mem::take(&mut self.params_buffer);
                (Start::Await { region, min_step, in_place: self.rule.abandons(), buffer, delay }, 0.0)
            }
        };
        // Where the worker abandons overtaken work: the shared memory says when the step closed,
        // else the answer to the pull above. "Stop", or a lost server while a step is awaited,
        // ends the wait, and any computation that can stop.
        let watch = self.shm.clone().filter(|_| self.rule.abandons());
        // Set on "stop", or on a lost server while the step is awaited.
        let stopped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let computing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (stop_seen, started) = (std::sync::Arc::clone(&stopped), std::sync::Arc::clone(&computing));
        let src = local.source.take().expect("source is returned after every computation");
        // Into this worker's slot of the server's shared memory where there is one (no copy
        // there afterwards), else (or while the server still reads the slot, for a process of
        // this index before this one) into a buffer for gRPC.
        let grad = match self.shm.as_ref().and_then(|region| region.gradient_write(w)) {
            Some(slot) => Gradient::Shared(slot),
            None => Gradient::Buffer(self.grads.take()),
        };
        let (stoppable, len) = (self.rule.abandons(), self.num_params);
        let mut task = tokio::task::spawn_blocking(move || {
            let gone = || stop_seen.load(std::sync::atomic::Ordering::Relaxed);
            let Some((step, params, opened)) = start.open(&gone) else {
                let now = Instant::now();
                return Ran { src, step: None, params: None, opened: now, began: now, result: None };
            };
            started.store(true, std::sync::atomic::Ordering::Relaxed);
            let closed = || {
                gone()
                    || next_told.as_ref().is_some_and(|t| t.load(std::sync::atomic::Ordering::Relaxed))
                    || watch.as_ref().and_then(|r| r.newest()).is_some_and(|newest| newest > step)
            };
            let mut ran = Ran { src, step: Some(step), params: None, opened, began: Instant::now(), result: None };
            // (It may have closed while the injected delay slept: nothing computed.)
            let result = if closed() {
                Err(quorum_compute::ComputeError::Abandoned)
            } else {
                let batch = BatchId { worker: WorkerId(w), step };
                let mut grad = grad;
                let src = &mut ran.src;
                let loss = match &mut grad {
                    Gradient::Buffer(g) if stoppable => {
                        g.resize(len, 0.0);
                        src.gradient_into_unless(params.values(), batch, g, &closed)
                    }
                    Gradient::Buffer(g) => src.gradient(params.values(), batch, g),
                    Gradient::Shared(slot) => src.gradient_into_unless(params.values(), batch, slot.values(), &closed),
                };
                loss.map(|loss| (loss, grad))
            };
            ran.params = Some(params);
            ran.result = Some(result);
            ran
        });
        let beat = self.heartbeat_request();
        let ran = loop {
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
                    // "Stop" ends the worker now: nothing it computes will be used, and the
                    // server, having told it, may be gone by the time the gradient is done. (The
                    // computation stops too where it can; else its thread finishes it unheeded.)
                    // While the step is awaited, a lost server ends the session, as a pull's
                    // would; once computing, failures are noticed by the push that follows.
                    let beat = within(self.opts.rpc_timeout, "heartbeat", self.client.heartbeat(beat)).await;
                    let lost = match beat {
                        Ok(r) if r.get_ref().stop => {
                            stopped.store(true, std::sync::atomic::Ordering::Relaxed);
                            return Err(Exit::End(SessionEnd::Stopped));
                        }
                        Err(s) if !computing.load(std::sync::atomic::Ordering::Relaxed) => s,
                        _ => continue,
                    };
                    stopped.store(true, std::sync::atomic::Ordering::Relaxed);
                    if let Ok(ran) = task.await {
                        *local.source = Some(ran.src);
                    }
                    return Err(Exit::from(super::lost_or_refused(w, lost)));
                }
            }
        };
        let Ran { src, step, params, opened, began, result } = ran;
        *local.source = Some(src);
        let (Some(step), Some(params), Some(result)) = (step, params, result) else {
            return Ok(Ended::PullInstead);
        };
        // An awaited step: the rule hears of its parameters now (a networked worker computes
        // on every newer step it gets, and an awaited one is newer than any it computed on).
        if pulled_step.is_none() {
            if !self.rule.on_params(step).contains(&WorkerAction::Compute { step }) {
                self.keep(params);
                return Ok(Ended::PullInstead);
            }
            local.report.awaited += 1;
        }
        local.report.params_in_place += u64::from(matches!(params, Params::Shared(_)));
        local.report.compute_seconds += began.elapsed().as_secs_f64();
        let seconds = opened.elapsed().as_secs_f64();
        // Parameters read in place whose slot a later step took meanwhile: what was computed
        // is not the step's gradient (and the step closed long ago).
        let overwritten = !params.intact();
        self.keep(params);
        let (loss, grad) = match result {
            Err(quorum_compute::ComputeError::Abandoned) => {
                return self.abandon(step, local.report).await.map(|()| Ended::Abandoned { step })
            }
            _ if overwritten => return self.abandon(step, local.report).await.map(|()| Ended::Abandoned { step }),
            r => r.map_err(|source| WorkerError::Compute { worker: w, source })?,
        };
        Ok(Ended::Computed(Computed { step, grad, loss, seconds, pull_seconds }))
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
