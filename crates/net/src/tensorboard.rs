//! TensorBoard scalar event files (`events.out.tfevents.*`), written without TensorFlow.
//!
//! The file is a sequence of TFRecords: `u64` length, masked CRC-32C of the length, the
//! serialized `Event` protobuf, masked CRC-32C of the data (all little-endian).

use crate::proto_tb::{summary, Event, Summary};
use prost::Message;
use std::io::Write;
use std::path::{Path, PathBuf};

fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Writes scalar summaries to one event file.
pub struct EventWriter {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates `dir/events.out.tfevents.<seconds>.quorum` and writes the version record.
    pub fn create(dir: &Path, wall_time: f64) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(format!("events.out.tfevents.{}.quorum", wall_time as u64));
        let file = std::io::BufWriter::new(std::fs::File::create(&path)?);
        let mut w = EventWriter { file, path };
        w.write(&Event { wall_time, step: 0, file_version: "brain.Event:2".into(), summary: None })?;
        Ok(w)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, e: &Event) -> std::io::Result<()> {
        let data = e.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        self.file.write_all(&len)?;
        self.file.write_all(&masked_crc(&len).to_le_bytes())?;
        self.file.write_all(&data)?;
        self.file.write_all(&masked_crc(&data).to_le_bytes())
    }

    /// Records scalars `(tag, value)` at `step`.
    pub fn scalars(&mut self, wall_time: f64, step: u64, values: &[(&str, f32)]) -> std::io::Result<()> {
        let value =
            values.iter().map(|(tag, v)| summary::Value { tag: tag.to_string(), simple_value: Some(*v) }).collect();
        self.write(&Event {
            wall_time,
            step: step as i64,
            file_version: String::new(),
            summary: Some(Summary { value }),
        })
    }

    /// Flushes buffered records to the file.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

/// An event file that cannot be read back: the file, and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("tensorboard event file {path}: {what}")]
pub struct ReadError {
    /// The file.
    pub path: std::path::PathBuf,
    /// Cannot read, truncated record, CRC mismatch, not an Event.
    pub what: String,
}

/// Reads every record of an event file back, checking both CRCs (for tests and tools).
pub fn read_events(path: &Path) -> Result<Vec<Event>, ReadError> {
    read_records(path).map_err(|what| ReadError { path: path.to_path_buf(), what })
}

fn read_records(path: &Path) -> Result<Vec<Event>, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut at = 0;
    let take = |at: &mut usize, n: usize| -> Result<&[u8], String> {
        let s = bytes.get(*at..*at + n).ok_or("truncated record")?;
        *at += n;
        Ok(s)
    };
    while at < bytes.len() {
        let len_bytes = take(&mut at, 8)?;
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let crc = u32::from_le_bytes(take(&mut at, 4)?.try_into().expect("4 bytes"));
        if crc != masked_crc(len_bytes) {
            return Err("length CRC mismatch".into());
        }
        let data = take(&mut at, len)?;
        let crc = u32::from_le_bytes(take(&mut at, 4)?.try_into().expect("4 bytes"));
        if crc != masked_crc(data) {
            return Err("data CRC mismatch".into());
        }
        out.push(Event::decode(data).map_err(|e| e.to_string())?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn scalars_round_trip_through_an_event_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), 1_700_000_000.5).unwrap();
        w.scalars(1_700_000_001.0, 10, &[("loss", 0.5), ("accuracy", 0.0)]).unwrap();
        w.scalars(1_700_000_002.0, 20, &[("loss", 0.25)]).unwrap();
        w.flush().unwrap();
        let events = read_events(w.path()).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].file_version, "brain.Event:2");
        let s = events[1].summary.as_ref().unwrap();
        assert_eq!(events[1].step, 10);
        assert_eq!(s.value[0].tag, "loss");
        assert_eq!(s.value[0].simple_value, Some(0.5));
        assert_eq!(s.value[1].simple_value, Some(0.0), "a zero is still written");
        assert_eq!(events[2].summary.as_ref().unwrap().value[0].simple_value, Some(0.25));
    }

    #[test]
    fn a_damaged_record_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), 1.0).unwrap();
        w.scalars(2.0, 1, &[("loss", 1.0)]).unwrap();
        w.flush().unwrap();
        let mut bytes = std::fs::read(w.path()).unwrap();
        let n = bytes.len();
        bytes[n - 6] ^= 0xff;
        std::fs::write(w.path(), bytes).unwrap();
        assert!(read_events(w.path()).unwrap_err().to_string().contains("CRC"));
    }
}
