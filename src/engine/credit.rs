//! Finite router queues and credit backpressure: how far a train may run ahead of the task that
//! consumes it, and how a stalled sender learns when it may go on.
//!
//! The model (MACHINE-MODEL.md, "Router"): every router has, per color, an input queue of
//! `queue_depth` wavelets, and the receiving PE's ramp has one more; a wavelet advances only into a
//! queue with room. A consumer that has not started its task takes nothing, so the wavelets of a
//! train addressed to it fill the queues of the train's own path, and then the sender stalls. The
//! wavelets a path buffers for receiver d, `path_buffer`, are `queue_depth` per router it enters
//! (the sender's router and one per hop) plus the PE's input queue, plus what the PE itself takes
//! before its consumer claims: one run of the consumer, the receive FIFO its program declares for the
//! color (`mesh::Fifo`), or the SRAM its plan left free, whichever is larger.
//! - A declared FIFO: a join's early input (a residual add's skip) waits in the SRAM the tiling
//!   allocated for it, `runs` runs of the consumer (the PE keeps its share of each multicast run).
//!   gpt3-175b's adds keep the skip for a whole layer (8 runs of 1,572,864 multicast wavelets);
//!   without the FIFO the skip filled the fabric back to the norm's gateway, which starved the
//!   attention the add was waiting for (a deadlock).
//! - One run: the engine keeps trains whole, so a paced consumer starts only once its run's trains
//!   are all sent (the machine would start on the first wavelet and consume the rest as they come),
//!   and an asynchronous receive takes a whole run into the buffer the plan allocated.
//! - Free SRAM as a receive FIFO: an approximation kept from before the compiler declared FIFOs
//!   (every shipped tiny model deadlocked on its residual skip streams without it). Now that the
//!   joins declare theirs, dropping it would make the engine count only what the plan allocated;
//!   not yet done: neox-tiny's weight-streaming prefill still deadlocks without it (BENCHMARKS.md,
//!   "Residual FIFOs"), and it would move cycles wherever a stream runs ahead into free SRAM today.
//!
//! The engine keeps trains as units: a train still reserves its links when it is sent, and its
//! wavelets are delivered with their scheduled arrival cycles. What backpressure adds is the
//! sender's side: at delivery (in the receiver's partition) the engine checks whether the train's
//! tail fits into what the receiver has claimed plus the path's buffer. If it does not, the
//! receiver records a *hold* and tells the sender (a `Credit::Hold`, handed over like a
//! continuation when the sender lives in another partition). When the receiver's consumer claims
//! enough wavelets that the tail fits, the hold is released with the cycle the tail can leave the
//! sender: the claim's start plus the stalled wavelets at the train's pace (`Credit::Release`).
//! A task whose run sends on a color with a hold does not finish until it is released (its
//! streamed send, or the end-of-run send it blocks in, cannot drain), so neither a task's next
//! run nor an IO port's next train can run ahead of a consumer by more than the buffering allows.
//! The wait is counted as the sender's stall and the released path carries the consumer's claim
//! (the critical path goes through whatever made the consumer late). An IO port's streams are
//! independent (per-color queues at its edge router): a held color holds back only the port's tasks
//! that send on it, while its other streams go on.
//!
//! Approximations, stated so they can be refined: several senders feeding one PE on one color are
//! each credited their own path's queues (their paths share the last routers, so the machine has a
//! little less room); a stalled train's link reservations stay where they were made (stalled
//! wavelets occupy their color's queues, not the link's bandwidth, so other colors pass); a held
//! train's wavelets keep their scheduled arrival cycles at the receiver, except that a paced run
//! drains them at the train's pace from its start; a hold that reaches the sender after the run that
//! sent it has finished (a remote receiver, a small train) delays the sender's next run that sends on
//! the color instead. Trains a PE sends to itself, trains into IO ports (the host, SwarmX and peer
//! wafers take what arrives) and the links between wafers are not held.

use super::link::Pace;
use super::{Path, Res};
use crate::mesh::ColorId;

/// Wavelets a train's path buffers ahead of a consumer that has not claimed them (see the module
/// docs): `queue_depth` per router entered (`hops + 1`), the PE's input queue, and what the PE takes
/// into SRAM (`receive_buffer`).
pub(crate) fn path_buffer(queue_depth: u32, hops: u32, receive_buffer: u64) -> u64 {
    queue_depth as u64 * (hops as u64 + 2) + receive_buffer
}

/// A train whose tail did not fit: kept by the receiver until its consumer has claimed up to
/// `threshold` wavelets of the color. The train's wavelets, pace and tail resource are kept once per
/// partition with its arrivals (`info`, a slot of the receiver's partition), not once per hold: a
/// weight-streaming run holds millions of trains at once.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PendingHold {
    /// Claimed wavelets at which the train's tail has room.
    pub threshold: u64,
    /// Global id of the sender.
    pub sender: u32,
    pub info: u32,
}

impl PendingHold {
    /// The release of this hold on a train of `n` wavelets at `pace` whose serialisation is charged to
    /// `tail_res`, when a claim moves the receiver's claimed count from `before` to `after` at cycle
    /// `at` on critical path `path`: the cycle the train's tail can leave its sender, and the path to
    /// it. None while the tail still has no room.
    pub fn release(
        &self,
        (n, pace, tail_res): (u64, Pace, Res),
        before: u64,
        after: u64,
        at: u64,
        path: Path,
    ) -> Option<(u64, Path)> {
        if after < self.threshold {
            return None;
        }
        // The train's wavelets still stalled just before this claim leave one per pace after it.
        let stalled = n.min(self.threshold.saturating_sub(before));
        let cycles = pace.cycles(stalled);
        Some((at + cycles, path.add(tail_res, cycles)))
    }
}

/// What a receiver tells a sender about one of its trains on `color`.
#[derive(Clone, Copy, Debug)]
pub(crate) enum CreditKind {
    /// The train's tail does not fit: the sender's sends on the color are stalled.
    Hold { receiver: u32 },
    /// The tail fits from cycle `tail` on; the path is the one to that cycle.
    Release { tail: u64, path: Path },
}

/// A credit message to global agent `agent`, taking effect at cycle `time`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Credit {
    pub time: u64,
    pub agent: u32,
    pub color: ColorId,
    pub kind: CreditKind,
}

/// A sender's stalled color: holds not yet released, the latest release and its path, and the last
/// receiver that held it (for deadlock reports).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SenderHold {
    pub count: i32,
    pub release_at: u64,
    pub release_path: Path,
    pub receiver: u32,
}

impl SenderHold {
    pub fn apply(&mut self, kind: CreditKind) {
        match kind {
            CreditKind::Hold { receiver } => {
                self.count += 1;
                self.receiver = receiver;
            }
            CreditKind::Release { tail, path } => {
                self.count -= 1;
                if tail >= self.release_at {
                    self.release_at = tail;
                    self.release_path = path;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_counts_every_router_and_the_ramp() {
        // 3 hops: the sender's router and 3 more, 4 each, plus the PE's queue.
        assert_eq!(path_buffer(4, 3, 0), 20);
        assert_eq!(path_buffer(4, 0, 100), 108);
    }

    #[test]
    fn release_waits_for_the_threshold() {
        let h = PendingHold { threshold: 90, sender: 0, info: 0 };
        let train = (100, Pace::FULL, Res::Fabric);
        assert!(h.release(train, 0, 89, 50, Path::default()).is_none());
        // A claim from 0 to 100 at cycle 50: the 90 stalled wavelets leave by cycle 140.
        assert_eq!(h.release(train, 0, 100, 50, Path::default()).map(|r| r.0), Some(140));
    }
}
