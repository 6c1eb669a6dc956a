//! `wafer graph`: build a model's dataflow graph and print its summary, DOT, or full text.

use clap::{Args, ValueEnum};

use super::{emit, WorkloadFlags};
use waferscale::graph::{self, print_dot, print_graph};
use waferscale::model;
use waferscale::report::GraphSummary;
use waferscale::Error;

/// Pipeline stages whose printer `--dump-after` can show.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Stage {
    Graph,
}

#[derive(Args)]
pub struct GraphCmd {
    /// A shipped model name (gpt2-small, llama-3-8b, gpt-tiny), a config.json path,
    /// or a single op: gemm:MxNxK, gemv:KxN, allreduce:BYTES, elementwise:N.
    pub model: String,
    #[command(flatten)]
    pub workload: WorkloadFlags,
    /// Print the summary as one JSON object.
    #[arg(long, conflicts_with_all = ["dot", "dump_after"])]
    pub json: bool,
    /// Print the graph in Graphviz DOT instead of the summary.
    #[arg(long, conflicts_with = "dump_after")]
    pub dot: bool,
    /// Print a stage's full text form (the printer the snapshots use).
    #[arg(long, value_enum)]
    pub dump_after: Option<Stage>,
    /// Write the output to FILE instead of standard output.
    #[arg(short = 'o', long, value_name = "FILE")]
    pub output: Option<String>,
}

pub fn run(cmd: GraphCmd) -> Result<(), Error> {
    let model = model::load(&cmd.model)?;
    let workload = cmd.workload.args()?.resolve(&model)?;
    let g = graph::build(&model, &workload)?;
    let text = if cmd.json {
        let summary = GraphSummary::new(&model, &g);
        let mut s = serde_json::to_string_pretty(&summary)
            .map_err(|e| Error::Graph(graph::GraphError::Internal(format!("cannot serialise the summary: {e}"))))?;
        s.push('\n');
        s
    } else if cmd.dot {
        print_dot(&g)
    } else if let Some(Stage::Graph) = cmd.dump_after {
        print_graph(&g)
    } else {
        GraphSummary::new(&model, &g).to_text()
    };
    emit(&text, cmd.output.as_deref())
}
