//! A parameter file: a model's named tensors with their starting values, for a server that
//! does not compute the model itself (workers in PyTorch write it from their module).
//!
//! It is a safetensors file whose metadata holds the tensors' order (safetensors itself keeps
//! tensors sorted by name, and the order decides what each number of the flat buffer means).
//! [`read`] also reads a checkpoint (its `ckpt-<step>.json`), so a finished run's parameters
//! load the same way.

use crate::checkpoint::{io, read_flat, CheckpointError, CheckpointMeta};
use quorum_core::ParamLayout;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

/// The `format` metadata value of a parameter file.
pub const FORMAT: &str = "quorum-params-1";

fn corrupt(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Corrupt { path: path.to_path_buf(), reason: reason.into() }
}

/// Writes `values` (laid out as `layout` says) to `path`, atomically.
pub fn write(path: &Path, layout: &ParamLayout, values: &[f32]) -> Result<(), CheckpointError> {
    if values.len() != layout.len() {
        return Err(corrupt(path, format!("{} values for a layout of {}", values.len(), layout.len())));
    }
    let bytes: Vec<Vec<u8>> = layout.tensors().iter().map(|t| crate::encoding::encode(&values[t.range()])).collect();
    let views = layout
        .tensors()
        .iter()
        .zip(&bytes)
        .map(|(t, b)| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, t.shape.clone(), b)
                .map_err(|e| corrupt(path, e.to_string()))?;
            Ok((t.name.clone(), view))
        })
        .collect::<Result<Vec<_>, CheckpointError>>()?;
    let order: Vec<&str> = layout.tensors().iter().map(|t| t.name.as_str()).collect();
    let mut info = HashMap::new();
    info.insert("format".to_string(), FORMAT.to_string());
    info.insert("order".to_string(), serde_json::to_string(&order).expect("names serialise"));
    let bytes = safetensors::serialize(views, Some(info)).map_err(|e| corrupt(path, e.to_string()))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    crate::checkpoint::write_atomic(path, &bytes)
}

/// Reads a parameter file, or a checkpoint's parameters (given its `.json`): the layout, and
/// the values laid out flat.
pub fn read(path: &Path) -> Result<(ParamLayout, Vec<f32>), CheckpointError> {
    if path.extension().is_some_and(|e| e == "json") {
        return read_checkpoint(path);
    }
    let bytes = std::fs::read(path).map_err(io(path))?;
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| corrupt(path, e.to_string()))?;
    let info = meta.metadata().clone().unwrap_or_default();
    if info.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(corrupt(
            path,
            format!(
                "not a quorum parameter file (metadata format {:?}, expected {FORMAT:?}); write one with \
                 `quorum.torch.save_params(module, path)`, or give a checkpoint's .json",
                info.get("format")
            ),
        ));
    }
    let order: Vec<String> = info
        .get("order")
        .and_then(|o| serde_json::from_str(o).ok())
        .ok_or_else(|| corrupt(path, "its metadata has no readable tensor `order`"))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(path, e.to_string()))?;
    let mut shapes = Vec::with_capacity(order.len());
    for name in &order {
        let view = st.tensor(name).map_err(|e| corrupt(path, format!("tensor `{name}`: {e}")))?;
        shapes.push((name.clone(), view.shape().to_vec()));
    }
    let layout = ParamLayout::from_shapes(shapes).map_err(|e| corrupt(path, e.to_string()))?;
    let values = values(path, &st, &layout, "")?;
    Ok((layout, values))
}

fn read_checkpoint(json: &Path) -> Result<(ParamLayout, Vec<f32>), CheckpointError> {
    let text = std::fs::read(json).map_err(io(json))?;
    let meta: CheckpointMeta = serde_json::from_slice(&text).map_err(|e| corrupt(json, e.to_string()))?;
    let layout = ParamLayout::from_shapes(meta.layout.clone()).map_err(|e| corrupt(json, e.to_string()))?;
    let tpath = json.with_file_name(&meta.tensors);
    let bytes = std::fs::read(&tpath).map_err(io(&tpath))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| corrupt(&tpath, e.to_string()))?;
    let values = values(&tpath, &st, &layout, "params/")?;
    Ok((layout, values))
}

/// The tensors of `layout` (named with `prefix`), all present, and finite.
fn values(path: &Path, st: &SafeTensors, layout: &ParamLayout, prefix: &str) -> Result<Vec<f32>, CheckpointError> {
    let flat = read_flat(path, st, layout, prefix)?
        .ok_or_else(|| corrupt(path, format!("it holds no tensor `{prefix}{}`", layout.tensors()[0].name)))?;
    if flat.iter().any(|v| !v.is_finite()) {
        return Err(corrupt(path, "the parameters hold NaN or Inf"));
    }
    Ok(flat)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> ParamLayout {
        // Not in name order: the file must keep this order, not safetensors' sorted one.
        ParamLayout::from_shapes([("z.weight", vec![2, 3]), ("a.bias", vec![2])]).unwrap()
    }

    #[test]
    fn a_parameter_file_reads_back_in_the_order_it_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("init.safetensors");
        let values: Vec<f32> = (0..8).map(|i| i as f32 * 0.25).collect();
        write(&path, &layout(), &values).unwrap();
        let (l, v) = read(&path).unwrap();
        assert_eq!(l, layout());
        assert_eq!(v, values);
    }

    #[test]
    fn a_checkpoint_reads_as_a_parameter_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = quorum_core::ServerConfig::new(2, quorum_core::Policy::Async { max_staleness: None }, 0.1);
        let snap = quorum_core::ServerSnapshot {
            step: 7,
            params: (0..8).map(|i| i as f32).collect(),
            ema: None,
            optimizer_slots: vec![],
            optimizer_updates: 7,
            aggregate: 1,
        };
        let json = crate::checkpoint::save(dir.path(), &snap, &layout(), &cfg, None, 1).unwrap();
        let (l, v) = read(&json).unwrap();
        assert_eq!((l, v), (layout(), snap.params));
    }

    #[test]
    fn a_safetensors_file_without_the_order_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("plain.safetensors");
        let b = crate::encoding::encode(&[1.0, 2.0]);
        let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![2], &b).unwrap();
        std::fs::write(&path, safetensors::serialize(vec![("w", view)], None).unwrap()).unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("not a quorum parameter file") && e.contains("save_params"), "{e}");
    }

    #[test]
    fn a_missing_file_is_named_and_its_cause_said_once() {
        let e = read(Path::new("/nonexistent/init.safetensors")).unwrap_err();
        // What a program prints for the error with its causes (as `anyhow`'s `{:#}` does).
        let mut said = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            said += &format!(": {c}");
            cause = c.source();
        }
        assert!(said.contains("/nonexistent/init.safetensors"), "{said}");
        assert_eq!(said.matches("No such file").count(), 1, "{said}");
    }
}
