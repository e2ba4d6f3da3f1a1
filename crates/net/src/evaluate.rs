//! An evaluator: a process that is not a worker. It pulls the parameters every K steps,
//! evaluates them on held-out data, and reports the figures to the server, which records them
//! as it records its own evaluations (`metrics.csv`, TensorBoard, the progress line). For a
//! server that does not compute its model (`quorum ps --params`, PyTorch workers).

use crate::encoding::{Assembler, Encoding};
use crate::proto::{EvaluationReport, PullRequest};
use crate::worker::{connect, connect_to, lost_or_refused, within, SessionEnd, WorkerError, WorkerOptions};
use quorum_compute::{ComputeError, Evaluation};
use std::time::Duration;

/// The pull of an evaluator names no worker: it names [`EVALUATOR`].
const NOT_A_WORKER: u32 = EVALUATOR;

/// The `worker` of an evaluator's pull (the largest index): the server then knows an
/// evaluator is there, and waits for its evaluation of the final step before it exits.
pub const EVALUATOR: u32 = u32::MAX;

/// What an evaluator did.
#[derive(Debug, Clone, Default)]
pub struct EvaluatorReport {
    /// Evaluations reported, the final one included.
    pub evaluations: u64,
    /// The last step evaluated.
    pub last_step: Option<u64>,
    /// Times it reconnected after losing the server.
    pub reconnects: u32,
}

/// The function that evaluates: the step and its parameters in, the figures out.
pub type EvaluateFn = Box<dyn FnMut(u64, &[f32]) -> Result<Evaluation, ComputeError> + Send>;

/// Evaluates the server's parameters every `every` steps (the first evaluation at the first
/// multiple of `every` it can pull) and once more at the end, until the server stops.
/// `num_params`: the model's size, checked against what the server sends. In a sharded run
/// (`opts.shards`) it pulls every shard's part of one step and reports to shard 0.
pub async fn run_evaluator(
    opts: WorkerOptions,
    num_params: usize,
    every: u64,
    evaluate: EvaluateFn,
) -> Result<EvaluatorReport, WorkerError> {
    let every = every.max(1);
    let mut report = EvaluatorReport::default();
    let mut evaluate = Some(evaluate);
    let mut min_step = every;
    let refused = |message: String| WorkerError::Refused { worker: NOT_A_WORKER, message };
    loop {
        let mut clients = vec![connect(&opts).await?.0];
        for addr in &opts.shards {
            clients.push(connect_to(&opts, addr).await?.0);
        }
        let lost = loop {
            // The pull waits until the step exists: as long as training takes to get there.
            let parts = match pull_all(&mut clients, min_step, opts.rpc_timeout).await? {
                Ok(parts) => parts,
                Err(end) => break end,
            };
            let step = parts[0].step;
            let stop = parts.iter().any(|p| p.stop);
            // Shards hold contiguous ranges in shard order: their parts put end to end.
            let params: Vec<f32> = parts.into_iter().flat_map(|p| p.values).collect();
            if params.len() != num_params {
                // A stop without parameters: nothing more to evaluate.
                if stop && params.is_empty() {
                    return Ok(report);
                }
                return Err(refused(format!(
                    "the server's model has {} parameters, this evaluator's {num_params}{}",
                    params.len(),
                    if opts.shards.is_empty() { "" } else { " (every shard's address given, shard 0 first?)" }
                )));
            }
            let mut f = evaluate.take().expect("returned after every evaluation");
            let (f, result) = tokio::task::spawn_blocking(move || {
                let r = f(step, &params);
                (f, r)
            })
            .await
            .map_err(|e| WorkerError::Panicked { worker: NOT_A_WORKER, message: e.to_string() })?;
            evaluate = Some(f);
            let e = result.map_err(|source| WorkerError::Compute { worker: NOT_A_WORKER, source })?;
            let msg = EvaluationReport {
                step,
                loss: e.loss,
                accuracy: e.accuracy.unwrap_or(0.0),
                has_accuracy: e.accuracy.is_some(),
            };
            match within(opts.rpc_timeout, "report", clients[0].report(msg)).await {
                Ok(_) => {
                    report.evaluations += 1;
                    report.last_step = Some(step);
                    // These were the final parameters; otherwise the next pull brings newer
                    // ones, or the final ones if the run stopped meanwhile.
                    if stop {
                        return Ok(report);
                    }
                }
                Err(s) if s.code() == tonic::Code::Unimplemented => {
                    return Err(refused(
                        "the server takes no evaluations (a quorum from before evaluators): update it".into(),
                    ))
                }
                Err(s) => break lost_or_refused(NOT_A_WORKER, s)?,
            }
            min_step = (step / every + 1) * every;
        };
        match lost {
            SessionEnd::Stopped => return Ok(report),
            SessionEnd::Lost { why, .. } | SessionEnd::IndexHeld { why } => {
                report.reconnects += 1;
                tracing::warn!("evaluator: lost the parameter server ({why}); reconnecting");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// One server's answer to a pull: the step, its values (a shard's part in a sharded run),
/// and whether it said the run stopped.
struct Part {
    step: u64,
    values: Vec<f32>,
    stop: bool,
}

/// Every server's part of one step (at least `min_step`): shards apply a step one after
/// another, so a part older than the newest is asked for again.
async fn pull_all(
    clients: &mut [crate::worker::Client],
    min_step: u64,
    limit: Duration,
) -> Result<Result<Vec<Part>, SessionEnd>, WorkerError> {
    let mut parts: Vec<Option<Part>> = clients.iter().map(|_| None).collect();
    let mut want = min_step;
    loop {
        for (client, part) in clients.iter_mut().zip(parts.iter_mut()) {
            if part.as_ref().is_some_and(|p| p.step >= want) {
                continue;
            }
            match pull_part(client, want, limit).await? {
                Ok(p) => *part = Some(p),
                Err(end) => return Ok(Err(end)),
            }
        }
        let steps: Vec<u64> = parts.iter().flatten().map(|p| p.step).collect();
        let newest = steps.iter().copied().max().unwrap_or(want);
        if steps.iter().all(|&s| s == newest) {
            return Ok(Ok(parts.into_iter().flatten().collect()));
        }
        if parts.iter().flatten().any(|p| p.stop && p.step < newest) {
            // A stopped shard behind the others: this run's shards disagree.
            let why = "the shards stopped at different steps".to_string();
            return Ok(Err(SessionEnd::Lost { why, joined: true }));
        }
        want = newest;
    }
}

/// Reads one server's answer to a pull of `min_step`.
async fn pull_part(
    client: &mut crate::worker::Client,
    min_step: u64,
    limit: Duration,
) -> Result<Result<Part, SessionEnd>, WorkerError> {
    let refused = |message: String| WorkerError::Refused { worker: NOT_A_WORKER, message };
    let mut stream = match client.pull(PullRequest { worker: NOT_A_WORKER, min_step, shm: false }).await {
        Ok(s) => s.into_inner(),
        Err(s) => return lost_or_refused(NOT_A_WORKER, s).map(Err),
    };
    let mut asm = Assembler::with_buffer(Vec::new());
    let (mut step, mut stop) = (None, false);
    loop {
        match within(limit, "pull", stream.message()).await {
            Ok(Some(c)) => {
                stop |= c.stop;
                step = Some(c.step);
                if c.total > 0 {
                    asm.push_parts(c.offset, c.total, &[&c.data[..]], Encoding::from_flag(c.bf16), c.total as usize)
                        .map_err(|e| refused(format!("malformed parameters: {e}")))?;
                }
            }
            Ok(None) => break,
            Err(s) => return lost_or_refused(NOT_A_WORKER, s).map(Err),
        }
    }
    let Some(step) = step else {
        return Ok(Err(SessionEnd::Lost { why: "empty parameter stream".into(), joined: true }));
    };
    let values = match asm.finish() {
        Ok(v) => v,
        // A stop without parameters.
        Err(_) if stop => Vec::new(),
        Err(e) => return Err(refused(format!("malformed parameters: {e}"))),
    };
    Ok(Ok(Part { step, values, stop }))
}
