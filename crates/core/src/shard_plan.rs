//! Which parameter server holds which parameters: the flat buffer cut into one contiguous
//! range per shard.
//!
//! A cut falls between two tensors when such a boundary lies within a tenth of a fair share
//! of where an even split would cut; otherwise the tensor there is cut where the even
//! split would (so shard sizes differ from a fair share by at most a fifth). Every optimizer
//! quorum has works element by element, so a shard can update any range on its own, and a
//! worker sends each shard `&gradient[range]` without copying.

use crate::error::ConfigError;
use crate::layout::ParamLayout;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// The split of a model's parameters over `S` shards.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardPlan {
    ranges: Vec<Range<usize>>,
}

impl ShardPlan {
    /// Splits `layout` over `shards` servers.
    pub fn new(layout: &ParamLayout, shards: u32) -> Result<Self, ConfigError> {
        let total = layout.len();
        let s = shards as usize;
        if s == 0 {
            return Err(ConfigError::invalid("shards must be at least 1"));
        }
        if total < s {
            return Err(ConfigError::invalid(format!(
                "{shards} shards for a model of {total} parameters: every shard needs at least one; use at most {total} shards"
            )));
        }
        let bounds: Vec<usize> = layout.tensors().iter().map(|t| t.offset).chain([total]).collect();
        let slack = total / s / 10;
        let mut ranges = Vec::with_capacity(s);
        let mut start = 0;
        for k in 1..s {
            let ideal = total * k / s;
            let nearest = bounds.iter().copied().min_by_key(|&b| b.abs_diff(ideal)).unwrap_or(ideal);
            let cut = if nearest.abs_diff(ideal) <= slack { nearest } else { ideal };
            // Every shard keeps at least one value, and later shards room for theirs.
            let cut = cut.clamp(start + 1, total - (s - k));
            ranges.push(start..cut);
            start = cut;
        }
        ranges.push(start..total);
        Ok(ShardPlan { ranges })
    }

    /// The layout of shard `i`'s checkpoint: one tensor of its values, named for the shard,
    /// its range and the model (a hash of every tensor's name and shape), so a checkpoint of
    /// another shard, split or model is refused by name.
    pub fn layout_of(&self, layout: &ParamLayout, i: u32) -> ParamLayout {
        // FNV-1a: stable across builds and platforms (std's hasher promises neither).
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for (name, shape) in layout.fingerprint() {
            for b in name.bytes().chain(shape.iter().flat_map(|d| (*d as u64).to_le_bytes())) {
                hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        let r = self.range(i);
        let name = format!(
            "shard {i} of {}: values {}..{} of {}, model {hash:016x}",
            self.shards(),
            r.start,
            r.end,
            self.len()
        );
        ParamLayout::from_shapes([(name, vec![r.len()])]).expect("one tensor")
    }

    /// How many shards.
    pub fn shards(&self) -> u32 {
        self.ranges.len() as u32
    }

    /// The parameters shard `i` holds.
    pub fn range(&self, i: u32) -> Range<usize> {
        self.ranges[i as usize].clone()
    }

    /// Every shard's range, in shard order.
    pub fn ranges(&self) -> &[Range<usize>] {
        &self.ranges
    }

    /// Total parameters.
    pub fn len(&self) -> usize {
        self.ranges.last().map_or(0, |r| r.end)
    }

    /// True for a model with no parameters.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mlp() -> ParamLayout {
        ParamLayout::from_shapes([
            ("l0.w", vec![784, 512]),
            ("l0.b", vec![512]),
            ("l1.w", vec![512, 512]),
            ("l1.b", vec![512]),
            ("l2.w", vec![512, 10]),
            ("l2.b", vec![10]),
        ])
        .unwrap()
    }

    fn assert_covers(plan: &ShardPlan, total: usize) {
        assert_eq!(plan.ranges()[0].start, 0);
        assert_eq!(plan.len(), total);
        for w in plan.ranges().windows(2) {
            assert_eq!(w[0].end, w[1].start, "ranges must be contiguous: {plan:?}");
        }
        assert!(plan.ranges().iter().all(|r| !r.is_empty()), "{plan:?}");
    }

    #[test]
    fn ranges_cover_every_parameter_once_and_none_is_empty() {
        let l = mlp();
        for s in 1..=16 {
            assert_covers(&ShardPlan::new(&l, s).unwrap(), l.len());
        }
        let tiny = ParamLayout::from_shapes([("w", vec![3])]).unwrap();
        assert_covers(&ShardPlan::new(&tiny, 3).unwrap(), 3);
    }

    #[test]
    fn cuts_fall_between_tensors_when_that_stays_balanced() {
        let l =
            ParamLayout::from_shapes([("a", vec![100]), ("b", vec![95]), ("c", vec![5]), ("d", vec![100])]).unwrap();
        // S = 2: the even cut 150 lies 45 from the boundary at 195 and 50 from the one at
        // 100, both beyond the slack of 15, so the tensor `b` is cut in two.
        assert_eq!(ShardPlan::new(&l, 2).unwrap().ranges(), &[0..150, 150..300]);
        // S = 3: fair cuts at 100 and 200 are tensor boundaries.
        assert_eq!(ShardPlan::new(&l, 3).unwrap().ranges(), &[0..100, 100..200, 200..300]);
        // A boundary 5 from the even cut, inside the slack of 20: taken.
        let l = ParamLayout::from_shapes([("a", vec![195]), ("b", vec![205])]).unwrap();
        assert_eq!(ShardPlan::new(&l, 2).unwrap().ranges(), &[0..195, 195..400]);
    }

    #[test]
    fn shards_are_within_a_fifth_of_a_fair_share() {
        let l = mlp();
        for s in 2..=8u32 {
            let plan = ShardPlan::new(&l, s).unwrap();
            let fair = l.len() as f64 / f64::from(s);
            for r in plan.ranges() {
                let off = (r.len() as f64 - fair).abs() / fair;
                assert!(off <= 0.21, "S={s}: {r:?} is {off:.2} off a fair share of {fair}");
            }
        }
    }

    #[test]
    fn a_shards_checkpoint_layout_names_the_shard_the_split_and_the_model() {
        let l = mlp();
        let plan = ShardPlan::new(&l, 3).unwrap();
        let one = plan.layout_of(&l, 1);
        assert_eq!(one.len(), plan.range(1).len());
        let name = &one.tensors()[0].name;
        assert!(
            name.starts_with(&format!("shard 1 of 3: values {}..{}", plan.range(1).start, plan.range(1).end)),
            "{name}"
        );
        assert_ne!(one, plan.layout_of(&l, 2));
        assert_ne!(one, ShardPlan::new(&l, 4).unwrap().layout_of(&l, 1));
        let other =
            ParamLayout::from_shapes([("l0.w", vec![784, 512]), ("x", vec![512 + 512 * 512 + 512 + 5130])]).unwrap();
        assert_eq!(other.len(), l.len());
        assert_ne!(one, ShardPlan::new(&other, 3).unwrap().layout_of(&other, 1), "another model of the same size");
    }

    #[test]
    fn more_shards_than_parameters_is_refused_with_the_most_that_works() {
        let l = ParamLayout::from_shapes([("w", vec![3])]).unwrap();
        let e = ShardPlan::new(&l, 4).unwrap_err().to_string();
        assert!(e.contains("4 shards for a model of 3 parameters") && e.contains("at most 3"), "{e}");
        assert!(ShardPlan::new(&l, 0).is_err());
    }
}
