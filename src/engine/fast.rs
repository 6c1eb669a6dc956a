//! Fast fidelity: the same engine on an aggregated program. Runs of a repeated task are merged into
//! one run where nothing can interleave between them and the timing cannot change except by the
//! per-run task picks: the task streams (its inputs are paced fabric operands, its outputs streamed),
//! so one long paced run moves the same wavelets at the same rates as the chain of short ones.
//!
//! A template is aggregated only when every repeated task in it repeats the same number of times R,
//! every one of them is streaming, and every `Done` dependency on them from a once-run task waits for
//! a multiple of R runs. Otherwise the template is left as it is (detailed).

use crate::mesh::{MeshProgram, Need, Task, Template};

/// What aggregation did, for the report's notes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Aggregation {
    /// Templates whose repeated runs were merged, and the task runs removed.
    pub templates_merged: u64,
    pub runs_removed_per_pe: u64,
}

/// Whether a task's runs can merge: every received color paces the work (or nothing is received),
/// and every send is streamed.
fn streaming(task: &Task) -> bool {
    task.needs.iter().all(|n| match *n {
        Need::Recv { color, wavelets } => wavelets == 0 || task.work.paced_by == Some(color),
        Need::Done { .. } => true,
    }) && task.sends.iter().all(|s| s.streamed || s.wavelets == 0)
}

fn merge(t: &Template, is_port: bool) -> Option<Template> {
    let repeated: Vec<usize> = (0..t.tasks.len()).filter(|&k| t.tasks[k].repeat > 1).collect();
    let r = t.tasks.get(*repeated.first()?)?.repeat;
    // Port tasks compute nothing: their sends leave when the run starts either way.
    if repeated.iter().any(|&k| t.tasks[k].repeat != r || (!is_port && !streaming(&t.tasks[k]))) {
        return None;
    }
    let mut out = t.clone();
    for (k, task) in out.tasks.iter_mut().enumerate() {
        let merged = repeated.contains(&k);
        for need in task.needs.iter_mut() {
            match need {
                Need::Recv { wavelets, .. } if merged => *wavelets *= r as u64,
                Need::Done { task: u, times } if !merged && repeated.contains(&(u.0 as usize)) => {
                    if *times % r != 0 {
                        return None;
                    }
                    *times /= r;
                }
                Need::Done { task: u, .. } if merged && !repeated.contains(&(u.0 as usize)) => {
                    // A merged run would wait for a once-run task's runs in bulk; keep it detailed.
                    return None;
                }
                _ => {}
            }
        }
        if merged {
            task.repeat = 1;
            task.work.elems *= r as u64;
            task.flops *= r as u64;
            for s in task.sends.iter_mut() {
                s.wavelets *= r as u64;
            }
        }
    }
    Some(out)
}

/// The aggregated program and what was merged.
pub fn aggregate(program: &MeshProgram) -> (MeshProgram, Aggregation) {
    let mut out = program.clone();
    let mut agg = Aggregation::default();
    let port_templates: Vec<u32> = program.ports.iter().map(|p| p.template.0).collect();
    for (i, t) in program.templates.iter().enumerate() {
        if let Some(m) = merge(t, port_templates.contains(&(i as u32))) {
            let before: u64 = t.tasks.iter().map(|k| k.repeat as u64).sum();
            let after: u64 = m.tasks.iter().map(|k| k.repeat as u64).sum();
            agg.templates_merged += 1;
            agg.runs_removed_per_pe += before - after;
            out.templates[i] = m;
        }
    }
    (out, agg)
}
