//! Checkpoints: parameters, EMA and optimizer state as safetensors, plus JSON metadata.
//!
//! A checkpoint for step `s` is two files in the checkpoint directory:
//! `ckpt-<s>.safetensors` (tensors named `params/<tensor>`, `ema/<tensor>`,
//! `optimizer/<slot>/<tensor>`, each with its layout shape) and `ckpt-<s>.json`
//! ([`CheckpointMeta`]). Each file is written to a temporary name, fsynced and renamed, the
//! JSON last, so a checkpoint is either complete or absent; a crash mid-write leaves the
//! previous one in place. Old checkpoints are rotated away.

use quorum_core::{ParamLayout, ServerConfig, ServerSnapshot};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// What a checkpoint says about itself (`ckpt-<step>.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CheckpointMeta {
    /// Format version.
    pub format: u32,
    /// Updates applied: training resumes at this step.
    pub step: u64,
    /// Optimizer updates (Adam's bias correction).
    pub optimizer_updates: u64,
    /// N at the time (lowered after a stall, if so configured).
    pub aggregate: u32,
    /// Tensor names and shapes, in layout order.
    pub layout: Vec<(String, Vec<usize>)>,
    /// The server configuration the state belongs to.
    pub config: ServerConfig,
    /// Where the data stream stands: batches depend only on (seed, worker, step), so the
    /// step is the data position.
    pub data_position: u64,
    /// The run's own configuration (free-form, e.g. the resolved TOML), for the record.
    pub run_config: Option<String>,
    /// Name of the safetensors file next to this one.
    pub tensors: String,
}

const FORMAT: u32 = 1;

/// Why a checkpoint could not be written or used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing failed.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed (said in the message, so not also a `source`, which would say it twice).
        error: std::io::Error,
    },
    /// The files are damaged.
    #[error("{path} is corrupt: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The checkpoint belongs to another model or configuration.
    #[error("{path} does not match this run: {reason}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// No usable checkpoint.
    #[error("no usable checkpoint in {dir}{}", if .skipped.is_empty() { String::new() } else { format!(" ({})", .skipped.join("; ")) })]
    NoneUsable {
        /// The directory searched.
        dir: PathBuf,
        /// Why each candidate was refused.
        skipped: Vec<String>,
    },
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |error| CheckpointError::Io { path: path.to_path_buf(), error }
}

/// Writes `bytes` to `path` atomically: temporary file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("checkpoint")));
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

fn file_stem(step: u64) -> String {
    format!("ckpt-{step:010}")
}

/// Saves `snap` for `layout` into `dir` and keeps only the newest `keep` checkpoints.
/// Returns the JSON path.
pub fn save(
    dir: &Path,
    snap: &ServerSnapshot,
    layout: &ParamLayout,
    config: &ServerConfig,
    run_config: Option<&str>,
    keep: usize,
) -> Result<PathBuf, CheckpointError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let stem = file_stem(snap.step);
    let mut named: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut add = |prefix: &str, flat: &[f32]| {
        for t in layout.tensors() {
            named.push((format!("{prefix}/{}", t.name), t.shape.clone(), crate::encoding::encode(&flat[t.range()])));
        }
    };
    add("params", &snap.params);
    if let Some(e) = &snap.ema {
        add("ema", e);
    }
    for (slot, v) in &snap.optimizer_slots {
        add(&format!("optimizer/{slot}"), v);
    }
    let views = named
        .iter()
        .map(|(n, shape, bytes)| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map_err(|e| CheckpointError::Corrupt { path: dir.join(&stem), reason: e.to_string() })?;
            Ok((n.clone(), view))
        })
        .collect::<Result<Vec<_>, CheckpointError>>()?;
    let mut info = HashMap::new();
    info.insert("step".to_string(), snap.step.to_string());
    info.insert("format".to_string(), "quorum-checkpoint-1".to_string());
    let bytes = safetensors::serialize(views, Some(info))
        .map_err(|e| CheckpointError::Corrupt { path: dir.join(&stem), reason: e.to_string() })?;
    let tensors = format!("{stem}.safetensors");
    write_atomic(&dir.join(&tensors), &bytes)?;
    let meta = CheckpointMeta {
        format: FORMAT,
        step: snap.step,
        optimizer_updates: snap.optimizer_updates,
        aggregate: snap.aggregate,
        layout: layout.tensors().iter().map(|t| (t.name.clone(), t.shape.clone())).collect(),
        config: config.clone(),
        data_position: snap.step,
        run_config: run_config.map(str::to_string),
        tensors,
    };
    let json_path = dir.join(format!("{stem}.json"));
    let json = serde_json::to_vec_pretty(&meta)
        .map_err(|e| CheckpointError::Io { path: json_path.clone(), error: std::io::Error::other(e) })?;
    write_atomic(&json_path, &json)?;
    rotate(dir, keep)?;
    Ok(json_path)
}

/// Checkpoint JSON files in `dir`, newest step first.
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<(u64, PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("ckpt-")?.strip_suffix(".json")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort_by_key(|e| std::cmp::Reverse(e.0));
    out
}

fn rotate(dir: &Path, keep: usize) -> Result<(), CheckpointError> {
    for (step, json) in list(dir).into_iter().skip(keep.max(1)) {
        let _ = std::fs::remove_file(dir.join(format!("{}.safetensors", file_stem(step))));
        let _ = std::fs::remove_file(&json);
    }
    Ok(())
}

/// Loads one checkpoint (by its JSON path) and checks it against `layout` and `config`.
pub fn load(
    json_path: &Path,
    layout: &ParamLayout,
    config: &ServerConfig,
) -> Result<(CheckpointMeta, ServerSnapshot), CheckpointError> {
    let corrupt = |reason: String| CheckpointError::Corrupt { path: json_path.to_path_buf(), reason };
    let mismatch = |reason: String| CheckpointError::Mismatch { path: json_path.to_path_buf(), reason };
    let text = std::fs::read(json_path).map_err(io(json_path))?;
    let meta: CheckpointMeta = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
    if meta.format != FORMAT {
        return Err(corrupt(format!("format {} is not the supported {FORMAT}", meta.format)));
    }
    let ours: Vec<(String, Vec<usize>)> = layout.tensors().iter().map(|t| (t.name.clone(), t.shape.clone())).collect();
    if meta.layout != ours {
        let n: usize = meta.layout.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        return Err(mismatch(format!(
            "it holds a model of {} tensors / {n} parameters, this run's model has {} tensors / {} parameters; \
             use the model settings it was written with, or another checkpoint directory",
            meta.layout.len(),
            ours.len(),
            layout.len()
        )));
    }
    if meta.config.workers != config.workers
        || meta.config.policy != config.policy
        || meta.config.optimizer != config.optimizer
    {
        return Err(mismatch(format!(
            "it was written by a run with {} workers, policy {:?}, optimizer {:?}; this run has {} workers, \
             policy {:?}, optimizer {:?}",
            meta.config.workers,
            meta.config.policy,
            meta.config.optimizer,
            config.workers,
            config.policy,
            config.optimizer
        )));
    }
    let tpath = json_path.with_file_name(&meta.tensors);
    let bytes = std::fs::read(&tpath).map_err(io(&tpath))?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| CheckpointError::Corrupt { path: tpath.clone(), reason: e.to_string() })?;
    let read = |prefix: &str| read_flat(&tpath, &st, layout, &format!("{prefix}/"));
    let params = read("params")?
        .ok_or_else(|| CheckpointError::Corrupt { path: tpath.clone(), reason: "no parameters".into() })?;
    if params.iter().any(|v| !v.is_finite()) {
        return Err(CheckpointError::Corrupt { path: tpath.clone(), reason: "parameters hold NaN or Inf".into() });
    }
    let ema = read("ema")?;
    let mut optimizer_slots = Vec::new();
    for slot in ["slot_a", "slot_b"] {
        if let Some(v) = read(&format!("optimizer/{slot}"))? {
            optimizer_slots.push((slot.to_string(), v));
        }
    }
    let snap = ServerSnapshot {
        step: meta.step,
        params,
        ema,
        optimizer_slots,
        optimizer_updates: meta.optimizer_updates,
        aggregate: meta.aggregate,
    };
    Ok((meta, snap))
}

/// The tensors of `layout`, each named `prefix` + its name, F32 of its shape, laid end to end;
/// `None` when the first is absent (a part the file does not hold, e.g. no EMA).
pub(crate) fn read_flat(
    path: &Path,
    st: &SafeTensors,
    layout: &ParamLayout,
    prefix: &str,
) -> Result<Option<Vec<f32>>, CheckpointError> {
    let mut flat = Vec::with_capacity(layout.len());
    for (i, t) in layout.tensors().iter().enumerate() {
        let name = format!("{prefix}{}", t.name);
        let view = match st.tensor(&name) {
            Ok(v) => v,
            Err(_) if i == 0 => return Ok(None),
            Err(e) => {
                return Err(CheckpointError::Corrupt { path: path.to_path_buf(), reason: format!("{name}: {e}") })
            }
        };
        if view.dtype() != Dtype::F32 || view.shape() != t.shape.as_slice() {
            return Err(CheckpointError::Corrupt {
                path: path.to_path_buf(),
                reason: format!(
                    "{name} is {:?} {:?}, expected F32 {:?} (quorum trains float32 parameters only)",
                    view.dtype(),
                    view.shape(),
                    t.shape
                ),
            });
        }
        crate::encoding::Encoding::F32.decode_into(view.data(), &mut flat).expect("an F32 view holds whole values");
    }
    Ok(Some(flat))
}

/// The newest checkpoint in `dir` that loads and matches; older ones are tried when newer
/// ones are corrupt or mismatched, and the reasons are returned alongside.
pub fn load_latest(
    dir: &Path,
    layout: &ParamLayout,
    config: &ServerConfig,
) -> Result<(CheckpointMeta, ServerSnapshot, Vec<String>), CheckpointError> {
    let mut skipped = Vec::new();
    for (_, json) in list(dir) {
        match load(&json, layout, config) {
            Ok((m, s)) => return Ok((m, s, skipped)),
            Err(e) => skipped.push(e.to_string()),
        }
    }
    Err(CheckpointError::NoneUsable { dir: dir.to_path_buf(), skipped })
}

#[cfg(test)]
mod tests {
    use super::*;
    use quorum_core::{OptimizerConfig, Policy};

    fn setup() -> (ParamLayout, ServerConfig, ServerSnapshot) {
        let layout = ParamLayout::from_shapes([("w", vec![2, 3]), ("b", vec![3])]).unwrap();
        let mut cfg = ServerConfig::new(3, Policy::Sync { aggregate: 2, backups: 1 }, 0.1);
        cfg.optimizer = OptimizerConfig::Momentum { momentum: 0.9, nesterov: false };
        let snap = ServerSnapshot {
            step: 42,
            params: (0..9).map(|i| i as f32 * 0.5).collect(),
            ema: None,
            optimizer_slots: vec![("slot_a".into(), (0..9).map(|i| -(i as f32)).collect())],
            optimizer_updates: 42,
            aggregate: 2,
        };
        (layout, cfg, snap)
    }

    #[test]
    fn a_saved_checkpoint_loads_back_identically() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, cfg, snap) = setup();
        save(dir.path(), &snap, &layout, &cfg, Some("workers = 3"), 3).unwrap();
        let (meta, back, skipped) = load_latest(dir.path(), &layout, &cfg).unwrap();
        assert_eq!(back, snap);
        assert_eq!(meta.data_position, 42);
        assert_eq!(meta.run_config.as_deref(), Some("workers = 3"));
        assert!(skipped.is_empty());
    }

    #[test]
    fn old_checkpoints_are_rotated_away() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, cfg, mut snap) = setup();
        for step in 1..=5 {
            snap.step = step;
            save(dir.path(), &snap, &layout, &cfg, None, 2).unwrap();
        }
        let steps: Vec<u64> = list(dir.path()).into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![5, 4]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 4, "two .json + two .safetensors");
    }

    #[test]
    fn a_corrupt_newest_checkpoint_falls_back_to_the_older_one() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, cfg, mut snap) = setup();
        snap.step = 10;
        save(dir.path(), &snap, &layout, &cfg, None, 3).unwrap();
        snap.step = 20;
        save(dir.path(), &snap, &layout, &cfg, None, 3).unwrap();
        let t = dir.path().join("ckpt-0000000020.safetensors");
        let mut bytes = std::fs::read(&t).unwrap();
        bytes.truncate(bytes.len() / 2);
        std::fs::write(&t, bytes).unwrap();
        let (meta, _, skipped) = load_latest(dir.path(), &layout, &cfg).unwrap();
        assert_eq!(meta.step, 10);
        assert_eq!(skipped.len(), 1);
        assert!(skipped[0].contains("ckpt-0000000020.safetensors is corrupt"), "{skipped:?}");
    }

    #[test]
    fn a_checkpoint_of_another_model_or_config_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, cfg, snap) = setup();
        save(dir.path(), &snap, &layout, &cfg, None, 3).unwrap();
        let other = ParamLayout::from_shapes([("w", vec![4, 3]), ("b", vec![3])]).unwrap();
        let e = load_latest(dir.path(), &other, &cfg).unwrap_err().to_string();
        assert!(e.contains("does not match this run") && e.contains("9 parameters") && e.contains("15"), "{e}");
        let mut cfg2 = cfg.clone();
        cfg2.workers = 5;
        cfg2.policy = Policy::Sync { aggregate: 4, backups: 1 };
        let e = load_latest(dir.path(), &layout, &cfg2).unwrap_err().to_string();
        assert!(e.contains("3 workers") && e.contains("5 workers"), "{e}");
    }

    #[test]
    fn an_empty_directory_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let (layout, cfg, _) = setup();
        let e = load_latest(dir.path(), &layout, &cfg).unwrap_err().to_string();
        assert!(e.contains("no usable checkpoint"), "{e}");
    }
}
