//! `wafer compare`: two systems side by side on identical work.

use std::fmt::Write as _;

use serde::Serialize;

use super::fmt::{duration, human, percent};
use super::RunReport;

/// The systems' reports and how they relate.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Comparison {
    pub model: String,
    /// The first is the wafer, the second the GPU system.
    pub systems: Vec<RunReport>,
    /// How many times faster the first system runs the step than the second.
    pub speedup: f64,
    pub notes: Vec<String>,
}

/// A row of the comparison table: its label and how to print one system's value.
type RowFn = Box<dyn Fn(&RunReport) -> String>;

impl Comparison {
    pub fn new(wafer: RunReport, gpu: RunReport, notes: Vec<String>) -> Comparison {
        let speedup = if wafer.seconds > 0.0 { gpu.seconds / wafer.seconds } else { 0.0 };
        Comparison { model: wafer.model.clone(), systems: vec![wafer, gpu], speedup, notes }
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let w = &self.systems[0].workload;
        let _ = writeln!(
            s,
            "{}: {} batch {} x seq {} ({} tokens), {}, identical graph on both\n",
            self.model, w.phase, w.batch, w.seq, w.tokens, w.dtype
        );
        let rows: Vec<(&str, RowFn)> = vec![
            ("system", Box::new(|r: &RunReport| format!("{} ({})", r.machine.name, r.machine.kind))),
            (
                "units",
                Box::new(|r: &RunReport| {
                    if r.machine.kind == "wafer" {
                        format!("{} PEs x {}", r.machine.units, r.machine.devices)
                    } else {
                        format!("{} GPUs", r.machine.devices)
                    }
                }),
            ),
            ("peak (dense)", Box::new(|r: &RunReport| human(r.machine.peak_flops_per_s, "FLOP/s"))),
            ("mode", Box::new(|r: &RunReport| format!("{} ({})", r.mode, r.fidelity))),
            ("step time", Box::new(|r: &RunReport| duration(r.seconds))),
            ("tokens/s", Box::new(|r: &RunReport| format!("{:.1}", r.tokens_per_s))),
            ("flops executed", Box::new(|r: &RunReport| human(r.flops as f64, "FLOP"))),
            ("achieved", Box::new(|r: &RunReport| human(r.achieved_flops_per_s, "FLOP/s"))),
            ("of peak", Box::new(|r: &RunReport| percent(r.peak_fraction))),
            ("util compute", Box::new(|r: &RunReport| percent(r.utilization.compute))),
            ("util on-chip net", Box::new(|r: &RunReport| percent(r.utilization.fabric))),
            ("util off-chip io", Box::new(|r: &RunReport| percent(r.utilization.io))),
            ("memory used", Box::new(|r: &RunReport| percent(r.utilization.memory))),
            ("bottleneck", Box::new(|r: &RunReport| r.bottleneck.dominant.clone())),
        ];
        for (name, f) in &rows {
            let _ = writeln!(s, "  {name:<18}{:>30}{:>30}", f(&self.systems[0]), f(&self.systems[1]));
        }
        let faster = if self.speedup >= 1.0 {
            format!(
                "{} is {:.2}x faster than {}",
                self.systems[0].machine.name, self.speedup, self.systems[1].machine.name
            )
        } else if self.speedup > 0.0 {
            format!(
                "{} is {:.2}x faster than {}",
                self.systems[1].machine.name,
                1.0 / self.speedup,
                self.systems[0].machine.name
            )
        } else {
            "no comparison (zero time)".to_string()
        };
        let _ = writeln!(s, "\n{faster} on this step");
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }
}
