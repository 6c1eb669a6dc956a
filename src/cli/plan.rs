//! `wafer plan`: load a saved plan (recompiling it from the inputs it stores) and print it.

use clap::Args;

use super::compile::{map_cols, parse_dump};
use super::emit;
use waferscale::compile::{Dump, PlanFile};
use waferscale::Error;

#[derive(Args)]
pub struct PlanCmd {
    /// A plan file written by `wafer compile ... -o PLAN`.
    pub plan: String,
    /// Print the plan summary as one JSON object.
    #[arg(long, conflicts_with = "dump_after")]
    pub json: bool,
    /// Print a compile stage: place, route, alloc or lower.
    #[arg(long, value_parser = parse_dump)]
    pub dump_after: Option<Dump>,
}

pub fn run(cmd: PlanCmd) -> Result<(), Error> {
    let file = PlanFile::read(&cmd.plan)?;
    let (_, _, c) = file.recompile(&cmd.plan, cfg!(debug_assertions))?;
    let text = if cmd.json {
        super::to_json(&c.plan)?
    } else if let Some(d) = cmd.dump_after {
        d.print(&c.plan, &c.programs)
    } else {
        c.plan.to_text(map_cols())
    };
    emit(&text, None)
}
