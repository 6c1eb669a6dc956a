//! Report types: the serde boundary of the crate. Everything a command prints as JSON is defined
//! here, with a text printer beside it; internal IR types are never serialized.

mod compare;
pub mod fmt;
mod gpu;
mod graph;
mod plan;
mod run;

pub use compare::Comparison;
pub use gpu::{GpuDetails, KernelRow, LevelBytes, MemoryFootprint};
pub use graph::{GraphSummary, KindRow, WorkloadSummary};
pub use plan::{phase_name, PlanPort, PlanRegion, PlanStream, PlanSummary, ProgramStats};
pub use run::{
    channel_utilization, io_utilization, Bottleneck, HostInfo, IoChannel, MachineSummary, OpRow, RunReport, Utilization,
};
