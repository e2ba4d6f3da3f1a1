//! Values on the wire: raw little-endian `f32` bytes, or `bf16` (half the bytes), in chunks.

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
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Encoding::F32),
            "bf16" => Ok(Encoding::Bf16),
            other => Err(format!("unknown wire encoding `{other}`: use f32 or bf16")),
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
        if !bytes.len().is_multiple_of(self.width()) {
            return None;
        }
        let old = out.len();
        out.resize(old + bytes.len() / self.width(), 0.0);
        let dst = &mut out[old..];
        match self {
            Encoding::F32 => {
                for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                    *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Encoding::Bf16 => {
                for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                    *d = half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
                }
            }
        }
        Some(())
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

impl Assembler {
    /// Adds one chunk; `limit` is the largest total accepted.
    pub fn push(&mut self, offset: u64, total: u64, data: &[u8], enc: Encoding, limit: usize) -> Result<(), String> {
        match self.total {
            None => {
                if total as usize > limit {
                    return Err(format!("announced {total} values, more than the model's {limit}"));
                }
                self.total = Some(total);
                self.values.reserve(total as usize);
            }
            Some(t) if t != total => return Err(format!("chunk announces {total} values, earlier chunks {t}")),
            Some(_) => {}
        }
        if offset != self.values.len() as u64 {
            return Err(format!("chunk at offset {offset}, expected {}", self.values.len()));
        }
        if (data.len() / enc.width().max(1)) as u64 > total - offset {
            return Err(format!("chunks hold more than the announced {total} values"));
        }
        enc.decode_into(data, &mut self.values)
            .ok_or_else(|| format!("chunk of {} bytes is not whole {enc:?} values", data.len()))?;
        Ok(())
    }

    /// The buffer, once complete.
    pub fn finish(self) -> Result<Vec<f32>, String> {
        let total = self.total.unwrap_or(0);
        if self.values.len() as u64 != total {
            return Err(format!("stream ended after {} of {total} values", self.values.len()));
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
    fn malformed_streams_are_rejected_with_a_reason() {
        let f = Encoding::F32;
        let mut a = Assembler::default();
        assert!(a.push(0, 10, &[0, 0, 0], f, 10).unwrap_err().contains("not whole"));
        let mut a = Assembler::default();
        assert!(a.push(0, 10, &[0, 0, 0], Encoding::Bf16, 10).unwrap_err().contains("not whole"));
        let mut a = Assembler::default();
        assert!(a.push(0, 11, &[], f, 10).unwrap_err().contains("more than the model"));
        let mut a = Assembler::default();
        a.push(0, 4, &encode(&[1.0, 2.0]), f, 10).unwrap();
        assert!(a.push(3, 4, &encode(&[1.0]), f, 10).unwrap_err().contains("expected 2"));
        let mut a = Assembler::default();
        a.push(0, 2, &encode(&[1.0, 2.0]), f, 10).unwrap();
        assert!(a.push(2, 2, &encode(&[1.0]), f, 10).unwrap_err().contains("more than the announced"));
        let mut a = Assembler::default();
        a.push(0, 4, &encode(&[1.0, 2.0]), f, 10).unwrap();
        assert!(a.finish().unwrap_err().contains("2 of 4"));
    }
}
