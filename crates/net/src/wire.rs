//! Raw little-endian `f32` bytes, in chunks.

/// Values per chunk: 1 MiB of `f32`, far below gRPC's 4 MiB default message limit.
pub const CHUNK_VALUES: usize = 256 * 1024;

/// Encodes values as little-endian bytes.
pub fn encode(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Appends the values in `bytes` to `out`; `None` when the length is not a multiple of 4.
pub fn decode_into(bytes: &[u8], out: &mut Vec<f32>) -> Option<()> {
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
    Some(())
}

/// Reassembles a buffer from chunks, checking that offsets are contiguous and the total fits.
#[derive(Debug, Default)]
pub struct Assembler {
    values: Vec<f32>,
    total: Option<u64>,
}

impl Assembler {
    /// Adds one chunk; `limit` is the largest total accepted.
    pub fn push(&mut self, offset: u64, total: u64, data: &[u8], limit: usize) -> Result<(), String> {
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
        decode_into(data, &mut self.values)
            .ok_or_else(|| format!("chunk of {} bytes is not whole f32 values", data.len()))?;
        if self.values.len() as u64 > total {
            return Err(format!("chunks hold more than the announced {total} values"));
        }
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
            a.push((i * 300) as u64, 1000, &encode(c), 1000).unwrap();
        }
        assert_eq!(a.finish().unwrap(), v);
    }

    #[test]
    fn malformed_streams_are_rejected_with_a_reason() {
        let mut a = Assembler::default();
        assert!(a.push(0, 10, &[0, 0, 0], 10).unwrap_err().contains("not whole f32"));
        let mut a = Assembler::default();
        assert!(a.push(0, 11, &[], 10).unwrap_err().contains("more than the model"));
        let mut a = Assembler::default();
        a.push(0, 4, &encode(&[1.0, 2.0]), 10).unwrap();
        assert!(a.push(3, 4, &encode(&[1.0]), 10).unwrap_err().contains("expected 2"));
        let mut a = Assembler::default();
        a.push(0, 4, &encode(&[1.0, 2.0]), 10).unwrap();
        assert!(a.finish().unwrap_err().contains("2 of 4"));
    }
}
