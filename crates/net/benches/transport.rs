//! Gradient bytes per second on loopback: quorum's gRPC push path against a raw TCP socket
//! moving the same bytes, side by side (issue: "at least 0.7 of raw TCP").
//!
//! gRPC: a real parameter server (the crate's `run_server`); one client joins and pushes a
//! 10M-parameter f32 gradient (40 MB) in the worker's chunking, through HTTP/2 with the
//! server's window settings: `grpc` as the worker sends it (`quorum_net::framing::push`, the
//! gradient's bytes not copied), `grpc_generated_client` through tonic's generated client
//! (which copies each message into its encode buffer), to the same server. Each push is for a step the client already contributed to, so
//! the server reassembles and checks it in full and then refuses it as a duplicate — the
//! transport and reassembly are measured, the optimizer is not.
//! Raw TCP: the same 40 MB written to a socket whose reader reads it into a buffer and
//! answers one byte.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use quorum_core::{ParamLayout, Policy, ServerConfig};
use quorum_net::encoding::Encoding;
use quorum_net::proto::parameter_server_client::ParameterServerClient;
use quorum_net::proto::{GradientChunk, JoinRequest};
use quorum_net::{run_server, ServerOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const PARAMS: usize = 10_000_000;

fn transport(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let grad: Vec<f32> = (0..PARAMS).map(|i| (i % 1000) as f32 * 1e-3).collect();
    let bytes = Encoding::F32.encode(&grad);
    let mut g = c.benchmark_group("push_40MB");
    g.throughput(Throughput::Bytes(bytes.len() as u64));
    g.sample_size(10);

    // gRPC through the real server.
    let (mut client, mut channel) = rt.block_on(async {
        let layout = ParamLayout::from_shapes([("w", vec![PARAMS])]).unwrap();
        let cfg = ServerConfig::new(2, Policy::Sync { aggregate: 2, backups: 0 }, 0.1);
        let opts = ServerOptions::new(cfg, layout, vec![0.0; PARAMS]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(run_server(listener, opts, std::future::pending()));
        let ep = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        // quorum's workers' HTTP/2 settings.
        let ch = quorum_net::framing::Window::default()
            .endpoint(ep.max_frame_size(quorum_net::framing::FRAME))
            .connect()
            .await
            .unwrap();
        let mut client = ParameterServerClient::new(ch.clone()).max_decoding_message_size(8 << 20);
        client.join(JoinRequest { worker: 0, num_params: PARAMS as u64, session: 1, layout: vec![] }).await.unwrap();
        (client, ch)
    });
    // The worker's own encoding: the gradient buffer becomes the chunks' bytes. The pieces
    // share one buffer, so a clone per push copies no bytes (as raw TCP below sends bytes
    // that already exist).
    let head =
        GradientChunk { worker: 0, step: 0, total: PARAMS as u64, loss: f32::NAN, session: 1, ..Default::default() };
    let data = Encoding::F32.encode_chunks(grad.clone());
    let frames = quorum_net::framing::push_frames(&head, data.clone());
    let messages: Vec<GradientChunk> = data
        .into_iter()
        .enumerate()
        .map(|(i, data)| GradientChunk {
            offset: (i * quorum_net::encoding::CHUNK_VALUES) as u64,
            data,
            ..head.clone()
        })
        .collect();
    // The first push is accepted (the step waits for a second worker); later ones are duplicates.
    rt.block_on(quorum_net::framing::push(&mut channel, frames.clone())).unwrap();
    g.bench_function("grpc", |b| {
        b.iter(|| {
            let r = rt.block_on(quorum_net::framing::push(&mut channel, frames.clone()));
            assert!(r.is_err_and(|s| s.message().contains("second gradient")));
        })
    });
    g.bench_function("grpc_generated_client", |b| {
        b.iter(|| {
            let r = rt.block_on(client.push(tokio_stream::iter(messages.clone())));
            assert!(r.is_err_and(|s| s.message().contains("second gradient")));
        })
    });

    // Raw TCP: the same bytes, read into a buffer, one byte back.
    let (mut tx, _reader) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let n = bytes.len();
        let reader = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.set_nodelay(true).unwrap();
            let mut buf = vec![0u8; n];
            loop {
                if s.read_exact(&mut buf).await.is_err() {
                    break;
                }
                if s.write_all(&[1]).await.is_err() {
                    break;
                }
            }
        });
        let tx = tokio::net::TcpStream::connect(addr).await.unwrap();
        tx.set_nodelay(true).unwrap();
        (tx, reader)
    });
    g.bench_function("raw_tcp", |b| {
        b.iter(|| {
            rt.block_on(async {
                tx.write_all(&bytes).await.unwrap();
                let mut ack = [0u8; 1];
                tx.read_exact(&mut ack).await.unwrap();
            })
        })
    });
    g.finish();
}

criterion_group!(benches, transport);
criterion_main!(benches);
