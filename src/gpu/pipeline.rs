//! The pipeline-parallel schedule: 1F1B (one forward, one backward) over P stages and M
//! micro-batches, simulated op by op with its dependencies, so that fill and drain bubbles emerge
//! and unequal stages and transfer times are handled as they come.
//!
//! Stage s runs min(P - s - 1, M) warm-up forwards, then alternates one forward and one backward,
//! then drains its backwards. A forward waits for the previous stage's forward of the same
//! micro-batch (plus the transfer); a backward waits for the next stage's backward (plus the
//! transfer), and on the last stage for its own forward. Inference has forwards only.

/// The result of one schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    /// Time from the first forward to the last op of any stage.
    pub makespan: f64,
    /// When each stage finishes its last op.
    pub stage_end: Vec<f64>,
    /// Fraction of stage-time idle inside the makespan: 1 - sum(busy) / (P x makespan).
    pub bubble_fraction: f64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Step {
    F(u64),
    B(u64),
}

/// Micro-batches simulated op by op; beyond this the schedule is in its steady state, where every
/// further micro-batch adds one forward and one backward of the slowest stage to every stage's end.
const MAX_SIMULATED_MICROBATCHES: u64 = 1024;

/// Simulates 1F1B with per-stage forward and backward times of one micro-batch (backward empty or
/// all zero for inference) and the transfer time between neighbouring stages.
pub fn one_f_one_b(fwd: &[f64], bwd: &[f64], microbatches: u64, transfer: f64) -> Schedule {
    if microbatches > MAX_SIMULATED_MICROBATCHES {
        let base = one_f_one_b(fwd, bwd, MAX_SIMULATED_MICROBATCHES, transfer);
        let period = fwd.iter().zip(bwd.iter().chain(std::iter::repeat(&0.0))).map(|(f, b)| f + b).fold(0.0, f64::max);
        let extra = (microbatches - MAX_SIMULATED_MICROBATCHES) as f64 * period;
        let makespan = base.makespan + extra;
        let busy: f64 =
            fwd.iter().zip(bwd.iter().chain(std::iter::repeat(&0.0))).map(|(f, b)| (f + b) * microbatches as f64).sum();
        return Schedule {
            makespan,
            stage_end: base.stage_end.iter().map(|e| e + extra).collect(),
            bubble_fraction: if makespan > 0.0 { 1.0 - busy / (fwd.len() as f64 * makespan) } else { 0.0 },
        };
    }
    let p = fwd.len();
    let m = microbatches;
    let train = bwd.iter().any(|b| *b > 0.0);
    let orders: Vec<Vec<Step>> = (0..p)
        .map(|s| {
            if !train {
                return (0..m).map(Step::F).collect();
            }
            let warm = ((p - s - 1) as u64).min(m);
            let mut v: Vec<Step> = (0..warm).map(Step::F).collect();
            for i in 0..m - warm {
                v.push(Step::F(warm + i));
                v.push(Step::B(i));
            }
            for i in m - warm..m {
                v.push(Step::B(i));
            }
            v
        })
        .collect();
    let mut f_end = vec![vec![f64::NAN; m as usize]; p];
    let mut b_end = vec![vec![f64::NAN; m as usize]; p];
    let mut next = vec![0usize; p];
    let mut free = vec![0.0f64; p];
    let mut busy = vec![0.0f64; p];
    let total: usize = orders.iter().map(Vec::len).sum();
    let mut done = 0usize;
    while done < total {
        let mut progressed = false;
        for s in 0..p {
            while next[s] < orders[s].len() {
                let step = orders[s][next[s]];
                let ready = match step {
                    Step::F(_) if s == 0 => Some(0.0),
                    Step::F(i) => {
                        let e = f_end[s - 1][i as usize];
                        (!e.is_nan()).then_some(e + transfer)
                    }
                    Step::B(i) if s + 1 == p => {
                        let e = f_end[s][i as usize];
                        (!e.is_nan()).then_some(e)
                    }
                    Step::B(i) => {
                        let e = b_end[s + 1][i as usize];
                        (!e.is_nan()).then_some(e + transfer)
                    }
                };
                let Some(ready) = ready else { break };
                let start = ready.max(free[s]);
                let (dur, slot) = match step {
                    Step::F(i) => (fwd[s], &mut f_end[s][i as usize]),
                    Step::B(i) => (bwd[s], &mut b_end[s][i as usize]),
                };
                *slot = start + dur;
                free[s] = start + dur;
                busy[s] += dur;
                next[s] += 1;
                done += 1;
                progressed = true;
            }
        }
        if !progressed {
            // Cannot happen for 1F1B orders; stop rather than spin.
            break;
        }
    }
    let makespan = free.iter().copied().fold(0.0, f64::max);
    let busy_sum: f64 = busy.iter().sum();
    let bubble_fraction = if makespan > 0.0 { 1.0 - busy_sum / (p as f64 * makespan) } else { 0.0 };
    Schedule { makespan, stage_end: free, bubble_fraction }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_stages_bubble_is_p_minus_1_over_m_plus_p_minus_1() {
        for (p, m) in [(2u64, 1u64), (4, 8), (8, 8), (8, 32), (16, 3)] {
            let s = one_f_one_b(&vec![1.0; p as usize], &vec![2.0; p as usize], m, 0.0);
            let want = (p - 1) as f64 / (m + p - 1) as f64;
            assert!((s.bubble_fraction - want).abs() < 1e-12, "p={p} m={m}: {} vs {want}", s.bubble_fraction);
            assert!((s.makespan - 3.0 * (m + p - 1) as f64).abs() < 1e-9);
        }
    }

    #[test]
    fn long_schedules_extend_the_steady_state() {
        let (p, m) = (4u64, 5000u64);
        let s = one_f_one_b(&[1.0; 4], &[2.0; 4], m, 0.0);
        let want = (p - 1) as f64 / (m + p - 1) as f64;
        assert!((s.bubble_fraction - want).abs() < 1e-9, "{} vs {want}", s.bubble_fraction);
        assert!((s.makespan - 3.0 * (m + p - 1) as f64).abs() < 1e-6);
    }

    #[test]
    fn inference_is_fill_and_drain() {
        let s = one_f_one_b(&[1.0; 4], &[0.0; 4], 10, 0.5);
        assert!((s.makespan - (10.0 + 3.0 * 1.5)).abs() < 1e-9, "{}", s.makespan);
    }
}
