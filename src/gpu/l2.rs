//! The L2 cache: set-associative with LRU replacement, split into address-interleaved partitions,
//! simulated over the units a kernel touches in the order its CTAs touch them.
//!
//! A unit is a group of sectors (a slice of an operand tile, kilobytes rather than 32-byte sectors):
//! the kernels choose the unit so that a simulation stays within a fixed number of accesses, and
//! the cache keeps its capacity in bytes, so reuse distances in bytes are preserved.

/// 64-bit finaliser of SplitMix64: a fixed, well-mixed hash, so set and partition choices are
/// deterministic and spread evenly.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A key for one unit of data: (operand, batch, row block, column block), hashed to 64 bits.
pub fn unit_key(operand: u64, batch: u64, row: u64, col: u64) -> u64 {
    mix(mix(mix(mix(operand) ^ batch) ^ row) ^ col)
}

const EMPTY: u64 = u64::MAX;

pub struct L2Sim {
    partitions: usize,
    sets: usize,
    ways: usize,
    tags: Vec<u64>,
    stamps: Vec<u64>,
    clock: u64,
    pub hits: u64,
    pub misses: u64,
}

impl L2Sim {
    /// A cache of `capacity_bytes` in `partitions` halves (or more), `ways`-associative, holding
    /// units of `unit_bytes`. At least one set per partition.
    pub fn new(capacity_bytes: u64, partitions: u32, ways: u32, unit_bytes: u64) -> L2Sim {
        let partitions = partitions.max(1) as usize;
        let ways = ways.max(1) as usize;
        let units = (capacity_bytes / unit_bytes.max(1)) as usize;
        let sets = (units / (partitions * ways)).max(1);
        let n = partitions * sets * ways;
        L2Sim { partitions, sets, ways, tags: vec![EMPTY; n], stamps: vec![0; n], clock: 0, hits: 0, misses: 0 }
    }

    /// The partition a unit lives in (its home, by address interleaving).
    pub fn partition(&self, key: u64) -> usize {
        (key % self.partitions as u64) as usize
    }

    /// Touches a unit; true on a hit. A miss allocates it, evicting the set's least recently used unit.
    pub fn access(&mut self, key: u64) -> bool {
        let key = if key == EMPTY { EMPTY - 1 } else { key };
        self.clock += 1;
        let p = self.partition(key);
        let set = ((key / self.partitions as u64) % self.sets as u64) as usize;
        let base = (p * self.sets + set) * self.ways;
        let mut victim = base;
        let mut oldest = u64::MAX;
        for i in base..base + self.ways {
            if self.tags[i] == key {
                self.stamps[i] = self.clock;
                self.hits += 1;
                return true;
            }
            // Empty ways have stamp 0, so they are taken first.
            if self.stamps[i] < oldest {
                oldest = self.stamps[i];
                victim = i;
            }
        }
        self.tags[victim] = key;
        self.stamps[victim] = self.clock;
        self.misses += 1;
        false
    }

    pub fn partitions(&self) -> usize {
        self.partitions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuse_within_capacity_hits_and_beyond_capacity_misses() {
        // 64 units of 1 KiB, 2 partitions x 4 ways x 8 sets.
        let mut c = L2Sim::new(64 << 10, 2, 4, 1024);
        let keys: Vec<u64> = (0..32).map(|i| unit_key(1, 0, i, 0)).collect();
        for &k in &keys {
            assert!(!c.access(k));
        }
        let before = c.hits;
        for &k in &keys {
            c.access(k);
        }
        // Half the capacity, hashed over 16 sets of 4 ways: most stay (a few sets overflow).
        assert!(c.hits - before >= 24, "{}", c.hits - before);
        // A cyclic sweep over four times the capacity thrashes LRU.
        let mut c = L2Sim::new(64 << 10, 2, 4, 1024);
        let big: Vec<u64> = (0..256).map(|i| unit_key(2, 0, i, 0)).collect();
        for _ in 0..3 {
            for &k in &big {
                c.access(k);
            }
        }
        assert!(c.hits < 40, "{}", c.hits);
    }
}
