//! Many light workers in one process, to load a parameter server: each opens its own
//! connection, joins, pulls the parameters of every step (reading and discarding them) and
//! pushes a gradient that all of them share, so this process needs almost no memory per
//! worker and the server sees exactly the traffic of that many real workers.
//! Used by `experiments/memory.sh` (server memory against the number of workers) and
//! `experiments/shards_loopback.sh` (sharded servers: ADDR lists every shard, shard 0 first,
//! comma-separated; each worker pulls from and pushes its slice to every shard at once).
//!
//! Usage: cargo run --release -p quorum-net --example fake_workers -- ADDR[,ADDR...] WORKERS PARAMS
//! (QUORUM_TOKEN: the join token of a server that needs one; QUORUM_H2_WINDOW: the HTTP/2
//! windows, bytes (default quorum's 2 MiB) or `adaptive`).

use quorum_net::auth::{AddToken, Token};
use quorum_net::encoding::Encoding;
use quorum_net::framing::Window;
use quorum_net::proto::parameter_server_client::ParameterServerClient;
use quorum_net::proto::{GradientChunk, JoinRequest, ParamsChunk, PullRequest};
use tonic::service::interceptor::InterceptedService;

/// A connection, with the join token when the server needs one.
type Channel = InterceptedService<tonic::transport::Channel, AddToken>;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, addrs, workers, params] = &args[..] else {
        eprintln!("usage: fake_workers ADDR[,ADDR...] WORKERS PARAMS");
        std::process::exit(2);
    };
    let workers: u32 = workers.parse().expect("WORKERS is a number");
    let params: usize = params.parse().expect("PARAMS is a number");
    let addrs: Vec<String> = addrs.split(',').map(|a| format!("http://{a}")).collect();
    let window = std::env::var("QUORUM_H2_WINDOW").map_or(Ok(Window::default()), |w| Window::parse(&w)).unwrap();
    let tasks: Vec<_> = (0..workers).map(|w| tokio::spawn(worker(addrs.clone(), w, params, window))).collect();
    let mut pushes = 0;
    for t in tasks {
        pushes += t.await.expect("worker task").unwrap_or_else(|e| panic!("worker failed: {e}"));
    }
    println!("{workers} workers pushed {pushes} gradients");
}

/// One shard as a worker sees it: the connection, its range and its slice of the gradient
/// (encoded once, shared by every push).
struct Link {
    channel: Channel,
    total: u64,
    gradient: Vec<bytes::Bytes>,
}

/// One worker until the server says stop; returns the gradients it pushed.
async fn worker(addrs: Vec<String>, w: u32, params: usize, window: Window) -> Result<u64, tonic::Status> {
    let mut links = Vec::new();
    let mut min_step = 0;
    for addr in addrs {
        let channel = tonic::transport::Endpoint::from_shared(addr)
            .expect("address")
            // The same HTTP/2 settings as quorum's workers.
            .max_frame_size(quorum_net::framing::FRAME);
        let channel =
            window.endpoint(channel).connect().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let token = std::env::var("QUORUM_TOKEN").ok().map(|t| Token::new(t).expect("a usable QUORUM_TOKEN"));
        let channel = InterceptedService::new(channel, AddToken(token));
        let join = ParameterServerClient::new(channel.clone())
            .join(JoinRequest { worker: w, num_params: params as u64, session: u64::from(w) + 1, layout: vec![] })
            .await?
            .into_inner();
        if join.stop {
            return Ok(0);
        }
        min_step = min_step.max(join.step);
        // Unsharded servers answer 0..0: the whole model.
        let len = if join.shards > 1 { (join.end - join.start) as usize } else { params };
        let gradient = Encoding::F32.encode_chunks(vec![1e-3; len]);
        links.push(Link { channel, total: len as u64, gradient });
    }
    let mut pushes = 0;
    loop {
        // Every shard's part of one step (a shard that is behind is asked again).
        let mut step = min_step;
        loop {
            let pulls: Vec<_> = links
                .iter()
                .map(|l| {
                    let mut channel = l.channel.clone();
                    tokio::spawn(async move { pull(&mut channel, w, step).await })
                })
                .collect();
            let mut steps = Vec::new();
            let mut failed = None;
            for p in pulls {
                match p.await.expect("pull task") {
                    Ok(Some(s)) => steps.push(s),
                    // "Stop" from one shard ends the run, even if another has already gone.
                    Ok(None) => return Ok(pushes),
                    Err(e) => failed = failed.or(Some(e)),
                }
            }
            if let Some(e) = failed {
                return Err(e);
            }
            step = *steps.iter().max().expect("one shard at least");
            if steps.iter().all(|&s| s == step) {
                break;
            }
        }
        let mut replies = Vec::new();
        for l in &links {
            let head = GradientChunk {
                worker: w,
                step,
                total: l.total,
                loss: f32::NAN,
                session: u64::from(w) + 1,
                ..Default::default()
            };
            let mut channel = l.channel.clone();
            // As quorum's workers push: the shared gradient's bytes are not copied.
            let frames = quorum_net::framing::push_frames(&head, l.gradient.clone());
            replies.push(tokio::spawn(async move { quorum_net::framing::push(&mut channel, frames).await }));
        }
        let (mut stop, mut failed) = (false, None);
        for r in replies {
            match r.await.expect("push task") {
                Ok(reply) => stop |= reply.stop,
                Err(e) => failed = failed.or(Some(e)),
            }
        }
        if let (false, Some(e)) = (stop, failed) {
            return Err(e);
        }
        pushes += 1;
        if stop {
            break;
        }
        min_step = step + 1;
    }
    Ok(pushes)
}

/// Pulls parameters of at least `min_step` (read and dropped); their step, or `None` on "stop".
async fn pull(channel: &mut Channel, w: u32, min_step: u64) -> Result<Option<u64>, tonic::Status> {
    let mut stream = quorum_net::framing::pull(channel, &PullRequest { worker: w, min_step, shm: false }).await?;
    let mut step = None;
    while let Some((chunk, _)) = stream.next_chunk::<ParamsChunk>(quorum_net::framing::PARAMS_DATA).await? {
        if chunk.stop {
            return Ok(None);
        }
        step = Some(chunk.step);
    }
    step.map(Some).ok_or_else(|| tonic::Status::unavailable("empty parameter stream"))
}
