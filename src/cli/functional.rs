//! `wafer run --functional`: the same emulation with values in the PEs, checked against the reference.

use std::sync::Arc;

use super::run::{programs_of, Emulated, FunctionalFlags, Prepared};
use waferscale::engine::{self, EngineOptions, Fidelity};
use waferscale::functional::mesh::{self as fmesh, MeshOutput};
use waferscale::functional::{self, weights::write_f32, FunctionalError, Options, Precision};
use waferscale::model::DType;
use waferscale::Error;

/// The results of a functional run beside the reference.
pub struct Checked {
    pub outputs: Vec<MeshOutput>,
    pub dtype: DType,
}

impl Checked {
    fn worst(&self) -> f64 {
        self.outputs.iter().map(|o| o.max_rel_error).fold(0.0, f64::max)
    }

    /// One line: the largest relative error over the results.
    pub fn line(&self) -> String {
        let names: Vec<&str> = self.outputs.iter().map(|o| o.name.as_str()).collect();
        format!(
            "functional: max relative error vs the reference {:.3e} ({}; {} storage, fp32 arithmetic; values and timing from one detailed run)",
            self.worst(),
            names.join(", "),
            self.dtype.name()
        )
    }

    /// The check as a report section.
    pub fn text(&self) -> String {
        let mut s = String::from("\nfunctional (values computed by the emulated PEs, checked against the reference)\n");
        for o in &self.outputs {
            s.push_str(&format!("  {:<28} {:?}  max relative error {:.3e}\n", o.name, o.shape, o.max_rel_error));
        }
        s.push_str(&format!("  {}\n", self.line()));
        s
    }
}

/// Runs the reference for the feeds and the comparison, then the engine with values.
pub fn emulate(
    cmd: &FunctionalFlags,
    p: &Prepared,
    fidelity: Fidelity,
    threads: usize,
    trace: Option<&waferscale::trace::TraceOptions>,
) -> Result<(Emulated, Checked), Error> {
    let workload = &p.graph.workload;
    if workload.sparsity > 0.0 && cmd.weights.is_none() {
        return Err(FunctionalError::Input(
            "--sparsity: functional runs make dense seeded weights; give a checkpoint with --weights".into(),
        )
        .into());
    }
    let precision = match workload.dtype {
        DType::Fp32 => Precision::Exact,
        DType::Fp16 | DType::Bf16 => Precision::Storage,
        DType::Fp8 => {
            return Err(FunctionalError::Unsupported("fp8 storage (use --dtype fp32, fp16 or bf16)".into()).into())
        }
    };
    let programs = programs_of(p)?;
    if programs.len() != 1 {
        return Err(FunctionalError::Unsupported(format!(
            "a step run as {} phases (weight-streaming training)",
            programs.len()
        ))
        .into());
    }
    // Refuse what the program cannot do before the reference runs.
    if let Some(data) = programs[0].1.data.as_ref().filter(|d| !d.unsupported.is_empty()) {
        return Err(FunctionalError::Unsupported(
            data.unsupported.iter().take(4).cloned().collect::<Vec<_>>().join("; "),
        )
        .into());
    }
    let given = super::reference::given_tokens(cmd.tokens.as_deref(), cmd.input.as_deref())?;
    let (tokens, source) = super::reference::inputs(given, &p.model, workload, cmd.weights.as_ref(), cmd.seed);
    let opts = Options { precision, ..Options::default() };
    let run = functional::run::<f32>(&p.model, workload, &source, &tokens, &opts)?;
    if run.graph.tensors.len() != p.graph.tensors.len() {
        return Err(FunctionalError::Internal("the reference built a different graph than the compile".into()).into());
    }
    let (_, prog) = &programs[0];
    let numerics = functional::numerics_of(&p.model)?;
    let setup = fmesh::setup(prog, &run.graph, &numerics, &run.values)?;
    let spec = trace.map(|t| waferscale::trace::spec_for(prog, t));
    let eopts = EngineOptions { fidelity, threads, trace: spec, progress: None };
    let (erun, results) = engine::run_functional(prog, &eopts, Arc::new(setup))?;
    let outputs = fmesh::outputs(prog, &run.graph, &results, &run.values)?;
    if let Some(path) = &cmd.out {
        // Under the names transformers gives them (`logits`, `last_hidden_state`), as `wafer reference` writes.
        let names = run.primary_outputs();
        let tensors: Vec<(String, Vec<u64>, Vec<f32>)> = outputs
            .iter()
            .map(|o| {
                let name =
                    names.iter().find(|(_, t)| *t == o.tensor).map_or_else(|| o.name.clone(), |(n, _)| n.clone());
                (name, o.shape.clone(), o.values.clone())
            })
            .collect();
        write_f32(path, &tensors)?;
    }
    // Values run the whole program (functional runs are pipelined, which fast fidelity runs whole anyway).
    let notes =
        (fidelity == Fidelity::Fast).then(|| engine::fast::whole_note(engine::fast::ONLY_LOOPS)).into_iter().collect();
    Ok((Emulated { programs, runs: vec![erun], notes }, Checked { outputs, dtype: workload.dtype }))
}
