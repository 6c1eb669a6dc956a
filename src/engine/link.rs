//! Link timelines: when each directional link (mesh hop, ramp, IO port) is busy, and how much of its
//! bandwidth each train holds.
//!
//! A train of n wavelets at pace p (cycles per wavelet, a fraction >= the link's own) holds a link for
//! ceil(n * p) cycles at a rate of 1/p of its bandwidth. A new train takes the earliest start at or
//! after its head's arrival where its rate fits under the capacity for its whole duration (gap
//! filling), so flows sharing a link share its bandwidth and contention emerges.

use smallvec::SmallVec;

/// Capacity units of a link that carries one wavelet per cycle. lcm(1..=16): paces of up to 16 cycles
/// per wavelet are exact.
pub const UNIT: u64 = 720_720;

/// Cycles per wavelet as an exact fraction `num / den`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pace {
    pub num: u64,
    pub den: u64,
}

impl Pace {
    /// One wavelet per cycle: a link at full speed.
    pub const FULL: Pace = Pace { num: 1, den: 1 };

    pub fn new(num: u64, den: u64) -> Pace {
        debug_assert!(num > 0 && den > 0);
        Pace { num, den }
    }

    /// The slower of two paces.
    pub fn max(self, o: Pace) -> Pace {
        if (self.num as u128) * (o.den as u128) >= (o.num as u128) * (self.den as u128) {
            self
        } else {
            o
        }
    }

    /// Cycles `n` wavelets take at this pace.
    pub fn cycles(self, n: u64) -> u64 {
        ((n as u128 * self.num as u128).div_ceil(self.den as u128)) as u64
    }

    /// Offset of wavelet `j` (0-based) from the first.
    pub fn offset(self, j: u64) -> u64 {
        ((j as u128 * self.num as u128) / self.den as u128) as u64
    }

    /// Capacity units a train at this pace holds (rounded up, so capacity is never exceeded).
    pub fn units(self) -> u64 {
        ((UNIT as u128 * self.den as u128).div_ceil(self.num as u128)) as u64
    }
}

#[derive(Clone, Copy, Debug)]
struct Interval {
    start: u64,
    end: u64,
    units: u64,
}

/// The reservations of one link. Intervals are kept sorted by start; those that ended before the
/// simulation's present are dropped.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    /// Most links hold at most a couple of reservations at a time: keep them inline.
    iv: SmallVec<[Interval; 2]>,
    /// Latest end of any interval held.
    max_end: u64,
}

impl Timeline {
    /// Reserves `len` cycles at `units` of a link of capacity `cap` units per cycle, starting at the
    /// earliest cycle >= `t` where it fits. `now` is the simulation's present (nothing can start earlier).
    /// Returns the start.
    pub fn reserve(&mut self, t: u64, len: u64, units: u64, cap: u64, now: u64) -> u64 {
        if !self.iv.is_empty() && self.iv[0].end <= now {
            self.iv.retain(|i| i.end > now);
        }
        let units = units.min(cap);
        let len = len.max(1);
        // Most links are idle when a train arrives: skip the search.
        let start = if self.max_end <= t { t } else { self.earliest(t, len, units, cap) };
        self.max_end = self.max_end.max(start + len);
        let pos = self.iv.partition_point(|i| i.start <= start);
        self.iv.insert(pos, Interval { start, end: start + len, units });
        start
    }

    fn earliest(&self, t: u64, len: u64, units: u64, cap: u64) -> u64 {
        // Candidates: t itself, then ends of intervals (load only drops at ends).
        let mut cand = t;
        loop {
            match self.blocking_end(cand, len, units, cap) {
                None => return cand,
                Some(next) => cand = next.max(cand + 1),
            }
        }
    }

    /// If a train over [s, s+len) would exceed capacity, the earliest end of an interval overlapping
    /// the overload (the next candidate start); None when it fits.
    fn blocking_end(&self, s: u64, len: u64, units: u64, cap: u64) -> Option<u64> {
        let e = s + len;
        // Load changes only at interval starts; check it at s and at each start inside (s, e).
        let starts =
            std::iter::once(s).chain(self.iv.iter().map(|i| i.start).take_while(|&st| st < e).filter(|&st| st > s));
        for p in starts {
            let mut load = units;
            let mut first_end = u64::MAX;
            for i in self.iv.iter().take_while(|i| i.start <= p) {
                if i.end > p {
                    load += i.units;
                    first_end = first_end.min(i.end);
                }
            }
            if load > cap {
                return Some(first_end);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_rate_trains_serialise() {
        let mut l = Timeline::default();
        assert_eq!(l.reserve(0, 10, UNIT, UNIT, 0), 0);
        assert_eq!(l.reserve(0, 10, UNIT, UNIT, 0), 10);
        // A short train fits in no gap before 20.
        assert_eq!(l.reserve(5, 3, UNIT, UNIT, 0), 20);
    }

    #[test]
    fn gap_filling_uses_earlier_holes() {
        let mut l = Timeline::default();
        assert_eq!(l.reserve(100, 50, UNIT, UNIT, 0), 100);
        assert_eq!(l.reserve(0, 20, UNIT, UNIT, 0), 0);
        assert_eq!(l.reserve(90, 20, UNIT, UNIT, 0), 150);
    }

    #[test]
    fn paced_trains_share_a_link() {
        let half = Pace::new(2, 1).units();
        let mut l = Timeline::default();
        assert_eq!(l.reserve(0, 20, half, UNIT, 0), 0);
        assert_eq!(l.reserve(0, 20, half, UNIT, 0), 0);
        assert_eq!(l.reserve(0, 20, half, UNIT, 0), 20);
    }

    #[test]
    fn pace_arithmetic() {
        let p = Pace::new(10, 4);
        assert_eq!(p.cycles(4), 10);
        assert_eq!(p.offset(3), 7);
        assert_eq!(Pace::FULL.max(p), p);
        assert_eq!(Pace::FULL.units(), UNIT);
    }
}
