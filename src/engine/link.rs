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

/// The reservations of one link as a step function of the capacity held: breakpoints (cycle, change
/// in units) in cycle order, and the load before the first of them. Breakpoints at or before the
/// simulation's present are folded into that base load, so a link only keeps its future.
#[derive(Clone, Debug, Default)]
pub struct Timeline {
    /// Most links hold at most a couple of reservations at a time: keep them inline.
    steps: SmallVec<[(u64, i64); 2]>,
    /// Units held just before the first breakpoint.
    base: u64,
}

/// Asks the CPU to bring `x` into the cache (a hint: no effect on any result).
#[inline(always)]
pub(crate) fn prefetch<T>(x: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing architecturally and cannot fault, whatever the address.
    unsafe {
        std::arch::x86_64::_mm_prefetch(x as *const i8, std::arch::x86_64::_MM_HINT_T0);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

impl Timeline {
    /// Fetches the breakpoints of a timeline that keeps them on the heap (more than two).
    #[inline(always)]
    pub(crate) fn prefetch_steps(&self) {
        if self.steps.spilled() {
            prefetch(self.steps.as_ptr());
        }
    }

    /// Reserves `len` cycles at `units` of a link of capacity `cap` units per cycle, starting at the
    /// earliest cycle >= `t` where it fits. `now` is the simulation's present (nothing can start earlier).
    /// Returns the start.
    pub fn reserve(&mut self, t: u64, len: u64, units: u64, cap: u64, now: u64) -> u64 {
        // Fold the past into the base load.
        let steps = self.steps.as_slice();
        if steps.first().is_some_and(|s| s.0 <= now) {
            let past = steps.iter().take_while(|s| s.0 <= now).count();
            let delta: i64 = steps[..past].iter().map(|s| s.1).sum();
            self.base = (self.base as i64 + delta).max(0) as u64;
            self.steps.drain(..past);
        }
        let units = units.min(cap);
        let len = len.max(1);
        if self.steps.is_empty() && self.base + units <= cap {
            // An idle link (the common case): the train starts when its head arrives.
            self.steps.push((t, units as i64));
            self.steps.push((t + len, -(units as i64)));
            return t;
        }
        let start = self.earliest(t, len, cap - units);
        self.add(start, units as i64);
        self.add(start + len, -(units as i64));
        start
    }

    /// The earliest s >= t such that the load stays at or below `limit` over [s, s + len): one sweep.
    fn earliest(&self, t: u64, len: u64, limit: u64) -> u64 {
        let mut load = self.base as i64;
        let mut i = 0;
        // The load at t.
        while i < self.steps.len() && self.steps[i].0 <= t {
            load += self.steps[i].1;
            i += 1;
        }
        let mut s = t;
        loop {
            let seg_end = self.steps.get(i).map_or(u64::MAX, |st| st.0);
            if load > limit as i64 {
                // This segment is full: the window can start at its end at the earliest.
                s = seg_end;
            } else if s.saturating_add(len) <= seg_end {
                return s;
            }
            if i == self.steps.len() {
                // Past the last breakpoint every reservation has ended.
                return s;
            }
            load += self.steps[i].1;
            i += 1;
        }
    }

    #[inline(always)]
    fn add(&mut self, at: u64, delta: i64) {
        let pos = self.steps.partition_point(|s| s.0 < at);
        match self.steps.get_mut(pos) {
            Some(s) if s.0 == at => {
                s.1 += delta;
                if s.1 == 0 {
                    self.steps.remove(pos);
                }
            }
            _ => self.steps.insert(pos, (at, delta)),
        }
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
