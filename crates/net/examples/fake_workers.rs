//! Many light workers in one process, to load a parameter server: each opens its own
//! connection, joins, pulls the parameters of every step (reading and discarding them) and
//! pushes a gradient that all of them share, so this process needs almost no memory per
//! worker and the server sees exactly the traffic of that many real workers.
//! Used by `experiments/memory.sh` (server memory against the number of workers).
//!
//! Usage: cargo run --release -p quorum-net --example fake_workers -- ADDR WORKERS PARAMS

use quorum_net::encoding::Encoding;
use quorum_net::proto::parameter_server_client::ParameterServerClient;
use quorum_net::proto::{GradientChunk, JoinRequest, ParamsChunk, PullRequest};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, addr, workers, params] = &args[..] else {
        eprintln!("usage: fake_workers ADDR WORKERS PARAMS");
        std::process::exit(2);
    };
    let workers: u32 = workers.parse().expect("WORKERS is a number");
    let params: usize = params.parse().expect("PARAMS is a number");
    let gradient = Encoding::F32.encode_chunks(vec![1e-3; params]);
    let tasks: Vec<_> =
        (0..workers).map(|w| tokio::spawn(worker(format!("http://{addr}"), w, params, gradient.clone()))).collect();
    let mut pushes = 0;
    for t in tasks {
        pushes += t.await.expect("worker task").unwrap_or_else(|e| panic!("worker failed: {e}"));
    }
    println!("{workers} workers pushed {pushes} gradients");
}

/// One worker until the server says stop; returns the gradients it pushed.
async fn worker(addr: String, w: u32, params: usize, gradient: Vec<bytes::Bytes>) -> Result<u64, tonic::Status> {
    let channel = tonic::transport::Endpoint::from_shared(addr)
        .expect("address")
        // The same HTTP/2 settings as quorum's workers.
        .initial_stream_window_size(quorum_net::framing::STREAM_WINDOW)
        .initial_connection_window_size(quorum_net::framing::CONNECTION_WINDOW)
        .max_frame_size(quorum_net::framing::FRAME)
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut client = ParameterServerClient::new(channel.clone());
    let mut channel = channel;
    let join = client
        .join(JoinRequest { worker: w, num_params: params as u64, session: u64::from(w) + 1, layout: vec![] })
        .await?
        .into_inner();
    let (mut min_step, mut pushes) = (join.step, 0);
    if join.stop {
        return Ok(0);
    }
    loop {
        let mut stream = quorum_net::framing::pull(&mut channel, &PullRequest { worker: w, min_step }).await?;
        let mut step = None;
        while let Some((chunk, _)) = stream.next_chunk::<ParamsChunk>(quorum_net::framing::PARAMS_DATA).await? {
            if chunk.stop {
                return Ok(pushes);
            }
            step = Some(chunk.step);
        }
        let Some(step) = step else { return Ok(pushes) };
        let head = GradientChunk {
            worker: w,
            step,
            total: params as u64,
            loss: f32::NAN,
            session: u64::from(w) + 1,
            ..Default::default()
        };
        // As quorum's workers push: the shared gradient's bytes are not copied.
        let reply =
            quorum_net::framing::push(&mut channel, quorum_net::framing::push_frames(&head, gradient.clone())).await?;
        pushes += 1;
        if reply.stop {
            break;
        }
        min_step = step + 1;
    }
    Ok(pushes)
}
