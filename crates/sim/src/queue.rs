//! The event heap: earliest time first, ties broken by insertion order, so a run never
//! depends on how the heap happens to order equal keys.
//!
//! The heap holds only small keys (time in nanoseconds, sequence, slot); the items live in
//! a slab beside it. Popping the heap is the simulator's hottest path, and moving 24-byte
//! keys instead of whole events makes it several times cheaper.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

/// A min-heap of timed items ordered by (time, insertion sequence).
pub struct EventQueue<T> {
    heap: BinaryHeap<Reverse<(u64, u64, u32)>>,
    slab: Vec<Option<T>>,
    free: Vec<u32>,
    seq: u64,
}

impl<T> Default for EventQueue<T> {
    fn default() -> Self {
        EventQueue { heap: BinaryHeap::new(), slab: Vec::new(), free: Vec::new(), seq: 0 }
    }
}

impl<T> EventQueue<T> {
    /// Schedules `item` at `at`.
    pub fn push(&mut self, at: Duration, item: T) {
        self.seq += 1;
        let slot = match self.free.pop() {
            Some(s) => {
                self.slab[s as usize] = Some(item);
                s
            }
            None => {
                self.slab.push(Some(item));
                (self.slab.len() - 1) as u32
            }
        };
        let nanos = u64::try_from(at.as_nanos()).unwrap_or(u64::MAX);
        self.heap.push(Reverse((nanos, self.seq, slot)));
    }

    /// Removes the earliest item.
    pub fn pop(&mut self) -> Option<(Duration, T)> {
        let Reverse((nanos, _, slot)) = self.heap.pop()?;
        let item = self.slab[slot as usize].take().expect("every heap key has its item");
        self.free.push(slot);
        Some((Duration::from_nanos(nanos), item))
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether every waiting item satisfies `pred` (O(items)).
    pub fn all(&self, pred: impl Fn(&T) -> bool) -> bool {
        self.slab.iter().flatten().all(pred)
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_by_time_then_insertion_order() {
        let mut q = EventQueue::default();
        q.push(Duration::from_secs(2), "c");
        q.push(Duration::from_secs(1), "a");
        q.push(Duration::from_secs(1), "b");
        let order: Vec<_> = std::iter::from_fn(|| q.pop().map(|(_, x)| x)).collect();
        assert_eq!(order, vec!["a", "b", "c"]);
        assert!(q.is_empty());
    }
}
