//! gRPC framing by hand: push and pull without tonic's codec copies, still gRPC on the
//! wire, and the HTTP/2 settings both ends use.
//!
//! tonic copies every message twice on its way: the sender's codec encodes it into a fresh
//! buffer, and the receiver's `Streaming` gathers HTTP/2 frames into another buffer before
//! decoding. For a gradient of megabytes those copies cost more than the socket itself. So
//! the `Push` call is carried here by hand, as the same gRPC messages (`GradientChunk`, with
//! gRPC's 5-byte length prefix) over the same HTTP/2 channel:
//!
//! - the worker sends each chunk as a small prefix (gRPC header, the chunk's fields, the
//!   data field's key and length) followed by the gradient's own bytes ([`push_frames`]);
//! - the server cuts the HTTP/2 frames into messages ([`MessageReader`]) and messages into
//!   fields ([`parse_gradient_chunk`]) without copying, so the data bytes are copied once,
//!   straight into the gradient buffer.
//!
//! `Pull` is carried the same way in the other direction: the server streams each step's
//! parameters as pieces built once per step ([`chunk_frames`]) and shared by every worker's
//! pull, and the worker reads them with the same reader into its parameter buffer.
//!
//! Any gRPC client can still push and pull (messages are valid `GradientChunk`s and
//! `ParamsChunk`s, fields in any order); `Join` and `Heartbeat` go through tonic as generated.

use crate::proto::{GradientChunk, PullRequest, PushReply};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use prost::encoding::{decode_key, decode_varint, encode_key, encode_varint, WireType};
use prost::Message;
use std::collections::VecDeque;
use tonic::body::Body;
use tonic::{Code, Status};

/// The HTTP/2 flow-control windows: how far a sender may run ahead of the receiver, and so
/// what one waiting push or pull can hold in buffers (a server with N workers holds up to N).
/// One stream moves at most a window per round trip: 2 MiB caps it near 200 MB/s at 10 ms,
/// so a link with latency needs its bandwidth-delay product (docs/results.md §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    /// Sized to the link: each connection measures its bandwidth-delay product with pings
    /// and grows its windows to it (hyper's estimate, from 64 KiB up to 16 MiB a stream).
    /// 1.78x the 2 MiB window at 10 ms; but on loopback some runs of a small model stay slow
    /// (3 of 14 MNIST MLP runs at a fifth to a third of the speed), so it is not the default.
    Adaptive,
    /// Fixed, bytes per stream (a connection's is twice that).
    Fixed(u32),
}

/// The default window: HTTP/2's 64 KiB would make every megabyte wait for window updates;
/// 2 MiB serves loopback and LANs (up to 4 GB/s at 0.5 ms) with ~1 MiB per waiting worker.
pub const STREAM_WINDOW: u32 = 2 << 20;

impl Default for Window {
    fn default() -> Self {
        Window::Fixed(STREAM_WINDOW)
    }
}

impl Window {
    /// `adaptive`, or a size in bytes (at least 64 KiB, HTTP/2's default).
    pub fn parse(s: &str) -> Result<Window, String> {
        match s.trim() {
            "adaptive" | "auto" => Ok(Window::Adaptive),
            n => match n.parse::<u32>() {
                Ok(b) if b >= 65_535 => Ok(Window::Fixed(b)),
                _ => Err(format!(
                    "http2-window = {n:?}: give a window in bytes, at least 65535 (about the link's bandwidth times \
                     its round trip, e.g. 16777216 for 16 MiB), or \"adaptive\""
                )),
            },
        }
    }

    /// A server builder with these windows.
    pub fn server(self, b: tonic::transport::Server) -> tonic::transport::Server {
        match self {
            Window::Adaptive => b.http2_adaptive_window(Some(true)),
            Window::Fixed(w) => b.initial_stream_window_size(w).initial_connection_window_size(w.saturating_mul(2)),
        }
    }

    /// A client endpoint with these windows.
    pub fn endpoint(self, e: tonic::transport::Endpoint) -> tonic::transport::Endpoint {
        match self {
            Window::Adaptive => e.http2_adaptive_window(true),
            Window::Fixed(w) => e.initial_stream_window_size(w).initial_connection_window_size(w.saturating_mul(2)),
        }
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Window::Adaptive => f.write_str("adaptive"),
            Window::Fixed(b) => write!(f, "{b}"),
        }
    }
}

/// HTTP/2 frame size, bytes (the default 16 KiB cuts a 1 MiB chunk into 64 frames).
pub const FRAME: u32 = 1 << 20;

/// The HTTP/2 path of `ParameterServer.Push`.
pub const PUSH_PATH: &str = "/quorum.v1.ParameterServer/Push";

/// Largest message accepted, bytes (a chunk is 1 MiB of values and a few fields).
pub const MAX_MESSAGE: usize = 8 << 20;

/// The HTTP/2 path of `ParameterServer.Pull`.
pub const PULL_PATH: &str = "/quorum.v1.ParameterServer/Pull";

/// `GradientChunk.data`'s field number.
pub const GRADIENT_DATA: u32 = 5;

/// `ParamsChunk.data`'s field number.
pub const PARAMS_DATA: u32 = 4;

/// gRPC's message prefix: a compression flag and a big-endian length.
const PREFIX: usize = 5;

/// A byte sequence held as the pieces it arrived in (slices of HTTP/2 frames), never copied
/// into one buffer.
#[derive(Debug, Default, Clone)]
pub struct Segments {
    parts: VecDeque<Bytes>,
    len: usize,
}

impl Segments {
    /// Appends a piece.
    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.parts.push_back(b);
        }
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no bytes are held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces, in order.
    pub fn parts(&self) -> impl Iterator<Item = &[u8]> {
        self.parts.iter().map(|b| &b[..])
    }

    /// Takes the first `n` bytes (at most `len()`) without copying them.
    pub fn split_to(&mut self, n: usize) -> Segments {
        let mut out = Segments::default();
        let mut need = n.min(self.len);
        while need > 0 {
            let front = self.parts.front_mut().expect("len counts the parts");
            let piece =
                if front.len() <= need { self.parts.pop_front().expect("front exists") } else { front.split_to(need) };
            need -= piece.len();
            self.len -= piece.len();
            out.push(piece);
        }
        out
    }
}

impl Buf for Segments {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |b| &b[..])
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.len, "advance past the end");
        self.len -= cnt;
        while cnt > 0 {
            let front = self.parts.front_mut().expect("len counts the parts");
            if front.len() <= cnt {
                cnt -= front.len();
                self.parts.pop_front();
            } else {
                front.advance(cnt);
                cnt = 0;
            }
        }
    }
}

/// One gRPC message as an HTTP/2 body piece.
pub fn message_frame(m: &impl Message) -> Bytes {
    let mut p = BytesMut::with_capacity(PREFIX + m.encoded_len());
    p.put_u8(0);
    p.put_u32(u32::try_from(m.encoded_len()).expect("a small message"));
    m.encode(&mut p).expect("capacity reserved");
    p.freeze()
}

/// One chunk message as two body pieces: a prefix (gRPC header, `fields` — whose data field
/// is empty — and field `data_field`'s key and length), then `data` itself, not copied.
pub fn chunk_frames(fields: &impl Message, data_field: u32, data: Bytes) -> [Bytes; 2] {
    let data_head = 1 + prost::length_delimiter_len(data.len());
    let message = fields.encoded_len() + data_head + data.len();
    let mut p = BytesMut::with_capacity(PREFIX + message - data.len());
    p.put_u8(0);
    p.put_u32(u32::try_from(message).expect("a chunk is far below 4 GiB"));
    fields.encode(&mut p).expect("capacity reserved");
    encode_key(data_field, WireType::LengthDelimited, &mut p);
    encode_varint(data.len() as u64, &mut p);
    [p.freeze(), data]
}

/// The gRPC messages of one pushed gradient, as HTTP/2 body pieces: per chunk of `data`,
/// `head`'s fields with the chunk's offset, then the chunk's bytes ([`chunk_frames`]).
pub fn push_frames(head: &GradientChunk, data: Vec<Bytes>) -> Vec<Bytes> {
    let mut frames = Vec::with_capacity(2 * data.len());
    for (i, d) in data.into_iter().enumerate() {
        let fields =
            GradientChunk { offset: (i * crate::encoding::CHUNK_VALUES) as u64, data: Bytes::new(), ..head.clone() };
        frames.extend(chunk_frames(&fields, GRADIENT_DATA, d));
    }
    frames
}

/// A gRPC message stream that is not what a quorum peer sends.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// gRPC compression, which quorum does not use.
    #[error("a compressed message: send gradients uncompressed")]
    Compressed,
    /// A message longer than [`MAX_MESSAGE`].
    #[error("a message of {0} bytes, more than the {MAX_MESSAGE} accepted")]
    TooLong(usize),
    /// A field runs past the end of its message.
    #[error("not a {0}: a field is cut off")]
    CutOff(&'static str),
    /// The bytes are not protobuf, or not this message.
    #[error("not a {message}: {error}")]
    Decode {
        /// The message expected.
        message: &'static str,
        /// What protobuf found.
        error: prost::DecodeError,
    },
    /// Protobuf groups, which no quorum message has.
    #[error("not a {0}: protobuf groups are not part of it")]
    Group(&'static str),
}

/// Cuts a stream of HTTP/2 data frames into gRPC messages, without copying.
#[derive(Debug, Default)]
pub struct MessageReader {
    buffered: Segments,
    /// The length of the message being received, once its prefix is in.
    want: Option<usize>,
}

impl MessageReader {
    /// Adds the next data frame.
    pub fn feed(&mut self, frame: Bytes) {
        self.buffered.push(frame);
    }

    /// The next complete message, if its bytes are all in.
    pub fn next_message(&mut self) -> Result<Option<Segments>, FrameError> {
        let want = match self.want {
            Some(n) => n,
            None => {
                if self.buffered.len() < PREFIX {
                    return Ok(None);
                }
                let compressed = self.buffered.get_u8();
                let n = self.buffered.get_u32() as usize;
                if compressed != 0 {
                    return Err(FrameError::Compressed);
                }
                if n > MAX_MESSAGE {
                    return Err(FrameError::TooLong(n));
                }
                self.want = Some(n);
                n
            }
        };
        if self.buffered.len() < want {
            return Ok(None);
        }
        self.want = None;
        Ok(Some(self.buffered.split_to(want)))
    }

    /// Whether a message is cut off (to check when the stream ends).
    pub fn mid_message(&self) -> bool {
        self.want.is_some() || !self.buffered.is_empty()
    }
}

/// Parses one `GradientChunk` message without copying its data ([`parse_chunk`]).
pub fn parse_gradient_chunk(msg: Segments) -> Result<(GradientChunk, Segments), FrameError> {
    parse_chunk(msg, GRADIENT_DATA)
}

/// Parses one chunk message: its fields (in any order, unknown ones skipped, as protobuf
/// allows) decoded by prost, and the bytes of field `data_field` left where they arrived.
pub fn parse_chunk<M: Message + Default>(mut msg: Segments, data_field: u32) -> Result<(M, Segments), FrameError> {
    let name = std::any::type_name::<M>().rsplit("::").next().unwrap_or("message");
    let cut = || FrameError::CutOff(name);
    let bad = |error: prost::DecodeError| FrameError::Decode { message: name, error };
    // Every field but the data, re-encoded for prost: a few dozen bytes.
    let mut fields = Vec::new();
    let mut data = Segments::default();
    while msg.has_remaining() {
        let (tag, wire) = decode_key(&mut msg).map_err(bad)?;
        match wire {
            WireType::Varint => {
                let v = decode_varint(&mut msg).map_err(bad)?;
                encode_key(tag, wire, &mut fields);
                encode_varint(v, &mut fields);
            }
            WireType::SixtyFourBit | WireType::ThirtyTwoBit => {
                let n = if wire == WireType::SixtyFourBit { 8 } else { 4 };
                if msg.remaining() < n {
                    return Err(cut());
                }
                encode_key(tag, wire, &mut fields);
                fields.extend_from_slice(&msg.copy_to_bytes(n));
            }
            WireType::LengthDelimited => {
                let n = decode_varint(&mut msg).map_err(bad)?;
                if n > msg.remaining() as u64 {
                    return Err(cut());
                }
                let value = msg.split_to(n as usize);
                if tag == data_field {
                    // Protobuf keeps the last value of a repeated scalar field.
                    data = value;
                } else {
                    encode_key(tag, wire, &mut fields);
                    encode_varint(n, &mut fields);
                    for part in value.parts() {
                        fields.extend_from_slice(part);
                    }
                }
            }
            WireType::StartGroup | WireType::EndGroup => {
                return Err(FrameError::Group(name));
            }
        }
    }
    let head = M::decode(&fields[..]).map_err(bad)?;
    Ok((head, data))
}

/// A gRPC response streaming `pieces` (whole messages), then `grpc-status: 0`.
pub fn response(pieces: impl IntoIterator<Item = Bytes, IntoIter: Send + 'static>) -> http::Response<Body> {
    let mut trailers = http::HeaderMap::new();
    Status::ok("").add_header(&mut trailers).expect("an OK status is a valid header");
    let frames = pieces
        .into_iter()
        .filter(|b| !b.is_empty())
        .map(|b| Ok::<_, Status>(http_body::Frame::data(b)))
        .chain(std::iter::once(Ok(http_body::Frame::trailers(trailers))));
    let mut resp = http::Response::new(Body::new(http_body_util::StreamBody::new(tokio_stream::iter(frames))));
    resp.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    resp
}

/// Reads a request body that holds one small message (waiting at most `idle`, reading at
/// most one message's worth of bytes).
pub async fn read_request<M: Message + Default>(body: Body, idle: std::time::Duration) -> Result<M, Status> {
    let limited = http_body_util::Limited::new(body, PREFIX + MAX_MESSAGE);
    let all = tokio::time::timeout(idle, limited.collect())
        .await
        .map_err(|_| Status::deadline_exceeded("the request did not arrive in time"))?
        .map_err(|e| match e.downcast::<Status>() {
            Ok(s) => *s,
            Err(e) => Status::invalid_argument(format!("request refused: {e}")),
        })?;
    let mut reader = MessageReader::default();
    reader.feed(all.to_bytes());
    match reader.next_message().map_err(|e| Status::invalid_argument(e.to_string()))? {
        Some(m) if !reader.mid_message() => M::decode(m).map_err(|e| Status::invalid_argument(e.to_string())),
        _ => Err(Status::invalid_argument("expected exactly one request message")),
    }
}

/// The gRPC messages of an HTTP/2 body as they arrive — a response's (then its final
/// status) or a streamed request's — each left in the pieces it arrived in.
pub struct Messages<B> {
    body: std::pin::Pin<Box<B>>,
    reader: MessageReader,
    /// The status code of a malformed message: the peer's fault (a request) or the server's
    /// (a response).
    malformed: Code,
}

impl<B> Messages<B> {
    /// Reads `body`; a malformed message is an error with code `malformed`.
    pub fn new(body: B, malformed: Code) -> Self {
        Messages { body: Box::pin(body), reader: MessageReader::default(), malformed }
    }
}

impl<B> Messages<B>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// The next message; `None` once the body ended (for a response, with an OK status).
    pub async fn next(&mut self) -> Result<Option<Segments>, Status> {
        loop {
            if let Some(m) = self.reader.next_message().map_err(|e| Status::new(self.malformed, e.to_string()))? {
                return Ok(Some(m));
            }
            match self.body.frame().await {
                None if self.reader.mid_message() => {
                    return Err(Status::new(self.malformed, "the stream ended inside a message"))
                }
                None => return Ok(None),
                Some(Err(e)) => return Err(Status::from_error(e.into())),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => self.reader.feed(data),
                    Err(frame) => {
                        if let Some(s) = frame.trailers_ref().and_then(Status::from_header_map) {
                            if s.code() != Code::Ok {
                                return Err(s);
                            }
                        }
                    }
                },
            }
        }
    }

    /// The next chunk message, its data left in the pieces it arrived in ([`parse_chunk`]).
    pub async fn next_chunk<M: Message + Default>(&mut self, data_field: u32) -> Result<Option<(M, Segments)>, Status> {
        match self.next().await? {
            Some(m) => parse_chunk(m, data_field).map(Some).map_err(|e| Status::new(self.malformed, e.to_string())),
            None => Ok(None),
        }
    }
}

/// Sends a call to `path` with `frames` as its body; the response's messages, or the
/// error tonic's generated client would give.
///
/// Empty pieces are left out: each would go as an empty HTTP/2 data frame, and a peer's flood
/// guard closes a connection that sends a few hundred of those (`too_many_data_frames`).
async fn call<S>(channel: &mut S, path: &'static str, frames: Vec<Bytes>) -> Result<Messages<S::ResponseBody>, Status>
where
    S: tonic::client::GrpcService<Body>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let pieces = frames.into_iter().filter(|b| !b.is_empty()).map(|b| Ok::<_, Status>(http_body::Frame::data(b)));
    let body = Body::new(http_body_util::StreamBody::new(tokio_stream::iter(pieces)));
    let mut req = http::Request::new(body);
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static(path);
    let h = req.headers_mut();
    h.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    h.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    std::future::poll_fn(|cx| channel.poll_ready(cx)).await.map_err(|e| Status::from_error(e.into()))?;
    let resp = channel.call(req).await.map_err(|e| Status::from_error(e.into()))?;
    let (parts, body) = resp.into_parts();
    // An error comes as a response of headers only.
    if let Some(s) = Status::from_header_map(&parts.headers) {
        if s.code() != Code::Ok {
            return Err(s);
        }
    }
    if parts.status != http::StatusCode::OK {
        return Err(Status::unknown(format!("the server answered HTTP {}", parts.status)));
    }
    Ok(Messages::new(body, Code::Internal))
}

/// Sends one push (the pieces of [`push_frames`]) through `channel` and reads the reply.
pub async fn push<S>(channel: &mut S, frames: Vec<Bytes>) -> Result<PushReply, Status>
where
    S: tonic::client::GrpcService<Body>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResponseBody: http_body::Body<Data = Bytes>,
    <S::ResponseBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut replies = call(channel, PUSH_PATH, frames).await?;
    let reply = replies.next().await?.ok_or_else(|| Status::internal("the push got no reply"))?;
    let reply = PushReply::decode(reply).map_err(|e| Status::internal(format!("malformed push reply: {e}")))?;
    // The status comes after the reply.
    match replies.next().await? {
        None => Ok(reply),
        Some(_) => Err(Status::internal("the push got more than one reply")),
    }
}

/// Starts a pull; the parameters arrive through [`Messages::next_chunk`] with [`PARAMS_DATA`].
pub async fn pull<S>(channel: &mut S, req: &PullRequest) -> Result<Messages<S::ResponseBody>, Status>
where
    S: tonic::client::GrpcService<Body>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    call(channel, PULL_PATH, vec![message_frame(req)]).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_is_adaptive_or_at_least_http2s_default_size() {
        assert_eq!(Window::parse("adaptive"), Ok(Window::Adaptive));
        assert_eq!(Window::parse("16777216"), Ok(Window::Fixed(16 << 20)));
        assert_eq!(Window::default(), Window::Fixed(2 << 20));
        for bad in ["1024", "big", "-1"] {
            assert!(Window::parse(bad).unwrap_err().contains("adaptive"), "{bad}");
        }
        assert_eq!(Window::Fixed(2 << 20).to_string(), "2097152");
    }

    fn head() -> GradientChunk {
        GradientChunk {
            worker: 3,
            step: 41,
            total: 10,
            loss: 0.5,
            bf16: false,
            compute_seconds: 0.01,
            pull_seconds: 0.002,
            ..Default::default()
        }
    }

    /// Feeds `bytes` cut at `cuts` and returns every message parsed.
    fn parse_all(bytes: &[u8], cuts: &[usize]) -> Result<Vec<(GradientChunk, Vec<u8>)>, FrameError> {
        let mut reader = MessageReader::default();
        let mut at = 0;
        for &c in cuts.iter().chain([&bytes.len()]) {
            let c = c.clamp(at, bytes.len());
            reader.feed(Bytes::copy_from_slice(&bytes[at..c]));
            at = c;
        }
        let mut out = Vec::new();
        while let Some(m) = reader.next_message()? {
            let (h, d) = parse_gradient_chunk(m)?;
            out.push((h, d.parts().flatten().copied().collect()));
        }
        assert!(!reader.mid_message());
        Ok(out)
    }

    #[test]
    fn pushed_pieces_parse_back_to_the_chunks_wherever_the_frames_are_cut() {
        let data: Vec<Bytes> = vec![Bytes::from(vec![1u8; 12]), Bytes::from(vec![2u8; 8]), Bytes::new()];
        let wire: Vec<u8> = push_frames(&head(), data.clone()).concat();
        for cuts in [vec![], vec![1], vec![3, 4, 5, 6, 30], (0..wire.len()).collect::<Vec<_>>()] {
            let got = parse_all(&wire, &cuts).unwrap();
            assert_eq!(got.len(), 3);
            for (i, (h, d)) in got.iter().enumerate() {
                let want = GradientChunk { offset: (i * crate::encoding::CHUNK_VALUES) as u64, ..head() };
                assert_eq!(h, &want);
                assert_eq!(d[..], data[i][..]);
            }
        }
    }

    #[test]
    fn a_message_from_any_protobuf_encoder_parses_the_same() {
        // prost writes the data field before the loss and timings; the pieces above write it
        // last. Both are the same message.
        let chunk = GradientChunk { data: Bytes::from_static(&[9, 8, 7, 6]), ..head() };
        let mut wire = vec![0u8];
        wire.extend_from_slice(&(chunk.encoded_len() as u32).to_be_bytes());
        chunk.encode(&mut wire).unwrap();
        let got = parse_all(&wire, &[7, 9]).unwrap();
        assert_eq!(got, vec![(GradientChunk { data: Bytes::new(), ..chunk }, vec![9, 8, 7, 6])]);
    }

    #[test]
    fn unknown_fields_are_skipped_and_a_repeated_data_field_keeps_the_last() {
        let mut msg = Vec::new();
        encode_key(2, WireType::Varint, &mut msg); // step
        encode_varint(7, &mut msg);
        encode_key(GRADIENT_DATA, WireType::LengthDelimited, &mut msg);
        encode_varint(2, &mut msg);
        msg.extend_from_slice(&[1, 1]);
        encode_key(99, WireType::LengthDelimited, &mut msg); // unknown
        encode_varint(3, &mut msg);
        msg.extend_from_slice(b"abc");
        encode_key(98, WireType::SixtyFourBit, &mut msg); // unknown
        msg.extend_from_slice(&[0; 8]);
        encode_key(GRADIENT_DATA, WireType::LengthDelimited, &mut msg);
        encode_varint(1, &mut msg);
        msg.push(5);
        let mut wire = vec![0u8];
        wire.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        wire.extend_from_slice(&msg);
        let got = parse_all(&wire, &[2, 11]).unwrap();
        assert_eq!(got, vec![(GradientChunk { step: 7, ..Default::default() }, vec![5])]);
    }

    #[tokio::test]
    async fn a_request_body_is_read_up_to_one_message_and_no_further() {
        let small = message_frame(&PullRequest { worker: 2, min_step: 7, shm: false });
        let body = Body::new(http_body_util::Full::new(small));
        let req: PullRequest = read_request(body, std::time::Duration::from_secs(1)).await.unwrap();
        assert_eq!((req.worker, req.min_step), (2, 7));
        // A body past the largest message is refused while it is read, not gathered whole.
        let huge = Body::new(http_body_util::Full::new(Bytes::from(vec![0u8; PREFIX + MAX_MESSAGE + 1])));
        let e = read_request::<PullRequest>(huge, std::time::Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("length limit"), "{}", e.message());
    }

    #[test]
    fn malformed_messages_are_refused_with_a_reason() {
        let mut r = MessageReader::default();
        r.feed(Bytes::from_static(&[1, 0, 0, 0, 0]));
        assert!(r.next_message().unwrap_err().to_string().contains("compressed"));
        let mut r = MessageReader::default();
        r.feed(Bytes::from_static(&[0, 0xff, 0, 0, 0]));
        assert!(r.next_message().unwrap_err().to_string().contains("more than"));
        // A data field longer than its message.
        let cut = Segments { parts: [Bytes::from_static(&[0x2a, 10, 1, 2])].into(), len: 4 };
        assert!(parse_gradient_chunk(cut).unwrap_err().to_string().contains("cut off"));
        let group = Segments { parts: [Bytes::from_static(&[0x0b])].into(), len: 1 };
        assert!(parse_gradient_chunk(group).unwrap_err().to_string().contains("groups"));
        let wrong_type = Segments { parts: [Bytes::from_static(&[0x10, 0xff])].into(), len: 2 };
        assert!(parse_gradient_chunk(wrong_type).unwrap_err().to_string().contains("not a GradientChunk"));
        // A stream that ends inside a message.
        let mut r = MessageReader::default();
        r.feed(Bytes::from_static(&[0, 0, 0, 0, 9, 1]));
        assert!(r.next_message().unwrap().is_none());
        assert!(r.mid_message());
    }
}
