//! How values are encoded on the wire: raw little-endian `f32` bytes, or `bf16` (half the
//! bytes), in chunks; and their reassembly from chunks.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Values per chunk: 1 MiB of `f32`, far below gRPC's 4 MiB default message limit.
pub const CHUNK_VALUES: usize = 256 * 1024;

/// How parameters and gradients are encoded on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Little-endian IEEE `f32`, exact.
    #[default]
    F32,
    /// Little-endian `bf16` (the top 16 bits of an `f32`, rounded to nearest even): half the
    /// bytes, 8 bits of mantissa. The server still averages and applies in `f32`.
    Bf16,
}

impl std::str::FromStr for Encoding {
    type Err = quorum_core::ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Encoding::F32),
            "bf16" => Ok(Encoding::Bf16),
            other => {
                Err(quorum_core::ConfigError::invalid(format!("unknown wire encoding `{other}`: use f32 or bf16")))
            }
        }
    }
}

impl Encoding {
    /// Bytes per value.
    pub fn width(self) -> usize {
        match self {
            Encoding::F32 => 4,
            Encoding::Bf16 => 2,
        }
    }

    /// Whether the chunk flag says bf16.
    pub fn from_flag(bf16: bool) -> Self {
        if bf16 {
            Encoding::Bf16
        } else {
            Encoding::F32
        }
    }

    /// Encodes values (written as fixed-size stores into a zeroed buffer, which compiles to
    /// vectorised code rather than one `extend` per value).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        let mut out = vec![0u8; values.len() * self.width()];
        match self {
            Encoding::F32 => {
                for (dst, v) in out.chunks_exact_mut(4).zip(values) {
                    dst.copy_from_slice(&v.to_le_bytes());
                }
            }
            Encoding::Bf16 => {
                for (dst, v) in out.chunks_exact_mut(2).zip(values) {
                    dst.copy_from_slice(&half::bf16::from_f32(*v).to_bits().to_le_bytes());
                }
            }
        }
        out
    }

    /// Appends the values in `bytes` to `out`; `None` when the length is not whole values.
    pub fn decode_into(self, bytes: &[u8], out: &mut Vec<f32>) -> Option<()> {
        self.decode_parts_into(&[bytes], out)
    }

    /// Appends the values in the concatenation of `parts` (a chunk as it arrived, in pieces)
    /// to `out`; `None` when the length is not whole values. Values are appended as they are
    /// read (no zeroed buffer first), a value that straddles two pieces joined on the way.
    pub fn decode_parts_into(self, parts: &[&[u8]], out: &mut Vec<f32>) -> Option<()> {
        let width = self.width();
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if !len.is_multiple_of(width) {
            return None;
        }
        out.reserve(len / width);
        let value = |b: &[u8]| match self {
            Encoding::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Encoding::Bf16 => half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
        };
        let mut carry = [0u8; 4];
        let mut held = 0;
        for p in parts {
            let mut p: &[u8] = p;
            if held > 0 {
                let take = (width - held).min(p.len());
                carry[held..held + take].copy_from_slice(&p[..take]);
                (held, p) = (held + take, &p[take..]);
                if held < width {
                    continue;
                }
                out.push(value(&carry));
            }
            let whole = p.len() - p.len() % width;
            match self {
                // Written out per encoding so each loop compiles to straight vector code.
                Encoding::F32 => {
                    out.extend(p[..whole].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                }
                Encoding::Bf16 => out.extend(
                    p[..whole]
                        .chunks_exact(2)
                        .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()),
                ),
            }
            held = p.len() - whole;
            carry[..held].copy_from_slice(&p[whole..]);
        }
        Some(())
    }
}

/// Buffers of values handed back once the bytes made of them have been sent, for the next
/// gradient: a gradient buffer is then neither zeroed nor faulted in again every step.
#[derive(Clone, Default)]
pub struct Recycled(std::sync::Arc<std::sync::Mutex<Vec<Vec<f32>>>>);

impl Recycled {
    /// Buffers kept at most (one being sent, one being filled).
    const KEPT: usize = 2;

    /// A buffer handed back earlier (its values stale: overwrite them), or a new one.
    pub fn take(&self) -> Vec<f32> {
        self.0.lock().map(|mut b| b.pop()).ok().flatten().unwrap_or_default()
    }

    /// Keeps `buffer` for a later [`Recycled::take`].
    pub fn give(&self, buffer: Vec<f32>) {
        if let Ok(mut kept) = self.0.lock() {
            if kept.len() < Self::KEPT {
                kept.push(buffer);
            }
        }
    }
}

/// `f32` values seen as their little-endian bytes, so a gradient can be sent without copying
/// it into a byte buffer first (little-endian targets only); handed back to its [`Recycled`]
/// when the last byte of it has been sent.
#[cfg(target_endian = "little")]
struct LeF32(Vec<f32>, Option<Recycled>);

#[cfg(target_endian = "little")]
impl Drop for LeF32 {
    fn drop(&mut self) {
        if let Some(r) = self.1.take() {
            r.give(std::mem::take(&mut self.0));
        }
    }
}

#[cfg(target_endian = "little")]
impl AsRef<[u8]> for LeF32 {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

impl Encoding {
    /// Encodes values into wire chunks of [`CHUNK_VALUES`] (at least one, possibly empty).
    /// `f32` on little-endian machines moves the buffer into the chunks without copying.
    pub fn encode_chunks(self, values: Vec<f32>) -> Vec<Bytes> {
        self.encode_chunks_recycled(values, None)
    }

    /// [`Encoding::encode_chunks`], handing `values` back to `recycle` once sent (`f32` on
    /// little-endian machines; otherwise they are copied and handed back at once).
    pub fn encode_chunks_recycled(self, values: Vec<f32>, recycle: Option<&Recycled>) -> Vec<Bytes> {
        if values.is_empty() {
            return vec![Bytes::new()];
        }
        #[cfg(target_endian = "little")]
        if self == Encoding::F32 {
            let n = values.len();
            let all = Bytes::from_owner(LeF32(values, recycle.cloned()));
            return (0..n).step_by(CHUNK_VALUES).map(|i| all.slice(4 * i..4 * (i + CHUNK_VALUES).min(n))).collect();
        }
        let chunks = values.chunks(CHUNK_VALUES).map(|c| Bytes::from(self.encode(c))).collect();
        if let Some(r) = recycle {
            r.give(values);
        }
        chunks
    }
}

/// Encodes values as little-endian `f32` bytes.
pub fn encode(values: &[f32]) -> Vec<u8> {
    Encoding::F32.encode(values)
}

/// Reassembles a buffer from chunks, checking that offsets are contiguous and the total fits.
#[derive(Debug, Default)]
pub struct Assembler {
    values: Vec<f32>,
    total: Option<u64>,
}

/// A chunked stream of values that does not add up: names what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// More values announced than the model has.
    #[error("announced {total} values, more than the model's {limit}")]
    TooMany {
        /// Announced.
        total: u64,
        /// The model's.
        limit: usize,
    },
    /// A chunk announces another total than the chunks before it.
    #[error("chunk announces {total} values, earlier chunks {earlier}")]
    TotalChanged {
        /// This chunk's.
        total: u64,
        /// The earlier chunks'.
        earlier: u64,
    },
    /// A chunk does not start where the values so far end.
    #[error("chunk at offset {offset}, expected {expected}")]
    Gap {
        /// Where it starts.
        offset: u64,
        /// Where it should.
        expected: u64,
    },
    /// The chunks hold more values than announced.
    #[error("chunks hold more than the announced {total} values")]
    Overflow {
        /// Announced.
        total: u64,
    },
    /// A chunk's bytes are not a whole number of values.
    #[error("chunk of {bytes} bytes is not whole {encoding:?} values")]
    NotWhole {
        /// Its length.
        bytes: usize,
        /// The encoding.
        encoding: Encoding,
    },
    /// The stream ended early.
    #[error("stream ended after {got} of {total} values")]
    Short {
        /// Values received.
        got: usize,
        /// Announced.
        total: u64,
    },
}

impl Assembler {
    /// Reassembles into `buffer` (cleared; its capacity is reused, so a server that keeps
    /// its buffers does not allocate, and page-fault, a fresh one per gradient).
    pub fn with_buffer(mut buffer: Vec<f32>) -> Self {
        buffer.clear();
        Assembler { values: buffer, total: None }
    }

    /// Adds one chunk; `limit` is the largest total accepted.
    pub fn push(
        &mut self,
        offset: u64,
        total: u64,
        data: &[u8],
        enc: Encoding,
        limit: usize,
    ) -> Result<(), ChunkError> {
        self.push_parts(offset, total, &[data], enc, limit)
    }

    /// Adds one chunk whose bytes are the concatenation of `parts`.
    pub fn push_parts(
        &mut self,
        offset: u64,
        total: u64,
        parts: &[&[u8]],
        enc: Encoding,
        limit: usize,
    ) -> Result<(), ChunkError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        match self.total {
            None => {
                if total as usize > limit {
                    return Err(ChunkError::TooMany { total, limit });
                }
                self.total = Some(total);
                self.values.reserve_exact(total as usize);
            }
            Some(earlier) if earlier != total => return Err(ChunkError::TotalChanged { total, earlier }),
            Some(_) => {}
        }
        if offset != self.values.len() as u64 {
            return Err(ChunkError::Gap { offset, expected: self.values.len() as u64 });
        }
        if (len / enc.width().max(1)) as u64 > total - offset {
            return Err(ChunkError::Overflow { total });
        }
        enc.decode_parts_into(parts, &mut self.values).ok_or(ChunkError::NotWhole { bytes: len, encoding: enc })?;
        Ok(())
    }

    /// The buffer, once complete.
    pub fn finish(self) -> Result<Vec<f32>, ChunkError> {
        let total = self.total.unwrap_or(0);
        if self.values.len() as u64 != total {
            return Err(ChunkError::Short { got: self.values.len(), total });
        }
        Ok(self.values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_reassemble_to_the_original() {
        let v: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 3.0).collect();
        let mut a = Assembler::default();
        for (i, c) in v.chunks(300).enumerate() {
            a.push((i * 300) as u64, 1000, &encode(c), Encoding::F32, 1000).unwrap();
        }
        assert_eq!(a.finish().unwrap(), v);
    }

    #[test]
    fn bf16_halves_the_bytes_and_keeps_three_significant_digits() {
        let v: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37 - 100.0).sin() * 10f32.powi(i % 7 - 3)).collect();
        let bytes = Encoding::Bf16.encode(&v);
        assert_eq!(bytes.len(), 2 * v.len());
        let mut back = Vec::new();
        Encoding::Bf16.decode_into(&bytes, &mut back).unwrap();
        for (a, b) in v.iter().zip(&back) {
            assert!((a - b).abs() <= a.abs() / 256.0, "{a} -> {b}");
        }
        // Values bf16 holds exactly survive unchanged.
        let exact = [0.0f32, 1.0, -2.5, 0.15625, 1024.0];
        let mut out = Vec::new();
        Encoding::Bf16.decode_into(&Encoding::Bf16.encode(&exact), &mut out).unwrap();
        assert_eq!(out, exact);
    }

    #[test]
    fn encoded_chunks_decode_to_the_original_in_both_encodings() {
        let v: Vec<f32> = (0..2 * CHUNK_VALUES + 5).map(|i| (i % 64) as f32 * 0.25 - 7.0).collect();
        for enc in [Encoding::F32, Encoding::Bf16] {
            let chunks = enc.encode_chunks(v.clone());
            assert_eq!(chunks.len(), 3);
            assert_eq!(chunks[2].len(), 5 * enc.width());
            let mut a = Assembler::with_buffer(vec![9.0; 3]);
            for (i, c) in chunks.iter().enumerate() {
                a.push((i * CHUNK_VALUES) as u64, v.len() as u64, c, enc, v.len()).unwrap();
            }
            // Every value here is exact in bf16 too (at most 8 significant bits).
            assert_eq!(a.finish().unwrap(), v, "{enc:?}");
        }
        assert_eq!(Encoding::F32.encode_chunks(Vec::new()), vec![Bytes::new()]);
    }

    #[test]
    fn a_chunk_in_pieces_decodes_like_the_whole_even_with_values_cut_in_two() {
        let v: Vec<f32> = (0..37).map(|i| i as f32 * 0.75 - 9.0).collect();
        for enc in [Encoding::F32, Encoding::Bf16] {
            let bytes = enc.encode(&v);
            // Cuts inside values (every odd cut splits a bf16 value, most split an f32 one; 1, 2,
            // 3 spread the first f32 value over four pieces).
            for cuts in [vec![1], vec![3, 4, 9], vec![0, 0, 5, 70], vec![1, 2, 3, 6]] {
                let mut parts = Vec::new();
                let mut at = 0;
                for c in cuts.into_iter().chain([bytes.len()]) {
                    parts.push(&bytes[at..c]);
                    at = c;
                }
                let mut a = Assembler::with_buffer(vec![f32::NAN; 40]);
                a.push_parts(0, 37, &parts, enc, 37).unwrap();
                assert_eq!(a.finish().unwrap(), v, "{enc:?}");
            }
        }
    }

    #[test]
    fn a_sent_gradient_buffer_comes_back_for_the_next_one_once_its_bytes_are_gone() {
        let pool = Recycled::default();
        let v: Vec<f32> = (0..2 * CHUNK_VALUES + 1).map(|i| i as f32).collect();
        let at = v.as_ptr();
        let chunks = Encoding::F32.encode_chunks_recycled(v, Some(&pool));
        let mut back = Vec::new();
        Encoding::F32.decode_parts_into(&chunks.iter().map(|c| &c[..]).collect::<Vec<_>>(), &mut back).unwrap();
        assert_eq!(back[2 * CHUNK_VALUES], (2 * CHUNK_VALUES) as f32);
        assert!(pool.take().is_empty(), "still being sent: not handed back yet");
        let last = chunks[2].clone();
        drop(chunks);
        assert!(pool.take().is_empty(), "one chunk still holds the buffer");
        drop(last);
        let reused = pool.take();
        assert_eq!((reused.as_ptr(), reused.len()), (at, 2 * CHUNK_VALUES + 1), "the same buffer, whole");
        Encoding::Bf16.encode_chunks_recycled(reused, Some(&pool));
        assert_eq!(pool.take().len(), 2 * CHUNK_VALUES + 1, "bf16 copies, so hands it back at once");
    }

    #[test]
    fn malformed_streams_are_rejected_with_a_reason() {
        let f = Encoding::F32;
        let mut a = Assembler::default();
        assert!(a.push(0, 10, &[0, 0, 0], f, 10).unwrap_err().to_string().contains("not whole"));
        let mut a = Assembler::default();
        assert!(a.push(0, 10, &[0, 0, 0], Encoding::Bf16, 10).unwrap_err().to_string().contains("not whole"));
        let mut a = Assembler::default();
        assert!(a.push(0, 11, &[], f, 10).unwrap_err().to_string().contains("more than the model"));
        let mut a = Assembler::default();
        a.push(0, 4, &encode(&[1.0, 2.0]), f, 10).unwrap();
        assert!(a.push(3, 4, &encode(&[1.0]), f, 10).unwrap_err().to_string().contains("expected 2"));
        let mut a = Assembler::default();
        a.push(0, 2, &encode(&[1.0, 2.0]), f, 10).unwrap();
        assert!(a.push(2, 2, &encode(&[1.0]), f, 10).unwrap_err().to_string().contains("more than the announced"));
        let mut a = Assembler::default();
        a.push(0, 4, &encode(&[1.0, 2.0]), f, 10).unwrap();
        assert!(a.finish().unwrap_err().to_string().contains("2 of 4"));
    }
}
