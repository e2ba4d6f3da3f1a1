//! A worker: join, then forever pull the newest parameters, compute a gradient, push it.

use crate::proto::parameter_server_client::ParameterServerClient;
use crate::proto::*;
use crate::wire::{encode, Assembler, CHUNK_VALUES};
use quorum_compute::{BatchId, GradientSource};
use quorum_core::WorkerId;
use quorum_sim::DelaySampler;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// How a worker runs.
pub struct WorkerOptions {
    /// Its index, `0..workers`.
    pub index: u32,
    /// The server, e.g. `http://127.0.0.1:7070`.
    pub server: String,
    /// Give up connecting after this long.
    pub connect_timeout: Duration,
    /// Injected straggling: extra seconds slept before each gradient.
    pub delay: Option<DelaySampler>,
    /// Seed of the delay stream.
    pub seed: u64,
}

/// What a worker did.
#[derive(Debug, Clone, Default)]
pub struct WorkerReport {
    /// Gradients pushed.
    pub sent: u64,
    /// Gradients the server used.
    pub accepted: u64,
    /// Gradients dropped (late or too stale).
    pub dropped: u64,
    /// Seconds spent computing gradients (excluding injected delay).
    pub compute_seconds: f64,
}

/// A worker failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The server could not be reached in time.
    #[error("cannot reach the parameter server at {addr} after {secs:.0} s ({last}); is it running, and is the address right?")]
    Unreachable {
        /// Where it tried.
        addr: String,
        /// How long.
        secs: f64,
        /// The last error.
        last: String,
    },
    /// The server refused a request.
    #[error("the parameter server refused worker {worker}: {message}")]
    Refused {
        /// This worker.
        worker: u32,
        /// The server's message.
        message: String,
    },
    /// The gradient computation failed.
    #[error("worker {worker}: {source}")]
    Compute {
        /// This worker.
        worker: u32,
        /// What failed.
        source: quorum_compute::ComputeError,
    },
}

async fn connect(opts: &WorkerOptions) -> Result<ParameterServerClient<Channel>, WorkerError> {
    let start = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        let err = match Channel::from_shared(opts.server.clone()) {
            Ok(ep) => match ep.connect().await {
                Ok(ch) => return Ok(ParameterServerClient::new(ch).max_decoding_message_size(8 << 20)),
                Err(e) => e.to_string(),
            },
            Err(e) => {
                return Err(WorkerError::Unreachable {
                    addr: opts.server.clone(),
                    secs: 0.0,
                    last: format!("invalid address: {e}"),
                });
            }
        };
        if start.elapsed() >= opts.connect_timeout {
            return Err(WorkerError::Unreachable {
                addr: opts.server.clone(),
                secs: start.elapsed().as_secs_f64(),
                last: err,
            });
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

fn refused(worker: u32, s: tonic::Status) -> WorkerError {
    WorkerError::Refused { worker, message: s.message().to_string() }
}

/// Runs one worker until the server says stop.
pub async fn run_worker(
    opts: WorkerOptions,
    source: Box<dyn GradientSource + Send>,
) -> Result<WorkerReport, WorkerError> {
    let w = opts.index;
    let mut client = connect(&opts).await?;
    let num_params = source.layout().len();
    let join = client
        .join(JoinRequest { worker: w, num_params: num_params as u64 })
        .await
        .map_err(|s| refused(w, s))?
        .into_inner();
    let mut report = WorkerReport::default();
    if join.stop {
        return Ok(report);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    rng.set_stream(w as u64 + 1);
    let mut min_step = join.step;
    let mut source = Some(source);
    let mut draws = 0;
    loop {
        // Pull the newest parameters (at least `min_step`).
        let mut stream =
            client.pull(PullRequest { worker: w, min_step }).await.map_err(|s| refused(w, s))?.into_inner();
        let mut asm = Assembler::default();
        let mut step = None;
        while let Some(chunk) = stream.next().await {
            let c = chunk.map_err(|s| refused(w, s))?;
            if c.stop {
                return Ok(report);
            }
            step = Some(c.step);
            asm.push(c.offset, c.total, &c.data, num_params)
                .map_err(|e| WorkerError::Refused { worker: w, message: format!("malformed parameters: {e}") })?;
        }
        let Some(step) = step else { return Ok(report) };
        let params = asm
            .finish()
            .map_err(|e| WorkerError::Refused { worker: w, message: format!("malformed parameters: {e}") })?;

        if let Some(d) = &opts.delay {
            let secs = d.sample(w, draws, &mut rng);
            draws += 1;
            tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        }
        let mut src = source.take().expect("source is returned after every computation");
        let t0 = Instant::now();
        let (src, result) = tokio::task::spawn_blocking(move || {
            let mut grad = Vec::new();
            let r = src.gradient(&params, BatchId { worker: WorkerId(w), step }, &mut grad).map(|loss| (loss, grad));
            (src, r)
        })
        .await
        .expect("gradient task panicked");
        report.compute_seconds += t0.elapsed().as_secs_f64();
        source = Some(src);
        let (loss, grad) = result.map_err(|source| WorkerError::Compute { worker: w, source })?;

        let total = grad.len() as u64;
        let chunks: Vec<GradientChunk> = grad
            .chunks(CHUNK_VALUES)
            .enumerate()
            .map(|(i, c)| GradientChunk {
                worker: w,
                step,
                offset: (i * CHUNK_VALUES) as u64,
                total,
                data: encode(c),
                loss,
            })
            .collect();
        let chunks = if chunks.is_empty() {
            vec![GradientChunk { worker: w, step, offset: 0, total: 0, data: Vec::new(), loss }]
        } else {
            chunks
        };
        report.sent += 1;
        let reply = client.push(tokio_stream::iter(chunks)).await.map_err(|s| refused(w, s))?.into_inner();
        match reply.outcome.as_str() {
            "accepted" => report.accepted += 1,
            "stopped" => return Ok(report),
            _ => report.dropped += 1,
        }
        if reply.stop {
            return Ok(report);
        }
        min_step = step + 1;
    }
}
