//! Who gets in: one live process per worker index, a worker with another model, the join
//! token, mutual TLS naming the worker's index, and the push route's own checks, on loopback
//! with the synthetic model.

mod common;

use common::{options, serve, worker};
use quorum_compute::{GradientSource, LeastSquares};
use quorum_core::Policy;
use quorum_net::proto::PushOutcome;
use quorum_net::{run_server, run_worker, WorkerOptions};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_live_process_per_worker_index_and_a_restarted_worker_gets_back_in() {
    use quorum_net::proto::parameter_server_client::ParameterServerClient;
    use quorum_net::proto::{GradientChunk, HeartbeatRequest, JoinRequest};
    let (opts, _) = options(2, Policy::Sync { aggregate: 2, backups: 0 }, 1, None);
    let (server, addr) = serve(opts).await;
    let mut client = ParameterServerClient::connect(format!("http://{addr}")).await.unwrap();
    let join = |worker: u32, session: u64| JoinRequest { worker, num_params: 64, session, layout: vec![] };
    let push = |worker: u32, session: u64| {
        let data = quorum_net::encoding::encode(&[0.5; 64]).into();
        let chunk = GradientChunk { worker, step: 0, total: 64, data, loss: f32::NAN, session, ..Default::default() };
        tokio_stream::iter(vec![chunk])
    };
    let reply = client.join(join(0, 11)).await.unwrap().into_inner();
    // The server says how often to beat: a quarter of its 2 s worker time-out.
    assert_eq!(reply.heartbeat_ms, 500);
    assert_eq!(client.push(push(0, 11)).await.unwrap().into_inner().outcome(), PushOutcome::Accepted);

    // Another process with the same token cannot speak as worker 0 while it lives...
    let e = client.push(push(0, 99)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = client.heartbeat(HeartbeatRequest { worker: 0, session: 99 }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // ...nor join as it: a duplicate --index is refused, naming the index.
    let e = client.join(join(0, 99)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
    assert!(e.message().contains("worker index w0 is held by another live process"), "{}", e.message());

    // Worker 0 is killed (it sends nothing more). Its restarted process gets in once the
    // old session has been silent for the worker time-out, and its gradient for the step
    // it had already contributed to is answered "already accepted", not refused.
    let waited = std::time::Instant::now();
    loop {
        match client.join(join(0, 12)).await {
            Ok(_) => break,
            Err(e) if e.code() == tonic::Code::AlreadyExists => {
                assert!(waited.elapsed() < Duration::from_secs(10), "the restarted worker never got back in");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
    assert!(waited.elapsed() >= Duration::from_millis(1500), "the old session was still alive");
    assert_eq!(client.push(push(0, 12)).await.unwrap().into_inner().outcome(), PushOutcome::AlreadyAccepted);
    // The old process, should it wake, is fenced out.
    let e = client.push(push(0, 11)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    client.join(join(1, 21)).await.unwrap();
    let r = client.push(push(1, 21)).await.unwrap().into_inner();
    assert_eq!((r.outcome(), r.step, r.stop), (PushOutcome::Accepted, 1, true));
    let summary = server.await.unwrap().unwrap();
    assert_eq!((summary.steps, summary.accepted), (1, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_another_model_is_refused_with_a_clear_message() {
    let (opts, _) = options(1, Policy::Sync { aggregate: 1, backups: 0 }, 10, None);
    let (server, addr) = serve(opts).await;
    let other = LeastSquares::new(8, 4, 0.1, 1);
    let err = worker(0, addr, &other).await.unwrap().unwrap_err().to_string();
    assert!(err.contains("tensor 0 differs by shape: `theta` [64] here, `theta` [8] there"), "{err}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_tensors_differ_is_refused_naming_the_tensor_even_with_the_same_parameter_count() {
    let (mut opts, src) = options(1, Policy::Sync { aggregate: 1, backups: 0 }, 10, None);
    // The server's 64 values as an 8 x 8 matrix `w`; the worker's as a vector `theta`.
    opts.layout = quorum_core::ParamLayout::from_shapes([("w", vec![8, 8])]).unwrap();
    let (server, addr) = serve(opts).await;
    let err = worker(0, addr, &src).await.unwrap().unwrap_err().to_string();
    assert!(err.contains("another model than the server's"), "{err}");
    assert!(err.contains("tensor 0 differs by name: `w` [8, 8] here, `theta` [64] there"), "{err}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_without_the_right_join_token_are_refused_and_nothing_is_applied() {
    use quorum_net::auth::Token;
    let secret = Token::new("correct-horse-battery-staple").unwrap();
    let (mut opts, src) = options(1, Policy::Sync { aggregate: 1, backups: 0 }, 5, None);
    opts.token = Some(secret.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run_server(listener, opts, async {
        let _ = stop_rx.await;
    }));
    let attempt = |token: Option<Token>| {
        let mut wo = WorkerOptions::new(0, format!("http://{addr}"));
        wo.connect_timeout = Duration::from_secs(5);
        wo.token = token;
        run_worker(wo, Box::new(src.clone()) as Box<dyn GradientSource + Send>)
    };
    let none = attempt(None).await.unwrap_err().to_string();
    assert!(none.contains("requires a join token"), "{none}");
    let wrong = attempt(Some(Token::new("incorrect-horse-battery-staple").unwrap())).await.unwrap_err().to_string();
    assert!(wrong.contains("wrong join token"), "{wrong}");
    stop_tx.send(()).unwrap();
    let summary = server.await.unwrap().unwrap();
    assert_eq!(summary.steps, 0, "nothing was applied");
    assert_eq!(summary.accepted, 0);

    // The right token trains.
    let (mut opts, _) = options(1, Policy::Sync { aggregate: 1, backups: 0 }, 5, None);
    opts.token = Some(secret.clone());
    let (server, addr) = serve(opts).await;
    let mut wo = WorkerOptions::new(0, format!("http://{addr}"));
    wo.token = Some(secret);
    run_worker(wo, Box::new(src.clone())).await.unwrap();
    assert_eq!(server.await.unwrap().unwrap().steps, 5);
}

/// PEM files of a throw-away PKI: a CA, a server certificate for 127.0.0.1, client
/// certificates signed by it (one naming no worker, one for worker-0, one for worker-1),
/// and a client certificate from another CA.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: String| std::fs::write(dir.path().join(name), text).unwrap();
        let ca = |name: &str| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.distinguished_name.push(rcgen::DnType::CommonName, name);
            (p.self_signed(&key).unwrap(), key)
        };
        let leaf = |sans: Vec<String>, usage, issuer: &(rcgen::Certificate, KeyPair)| {
            let key = KeyPair::generate().unwrap();
            let mut p = CertificateParams::new(sans).unwrap();
            p.extended_key_usages = vec![usage];
            (p.signed_by(&key, &issuer.0, &issuer.1).unwrap(), key)
        };
        let good = ca("quorum test CA");
        let rogue = ca("someone else's CA");
        write("ca.pem", good.0.pem());
        write("rogue-ca.pem", rogue.0.pem());
        for (name, (cert, key)) in [
            ("server", leaf(vec!["127.0.0.1".into(), "localhost".into()], ExtendedKeyUsagePurpose::ServerAuth, &good)),
            ("client", leaf(vec!["worker".into()], ExtendedKeyUsagePurpose::ClientAuth, &good)),
            ("worker0", leaf(vec!["worker-0".into()], ExtendedKeyUsagePurpose::ClientAuth, &good)),
            ("worker1", leaf(vec!["worker-1".into()], ExtendedKeyUsagePurpose::ClientAuth, &good)),
            ("rogue", leaf(vec!["worker".into()], ExtendedKeyUsagePurpose::ClientAuth, &rogue)),
        ] {
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        Pki { dir }
    }

    fn files(&self, cert: Option<&str>, ca: Option<&str>) -> quorum_net::tls::TlsFiles {
        let p = |f: String| Some(self.dir.path().join(f));
        quorum_net::tls::TlsFiles {
            cert: cert.and_then(|c| p(format!("{c}.pem"))),
            key: cert.and_then(|c| p(format!("{c}.key"))),
            ca: ca.and_then(|c| p(format!("{c}.pem"))),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_admits_only_workers_with_a_certificate_from_the_servers_ca_naming_their_index() {
    let pki = Pki::new();
    let (mut opts, src) = options(1, Policy::Sync { aggregate: 1, backups: 0 }, 5, None);
    opts.tls = pki.files(Some("server"), Some("ca"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(run_server(listener, opts, async {
        let _ = stop_rx.await;
    }));
    let attempt = |tls: quorum_net::tls::TlsFiles| {
        let mut wo = WorkerOptions::new(0, format!("http://{addr}"));
        wo.connect_timeout = Duration::from_millis(1500);
        wo.tls = tls;
        run_worker(wo, Box::new(src.clone()) as Box<dyn GradientSource + Send>)
    };
    // No TLS at all, no client certificate, a certificate from another CA, and a worker that
    // does not trust the server's CA: each is turned away before any RPC reaches the loop.
    for (what, tls) in [
        ("plain text", pki.files(None, None)),
        ("no client certificate", pki.files(None, Some("ca"))),
        ("a certificate from another CA", pki.files(Some("rogue"), Some("ca"))),
        ("a worker that distrusts the server", pki.files(Some("worker0"), Some("rogue-ca"))),
    ] {
        let err = attempt(tls).await.expect_err(what).to_string();
        eprintln!("{what}: {err}");
        assert!(err.contains("cannot reach the parameter server"), "{what}: {err}");
    }
    // Certificates from the right CA that do not name worker 0 are refused at the join.
    for (what, cert) in [("a certificate naming no worker", "client"), ("worker 1's certificate", "worker1")] {
        let err = attempt(pki.files(Some(cert), Some("ca"))).await.expect_err(what).to_string();
        assert!(err.contains("does not name worker index 0") && err.contains("worker-0"), "{what}: {err}");
    }
    stop_tx.send(()).unwrap();
    let summary = server.await.unwrap().unwrap();
    assert_eq!((summary.steps, summary.accepted), (0, 0), "nothing was applied");

    // A worker with its own certificate from the server's CA trains.
    let (mut opts, _) = options(1, Policy::Sync { aggregate: 1, backups: 0 }, 5, None);
    opts.tls = pki.files(Some("server"), Some("ca"));
    let (server, addr) = serve(opts).await;
    let mut wo = WorkerOptions::new(0, format!("http://{addr}"));
    wo.tls = pki.files(Some("worker0"), Some("ca"));
    run_worker(wo, Box::new(src.clone())).await.unwrap();
    assert_eq!(server.await.unwrap().unwrap().steps, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_grpc_client_can_push_and_the_push_route_checks_the_token_and_the_shape() {
    // The server reads pushes and writes pulls itself (no tonic codec); a client that uses
    // tonic's generated code, fields in prost's order, must be understood all the same.
    use quorum_net::auth::{AddToken, Token};
    use quorum_net::proto::parameter_server_client::ParameterServerClient;
    use quorum_net::proto::{GradientChunk, JoinRequest, PullRequest};
    use tokio_stream::StreamExt;
    let secret = Token::new("correct-horse-battery-staple").unwrap();
    let (mut opts, src) = options(1, Policy::Sync { aggregate: 1, backups: 0 }, 1, None);
    opts.token = Some(secret.clone());
    let (server, addr) = serve(opts).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let chunk = |offset: u64, values: &[f32]| GradientChunk {
        worker: 0,
        step: 0,
        offset,
        total: 64,
        data: quorum_net::encoding::encode(values).into(),
        loss: 0.25,
        ..Default::default()
    };
    let gradient = vec![chunk(0, &[0.5; 40]), chunk(40, &[0.5; 24])];

    let mut anonymous = ParameterServerClient::new(channel.clone());
    let refused = anonymous.push(tokio_stream::iter(gradient.clone())).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    let refused = anonymous.pull(PullRequest { worker: 0, min_step: 0, shm: false }).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

    let mut client = ParameterServerClient::with_interceptor(channel, AddToken(Some(secret)));
    client.join(JoinRequest { worker: 0, num_params: 64, session: 0, layout: vec![] }).await.unwrap();
    let mut params = Vec::new();
    let mut stream = client.pull(PullRequest { worker: 0, min_step: 0, shm: false }).await.unwrap().into_inner();
    while let Some(c) = stream.next().await {
        let c = c.unwrap();
        assert_eq!((c.step, c.offset, c.total, c.stop), (0, 0, 64, false));
        quorum_net::Encoding::F32.decode_into(&c.data, &mut params).unwrap();
    }
    assert_eq!(params, src.init_params(0));
    let short = client.push(tokio_stream::iter(vec![chunk(0, &[0.5; 40])])).await.unwrap_err();
    assert_eq!(short.code(), tonic::Code::InvalidArgument);
    assert!(short.message().contains("stream ended after 40 of 64 values"), "{}", short.message());
    let reply = client.push(tokio_stream::iter(gradient)).await.unwrap().into_inner();
    assert_eq!((reply.outcome(), reply.step, reply.stop), (PushOutcome::Accepted, 1, true));
    let summary = server.await.unwrap().unwrap();
    assert_eq!((summary.steps, summary.accepted), (1, 1));
}
