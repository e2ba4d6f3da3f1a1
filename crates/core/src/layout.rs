//! Parameter layout: named tensors with shapes over one flat `f32` buffer.
//!
//! The order of the tensors is the order they were added and never changes, so a flat
//! buffer means the same thing on the server, on every worker and in every checkpoint.

use crate::error::ConfigError;
use serde::{Deserialize, Serialize};

/// One named tensor inside the flat buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// A stable name, e.g. `layer0.weight`.
    pub name: String,
    /// The tensor's shape; the product is its length.
    pub shape: Vec<usize>,
    /// Where it starts in the flat buffer.
    pub offset: usize,
}

impl TensorSpec {
    /// Number of `f32` values.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True for a tensor with a zero-sized dimension.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The index range of this tensor in the flat buffer.
    pub fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.len()
    }
}

/// An ordered list of tensors laid end to end in one flat buffer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamLayout {
    tensors: Vec<TensorSpec>,
    total: usize,
}

impl ParamLayout {
    /// An empty layout (used by timing-only simulations, which move no numbers).
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a tensor; names must be unique.
    pub fn push(&mut self, name: impl Into<String>, shape: Vec<usize>) -> Result<(), ConfigError> {
        let name = name.into();
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(ConfigError::invalid(format!("duplicate tensor name `{name}` in parameter layout")));
        }
        let spec = TensorSpec { name, shape, offset: self.total };
        self.total += spec.len();
        self.tensors.push(spec);
        Ok(())
    }

    /// Builds a layout from `(name, shape)` pairs in order.
    pub fn from_shapes<I, S>(shapes: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (S, Vec<usize>)>,
        S: Into<String>,
    {
        let mut layout = Self::new();
        for (name, shape) in shapes {
            layout.push(name, shape)?;
        }
        Ok(layout)
    }

    /// Total number of `f32` parameters.
    pub fn len(&self) -> usize {
        self.total
    }

    /// True when the layout holds no parameters.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// The tensors in their stable order.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// Looks a tensor up by name.
    pub fn get(&self, name: &str) -> Option<&TensorSpec> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// `(name, shape)` of every tensor in order: what two processes compare to agree that a
    /// flat buffer means the same thing to both (quorum moves `f32` only, so no dtype).
    pub fn fingerprint(&self) -> Vec<(String, Vec<usize>)> {
        self.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect()
    }

    /// What differs between this layout (`ours`) and `theirs`, said in words, or `None` when
    /// they are the same: the first tensor that differs by name or shape, or the tensors
    /// one side has and the other lacks.
    pub fn difference(&self, theirs: &[(String, Vec<usize>)]) -> Option<String> {
        let ours = self.fingerprint();
        if ours.as_slice() == theirs {
            return None;
        }
        let show = |(n, s): &(String, Vec<usize>)| format!("`{n}` {s:?}");
        if let Some(i) = ours.iter().zip(theirs).position(|(a, b)| a != b) {
            let (a, b) = (&ours[i], &theirs[i]);
            let what = if a.0 == b.0 { "shape" } else { "name" };
            let hint = if a.1.len() == 2 && a.1 != b.1 && a.1.iter().rev().eq(b.1.iter()) {
                " (the same matrix transposed: burn stores a linear layer's weight as [in, out], \
                 PyTorch as [out, in])"
            } else {
                ""
            };
            return Some(format!(
                "tensor {i} differs by {what}: {} here, {} there{hint} ({} tensors / {} values here, {} / {} there)",
                show(a),
                show(b),
                ours.len(),
                self.len(),
                theirs.len(),
                theirs.iter().map(|(_, s)| s.iter().product::<usize>()).sum::<usize>()
            ));
        }
        let (longer, side) = if ours.len() > theirs.len() { (&ours, "here") } else { (&theirs.to_vec(), "there") };
        let extra: Vec<String> = longer[ours.len().min(theirs.len())..].iter().map(show).collect();
        Some(format!("{} more tensor(s) {side}: {}", extra.len(), extra.join(", ")))
    }

    /// The slice of `flat` holding tensor `name`.
    pub fn slice<'a>(&self, flat: &'a [f32], name: &str) -> Option<&'a [f32]> {
        self.get(name).and_then(|t| flat.get(t.range()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_are_laid_end_to_end_in_insertion_order() {
        let l = ParamLayout::from_shapes([("w", vec![2, 3]), ("b", vec![3])]).unwrap();
        assert_eq!(l.len(), 9);
        assert_eq!(l.get("w").unwrap().range(), 0..6);
        assert_eq!(l.get("b").unwrap().range(), 6..9);
        let flat: Vec<f32> = (0..9).map(|x| x as f32).collect();
        assert_eq!(l.slice(&flat, "b").unwrap(), &[6.0, 7.0, 8.0]);
    }

    fn shapes(l: &[(&str, Vec<usize>)]) -> Vec<(String, Vec<usize>)> {
        l.iter().map(|(n, s)| (n.to_string(), s.clone())).collect()
    }

    #[test]
    fn the_same_layout_has_no_difference() {
        let l = ParamLayout::from_shapes([("w", vec![2, 3]), ("b", vec![3])]).unwrap();
        assert_eq!(l.difference(&l.fingerprint()), None);
    }

    #[test]
    fn a_difference_names_the_first_tensor_that_differs_and_how() {
        let l = ParamLayout::from_shapes([("w", vec![2, 3]), ("b", vec![3])]).unwrap();
        let d = l.difference(&shapes(&[("w", vec![2, 3]), ("bias", vec![3])])).unwrap();
        assert!(d.contains("tensor 1 differs by name: `b` [3] here, `bias` [3] there"), "{d}");
        let d = l.difference(&shapes(&[("w", vec![2, 4]), ("b", vec![3])])).unwrap();
        assert!(d.contains("tensor 0 differs by shape: `w` [2, 3] here, `w` [2, 4] there"), "{d}");
        assert!(!d.contains("transposed"), "{d}");
    }

    #[test]
    fn a_transposed_matrix_is_called_out_as_burn_against_pytorch_orientation() {
        let l = ParamLayout::from_shapes([("fc.weight", vec![784, 512])]).unwrap();
        let d = l.difference(&shapes(&[("fc.weight", vec![512, 784])])).unwrap();
        assert!(d.contains("transposed") && d.contains("[out, in]"), "{d}");
    }

    #[test]
    fn quorums_mlp_against_a_pytorch_mlp_is_called_out_as_transposed() {
        let l = ParamLayout::from_shapes([("layer0.weight", vec![784, 512])]).unwrap();
        let d = l.difference(&shapes(&[("1.weight", vec![512, 784])])).unwrap();
        assert!(d.contains("differs by name") && d.contains("transposed"), "{d}");
    }

    #[test]
    fn missing_and_extra_tensors_are_listed() {
        let l = ParamLayout::from_shapes([("w", vec![2, 3])]).unwrap();
        let d = l.difference(&shapes(&[("w", vec![2, 3]), ("b", vec![3])])).unwrap();
        assert!(d.contains("1 more tensor(s) there: `b` [3]"), "{d}");
        let d = ParamLayout::from_shapes([("w", vec![2, 3]), ("b", vec![3])])
            .unwrap()
            .difference(&shapes(&[("w", vec![2, 3])]))
            .unwrap();
        assert!(d.contains("1 more tensor(s) here: `b` [3]"), "{d}");
    }

    #[test]
    fn duplicate_tensor_names_are_rejected() {
        let err = ParamLayout::from_shapes([("w", vec![2]), ("w", vec![3])]).unwrap_err();
        assert!(err.to_string().contains("duplicate tensor name `w`"));
    }
}
