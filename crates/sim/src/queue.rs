//! The event heap: earliest time first, ties broken by insertion order, so a run never
//! depends on how the heap happens to order equal keys.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Duration;

struct Entry<T> {
    at: Duration,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl<T> Ord for Entry<T> {
    fn cmp(&self, o: &Self) -> Ordering {
        // BinaryHeap is a max-heap: reverse to pop the earliest first.
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

/// A min-heap of timed items ordered by (time, insertion sequence).
pub struct EventQueue<T> {
    heap: BinaryHeap<Entry<T>>,
    seq: u64,
}

impl<T> Default for EventQueue<T> {
    fn default() -> Self {
        EventQueue { heap: BinaryHeap::new(), seq: 0 }
    }
}

impl<T> EventQueue<T> {
    /// Schedules `item` at `at`.
    pub fn push(&mut self, at: Duration, item: T) {
        self.seq += 1;
        self.heap.push(Entry { at, seq: self.seq, item });
    }

    /// Removes the earliest item.
    pub fn pop(&mut self) -> Option<(Duration, T)> {
        self.heap.pop().map(|e| (e.at, e.item))
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.heap.len()
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
    }
}
