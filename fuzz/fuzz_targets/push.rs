//! Fuzzes what a parameter server does with a pushed gradient: protobuf decoding of the
//! chunk stream, reassembly and its checks (`PushAssembler`, the handler's own code), then
//! the protocol core's validation (`Server::push`, as the server's loop calls it). Whatever
//! the bytes, nothing may panic, a refused push leaves the parameters and the step unchanged,
//! and parameters stay finite.
//!
//! Input: byte 0 picks the model size (1..=64 parameters), byte 1 how the rest is cut into
//! HTTP/2 frames; the rest is the push's body as it arrives on the wire (gRPC-framed
//! `GradientChunk` messages), read as the server reads it (`framing::MessageReader`,
//! `framing::parse_gradient_chunk`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use bytes::Bytes;
use quorum_core::{ParamLayout, Policy, Server, ServerConfig, ToServer, WorkerId};
use quorum_net::framing::{parse_gradient_chunk, MessageReader};
use quorum_net::server::PushAssembler;
use std::time::Duration;

fuzz_target!(|data: &[u8]| {
    let [size, cut, body @ ..] = data else { return };
    let n = 1 + *size as usize % 64;
    let layout = ParamLayout::from_shapes([("w", vec![n])]).unwrap();
    let cfg = ServerConfig::new(3, Policy::Sync { aggregate: 2, backups: 1 }, 0.1);
    let mut server = Server::new(cfg, layout, vec![0.5; n]).unwrap();
    for w in 0..3 {
        server.handle(Duration::ZERO, WorkerId(w), ToServer::Join { session: u64::from(w) }).unwrap();
    }
    // As the server does: reassemble into a kept buffer, here one full of stale NaNs that
    // must never leak into the gradient.
    let mut asm = PushAssembler::with_buffer(n, vec![f32::NAN; 2 * n]);
    let mut reader = MessageReader::default();
    let step = 1 + *cut as usize;
    for frame in body.chunks(step) {
        reader.feed(Bytes::copy_from_slice(frame));
        loop {
            match reader.next_message() {
                Ok(Some(msg)) => {
                    let Ok((chunk, data)) = parse_gradient_chunk(msg) else { return };
                    if asm.add(chunk, &data).is_err() {
                        return;
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    if reader.mid_message() {
        return;
    }
    let Ok((head, gradient)) = asm.finish() else { return };
    assert!(gradient.len() <= n, "reassembly never exceeds the model (the core refuses other lengths)");
    let before = (server.params().to_vec(), server.step());
    // The server's loop hands its buffer to the core by reference (`Server::push`).
    let accepted = server.push(Duration::from_millis(1), WorkerId(head.worker), head.step, &gradient, None).is_ok();
    // One push of two cannot close a step, accepted or not.
    assert_eq!(server.step(), before.1);
    assert_eq!(server.params(), &before.0[..]);
    // A well-behaved worker completes the step: the update must be finite.
    let other = if head.worker == 0 { 1 } else { 0 };
    let good = ToServer::Push { step: 0, gradient: vec![0.25; n], loss: None };
    server.handle(Duration::from_millis(2), WorkerId(other), good).unwrap();
    if accepted && head.worker < 3 && head.step == 0 {
        assert_eq!(server.step(), 1);
    }
    assert!(server.params().iter().all(|x| x.is_finite()), "parameters stay finite");
});
