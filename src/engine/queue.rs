//! The event queue: a monotone radix heap. Events are never scheduled before the present, so a radix
//! heap pops the minimum in amortised constant time; events of the same cycle come out in the order
//! they were pushed (their sequence number), which makes the simulation deterministic.

use std::collections::VecDeque;

/// Events an emptied bucket may keep room for (at most 65 x 64 events of 24 bytes, 100 KB, per queue).
const KEEP_BUCKET: usize = 64;

pub(crate) struct RadixQueue<E> {
    /// The time of the last popped event; every queued event is at or after it.
    last: u64,
    /// Bucket 0: events at `last`, in push order. Bucket i > 0: events whose time differs from `last`
    /// first in bit i - 1 (counting from 0 at the least significant end).
    now: VecDeque<(u64, u64, E)>,
    buckets: Vec<Vec<(u64, u64, E)>>,
    len: usize,
    seq: u64,
    /// The minimum time outside `now`, when known.
    min_cache: Option<u64>,
}

impl<E> RadixQueue<E> {
    pub fn new() -> Self {
        RadixQueue {
            last: 0,
            now: VecDeque::new(),
            buckets: (0..65).map(|_| Vec::new()).collect(),
            len: 0,
            seq: 0,
            min_cache: None,
        }
    }

    fn bucket(&self, t: u64) -> usize {
        if t == self.last {
            0
        } else {
            64 - (t ^ self.last).leading_zeros() as usize
        }
    }

    /// Schedules `e` at `t` (>= the time of the last popped event).
    pub fn push(&mut self, t: u64, e: E) {
        debug_assert!(t >= self.last, "event scheduled in the past: {t} < {}", self.last);
        let t = t.max(self.last);
        self.seq += 1;
        self.len += 1;
        match self.bucket(t) {
            0 => self.now.push_back((t, self.seq, e)),
            b => {
                if let Some(m) = self.min_cache {
                    self.min_cache = Some(m.min(t));
                }
                self.buckets[b].push((t, self.seq, e))
            }
        }
    }

    /// The time of the next event, without removing it. It does not move the heap's base, so events
    /// may still be pushed at any time at or after the last popped one.
    pub fn peek_time(&mut self) -> Option<u64> {
        if let Some(e) = self.now.front() {
            return Some(e.0);
        }
        if self.min_cache.is_none() {
            let b = (1..65).find(|&b| !self.buckets[b].is_empty())?;
            self.min_cache = self.buckets[b].iter().map(|i| i.0).min();
        }
        self.min_cache
    }

    /// Moves the earliest non-empty bucket into `now` when `now` is empty.
    fn refill(&mut self) {
        if self.now.is_empty() {
            let Some(b) = (1..65).find(|&b| !self.buckets[b].is_empty()) else {
                return;
            };
            self.min_cache = None;
            let mut items = std::mem::take(&mut self.buckets[b]);
            self.last = items.iter().map(|i| i.0).min().unwrap_or(self.last);
            // The events at the new base go straight into `now` (empty here) and are put in push order
            // there; no vector is grown for them. Every other event goes to a bucket below b.
            for it in items.drain(..) {
                match self.bucket(it.0) {
                    0 => self.now.push_back(it),
                    nb => self.buckets[nb].push(it),
                }
            }
            // Bucket b keeps a small allocation (the regrowth of emptied buckets was 2.4% of a llama-3-8b
            // decode's instructions) but lets a large one go: kept, every bucket of every partition would
            // hold its largest size for the whole run (+90 MB on llama-3-8b decode over a full WSE-3).
            if items.capacity() <= KEEP_BUCKET {
                self.buckets[b] = items;
            }
            self.now.make_contiguous().sort_by_key(|i| i.1);
        }
    }

    /// The next event of the present cycle, if it is already known (no refill).
    pub fn peek_now(&self) -> Option<&E> {
        self.now.front().map(|e| &e.2)
    }

    pub fn pop(&mut self) -> Option<(u64, E)> {
        self.refill();
        let (t, _, e) = self.now.pop_front()?;
        self.len -= 1;
        Some((t, e))
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pops_in_time_then_push_order() {
        let mut q = RadixQueue::new();
        for (t, v) in [(5u64, 'a'), (3, 'b'), (5, 'c'), (100, 'd'), (3, 'e'), (64, 'f')] {
            q.push(t, v);
        }
        let mut out = Vec::new();
        while let Some((t, v)) = q.pop() {
            out.push((t, v));
            if v == 'b' {
                q.push(3, 'g');
                q.push(4, 'h');
            }
        }
        let order: String = out.iter().map(|x| x.1).collect();
        assert_eq!(order, "begh".to_string() + "acfd");
        assert_eq!(q.len(), 0);
    }
}
