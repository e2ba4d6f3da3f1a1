//! An evaluator: a process that is not a worker. It pulls the parameters every K steps,
//! evaluates them on held-out data, and reports the figures to the server, which records them
//! as it records its own evaluations (`metrics.csv`, TensorBoard, the progress line). For a
//! server that does not compute its model (`quorum ps --params`, PyTorch workers).

use crate::encoding::{Assembler, Encoding};
use crate::proto::{EvaluationReport, PullRequest};
use crate::worker::{connect, lost_or_refused, within, SessionEnd, WorkerError, WorkerOptions};
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
/// `num_params`: the model's size, checked against what the server sends.
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
        let (mut client, _) = connect(&opts).await?;
        let lost = loop {
            // The pull waits until the step exists: as long as training takes to get there.
            let pulled = client.pull(PullRequest { worker: NOT_A_WORKER, min_step }).await;
            let mut stream = match pulled {
                Ok(s) => s.into_inner(),
                Err(s) => break lost_or_refused(NOT_A_WORKER, s)?,
            };
            let mut asm = Assembler::with_buffer(Vec::new());
            let (mut step, mut stop, mut cut) = (None, false, None);
            loop {
                match within(opts.rpc_timeout, "pull", stream.message()).await {
                    Ok(Some(c)) => {
                        stop |= c.stop;
                        step = Some(c.step);
                        if c.total > 0 {
                            asm.push_parts(c.offset, c.total, &[&c.data[..]], Encoding::from_flag(c.bf16), num_params)
                                .map_err(|e| refused(format!("malformed parameters: {e}")))?;
                        }
                    }
                    Ok(None) => break,
                    Err(s) => {
                        cut = Some(lost_or_refused(NOT_A_WORKER, s)?);
                        break;
                    }
                }
            }
            if let Some(end) = cut {
                break end;
            }
            let Some(step) = step else {
                break SessionEnd::Lost { why: "empty parameter stream".into(), joined: true };
            };
            let params = match asm.finish() {
                Ok(p) if p.len() == num_params => p,
                // A stop without parameters: nothing more to evaluate.
                _ if stop => return Ok(report),
                Ok(p) => {
                    return Err(refused(format!(
                        "the server's model has {} parameters, this evaluator's {num_params}",
                        p.len()
                    )))
                }
                Err(e) => return Err(refused(format!("malformed parameters: {e}"))),
            };
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
            match within(opts.rpc_timeout, "report", client.report(msg)).await {
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
