//! `wafer run --functional`: the same emulation with values in the PEs, checked against the reference.

use std::sync::Arc;

use super::run::{programs_of, Emulated, FunctionalFlags, Prepared};
use waferscale::compile;
use waferscale::engine::{self, EngineOptions, Fidelity};
use waferscale::functional::decode::{self, DecodeStep, Start};
use waferscale::functional::mesh::{self as fmesh, MeshOutput};
use waferscale::functional::{self, weights::write_f32, FunctionalError, Options, Precision, Tokens};
use waferscale::model::{DType, Model, Phase, WorkloadArgs};
use waferscale::Error;

/// The results of a functional run beside the reference.
pub struct Checked {
    /// Every result (of every step, with --decode-steps).
    pub outputs: Vec<MeshOutput>,
    pub dtype: DType,
    /// --decode-steps: the context's prefill on the wafer (cycles, its results in `outputs`).
    pub context: Option<(u64, std::ops::Range<usize>)>,
    /// --decode-steps: each step's position, cycles and logits against the reference's prefill.
    pub steps: Vec<StepCheck>,
    /// Notes for the timing report.
    pub notes: Vec<String>,
    /// MoE layers' token copies dropped over an expert's capacity, by top-k op (the reference's routing,
    /// which the wafer's must equal to match).
    pub moe_dropped: Vec<(String, usize)>,
    /// Where the wafer's MoE routing differs from the reference's (`functional::mesh::routing_divergence`),
    /// which the verdict names.
    pub routing: Option<String>,
}

/// One decode step of --decode-steps.
pub struct StepCheck {
    pub context: u64,
    pub cycles: u64,
    pub vs_prefill: f64,
    /// The step's results, as indices into `Checked::outputs`.
    pub outputs: std::ops::Range<usize>,
}

/// `--decode-steps` applies to a functional decode of a transformer compiled here (not a plan file,
/// which fixes its context).
pub fn check_decode_steps(func: &FunctionalFlags, args: &WorkloadArgs) -> Result<(), Error> {
    match func.decode_steps {
        Some(n) if args.phase != Some(Phase::Decode) => {
            Err(FunctionalError::Input(format!("--decode-steps {n}: decoding several tokens needs --phase decode"))
                .into())
        }
        _ => Ok(()),
    }
}

/// With `--decode-steps N`, the given sequences hold the context and all N new tokens: the first
/// step's tokens are the context and the first new one.
pub fn first_step_tokens(func: &FunctionalFlags, given: Tokens) -> Result<Tokens, Error> {
    match func.decode_steps {
        Some(n) if given.len() as u64 <= n => Err(FunctionalError::Input(format!(
            "--decode-steps {n}: the given sequences have {} tokens; decoding {n} needs at least {} (a context and the {n} new ones)",
            given.len(),
            n + 1
        ))
        .into()),
        Some(n) => Ok(given.prefix(given.len() - n as usize + 1)),
        None => Ok(given),
    }
}

impl Checked {
    fn worst(&self) -> f64 {
        self.outputs.iter().map(|o| o.max_rel_error).fold(0.0, f64::max)
    }

    /// One line: the largest relative error over the results.
    pub fn line(&self) -> String {
        let mut names: Vec<&str> = Vec::new();
        for o in &self.outputs {
            if !names.contains(&o.name.as_str()) {
                names.push(&o.name);
            }
        }
        // A training step has a result per weight and moment: named in the section above, counted here.
        let what = if names.len() > 8 { format!("{} results", names.len()) } else { names.join(", ") };
        let held: usize = self.outputs.iter().map(|o| o.held).sum();
        let held = match held {
            0 => String::new(),
            n => format!(
                "; {n} elements whose reference gradient is below the noise floor held to the bounds of rounding noise"
            ),
        };
        format!(
            "functional: max relative error vs the reference {:.3e} ({what}; {} storage, fp32 arithmetic; values and timing from one detailed run{}{held}){}",
            self.worst(),
            self.dtype.name(),
            if self.steps.is_empty() { "" } else { " per step" },
            self.bound_line()
        )
    }

    /// A training step's results have bounds from the rounding model (`functional::mesh::training_bound`):
    /// whether every one is within its own, and the bounds' range.
    fn bound_line(&self) -> String {
        let bounds: Vec<f64> = self.outputs.iter().filter_map(|o| o.bound).collect();
        let (lo, hi) =
            (bounds.iter().copied().fold(f64::INFINITY, f64::min), bounds.iter().copied().fold(0.0, f64::max));
        let over = self.outputs.iter().filter(|o| !o.within_bound()).count();
        match (bounds.len(), over) {
            (0, _) => String::new(),
            (_, 0) => format!("; every result within its bound from the rounding model ({lo:.1e} to {hi:.1e})"),
            (_, n) => format!("; {n} results OUTSIDE their bounds from the rounding model ({lo:.1e} to {hi:.1e})"),
        }
    }

    /// Fails (a bug: exit 1) when a result is outside the bound the rounding model states for it,
    /// naming the worst.
    pub fn verdict(&self) -> Result<(), Error> {
        let worst = self.outputs.iter().filter(|o| !o.within_bound()).max_by(|a, b| {
            (a.max_rel_error / a.bound.unwrap_or(1.0)).total_cmp(&(b.max_rel_error / b.bound.unwrap_or(1.0)))
        });
        match worst {
            None => Ok(()),
            Some(o) => Err(FunctionalError::Mesh(format!(
                "`{}` is off the reference by {:.3e}, outside the bound {:.3e} the rounding model states for it ({} storage){}",
                o.name,
                o.max_rel_error,
                o.bound.unwrap_or(0.0),
                self.dtype.name(),
                self.routing.as_ref().map_or(String::new(), |r| format!(
                    "; the wafer's MoE routing differs from the reference's by more than a near-tie of router \
                     logits (which the reference would follow): {r}; no result downstream of it can match"
                ))
            ))
            .into()),
        }
    }

    /// The check as a report section.
    pub fn text(&self) -> String {
        let mut s = String::from("\nfunctional (values computed by the emulated PEs, checked against the reference)\n");
        let row = |o: &MeshOutput, indent: &str| {
            let held = match o.held {
                0 => String::new(),
                n => format!(" ({n} elements with a gradient below the noise floor held to noise bounds)"),
            };
            let bound = match o.bound {
                Some(b) if o.max_rel_error <= b => format!(" (bound {b:.1e})"),
                Some(b) => format!(" OUTSIDE the bound {b:.1e}"),
                None => String::new(),
            };
            format!("{indent}{:<28} {:?}  max relative error {:.3e}{bound}{held}\n", o.name, o.shape, o.max_rel_error)
        };
        if self.steps.is_empty() {
            for o in &self.outputs {
                s.push_str(&row(o, "  "));
            }
        }
        if let (Some((cycles, range)), Some(first)) = (&self.context, self.steps.first()) {
            s.push_str(&format!(
                "  prefill of the context (positions 0..={}), {} cycles: the KV cache step 1 starts from\n",
                first.context.saturating_sub(1),
                waferscale::report::fmt::thousands(*cycles)
            ));
            for o in &self.outputs[range.clone()] {
                s.push_str(&row(o, "    "));
            }
        }
        for (i, st) in self.steps.iter().enumerate() {
            s.push_str(&format!(
                "  step {}: the token at position {}, {} cycles; logits vs the reference prefill of positions 0..={}: max relative error {:.3e}\n",
                i + 1,
                st.context,
                waferscale::report::fmt::thousands(st.cycles),
                st.context,
                st.vs_prefill
            ));
            for o in &self.outputs[st.outputs.clone()] {
                s.push_str(&row(o, "    "));
            }
        }
        if !self.moe_dropped.is_empty() {
            let per: Vec<String> = self.moe_dropped.iter().map(|(op, n)| format!("{op} {n}")).collect();
            s.push_str(&format!(
                "  MoE token copies dropped over an expert's capacity (on the wafer as in the reference): {}\n",
                per.join(", ")
            ));
        }
        s.push_str(&format!("  {}\n", self.line()));
        if let Some(l) = self.steps_line() {
            s.push_str(&format!("  {l}\n"));
        }
        s
    }

    /// --decode-steps: one line, the largest error of a step's logits against the reference's prefill.
    pub fn steps_line(&self) -> Option<String> {
        let (first, last) = (self.steps.first()?, self.steps.last()?);
        let worst = self.steps.iter().map(|s| s.vs_prefill).fold(0.0, f64::max);
        Some(format!(
            "functional: decode of {} tokens vs the reference prefill of the sequence: max relative error {worst:.3e} (logits at positions {}..={}; each step from the KV cache the wafer left, the first from the wafer's prefill of the context)",
            self.steps.len(),
            first.context,
            last.context
        ))
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
    let phased = programs.len() > 1;
    if phased && (p.compiled.layout != compile::Layout::Phases || workload.phase != Phase::Train) {
        return Err(
            FunctionalError::Unsupported(format!("a step run as {} programs side by side", programs.len())).into()
        );
    }
    // Refuse what the programs cannot do before the reference runs.
    if let Some(why) = programs.iter().find_map(|(_, prog)| prog.data.as_ref().and_then(|d| d.refusal())) {
        return Err(FunctionalError::Unsupported(why).into());
    }
    let given = super::reference::given_tokens(cmd.tokens.as_deref(), cmd.input.as_deref())?;
    let opts = Options { precision, ..Options::default() };
    if let Some(steps) = cmd.decode_steps {
        let eopts = EngineOptions {
            fidelity,
            threads,
            trace: trace.map(|t| waferscale::trace::spec_for(&programs[0].1, t)),
            progress: None,
        };
        return decode_steps(cmd, p, given, steps, &opts, &eopts, programs);
    }
    let (tokens, source) = super::reference::inputs(given, &p.model, workload, cmd.weights.as_ref(), cmd.seed);
    let run = functional::run::<f32>(&p.model, workload, &source, &tokens, &opts)?;
    if run.graph.tensors.len() != p.graph.tensors.len() {
        return Err(FunctionalError::Internal("the reference built a different graph than the compile".into()).into());
    }
    let numerics = functional::numerics_of(&p.model)?;
    if phased {
        // Weight-streaming training: the forward and backward phases in turn, MemoryX between and after.
        let eopts: Vec<EngineOptions> = programs
            .iter()
            .map(|(_, prog)| EngineOptions {
                fidelity,
                threads,
                trace: trace.map(|t| waferscale::trace::spec_for(prog, t)),
                progress: None,
            })
            .collect();
        let done = fmesh::run_phases(&programs, &run.graph, &numerics, &run.values, &eopts)?;
        let mut outputs = done.outputs;
        // (No note on the timing: the report stays the one without values; `run_phases` says what ran where.)
        let mut notes = Vec::new();
        let (run, routing) = follow_routing(p, &source, &tokens, &opts, run, &mut outputs, &mut notes)?;
        if let Some(path) = &cmd.out {
            write_training(path, p, &run, &outputs)?;
        }
        let moe_dropped = run.values.moe_dropped.clone();
        let checked =
            Checked { routing, outputs, dtype: workload.dtype, context: None, steps: Vec::new(), notes, moe_dropped };
        return Ok((Emulated { programs, runs: done.runs, notes: fast_notes(p, fidelity) }, checked));
    }
    let (_, prog) = &programs[0];
    let setup = fmesh::setup(prog, &run.graph, &numerics, &run.values)?;
    let spec = trace.map(|t| waferscale::trace::spec_for(prog, t));
    let eopts = EngineOptions { fidelity, threads, trace: spec, progress: None };
    let (erun, results) = engine::run_functional(prog, &eopts, Arc::new(setup))?;
    let mut outputs = fmesh::outputs(prog, &run.graph, &results, &run.values)?;
    let mut notes = Vec::new();
    let (run, routing) = follow_routing(p, &source, &tokens, &opts, run, &mut outputs, &mut notes)?;
    if let (Some(path), Phase::Train) = (&cmd.out, workload.phase) {
        write_training(path, p, &run, &outputs)?;
    } else if let Some(path) = &cmd.out {
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
    let moe_dropped = run.values.moe_dropped.clone();
    let checked =
        Checked { outputs, dtype: workload.dtype, context: None, steps: Vec::new(), notes, moe_dropped, routing };
    Ok((Emulated { programs, runs: vec![erun], notes: fast_notes(p, fidelity) }, checked))
}

/// Where the wafer's read-back MoE top-k settled a near-tie of router logits otherwise than the
/// reference (`fmesh::follow_routing`), runs the reference again following the wafer's routing for
/// those tokens and judges `outputs` against it (a note says how many); returns the reference the
/// results are judged against and, where the wafer routed a token otherwise by more than a near-tie,
/// the first such token.
fn follow_routing(
    p: &Prepared,
    source: &functional::WeightSource,
    tokens: &Tokens,
    opts: &Options,
    run: functional::Run<f32>,
    outputs: &mut [MeshOutput],
    notes: &mut Vec<String>,
) -> Result<(functional::Run<f32>, Option<String>), Error> {
    match fmesh::follow_routing(&run.graph, outputs, &run.values) {
        Ok(forced) if !forced.is_empty() => {
            let n: usize = forced.values().map(|m| m.len()).sum();
            let opts = Options { forced_routing: forced, ..opts.clone() };
            let followed = functional::run::<f32>(&p.model, &p.graph.workload, source, tokens, &opts)?;
            fmesh::rejudge(&followed.graph, outputs, &followed.values);
            notes.push(format!(
                "MoE routing: the wafer settled {n} near-tie(s) of router logits otherwise than the reference \
                 (each within the rounding bound of its logits); the reference followed the wafer's routing there"
            ));
            let routing = fmesh::routing_divergence(&followed.graph, outputs, &followed.values);
            Ok((followed, routing))
        }
        Ok(_) => Ok((run, None)),
        Err(first) => Ok((run, Some(first))),
    }
}

/// --out of a training step: the weights the wafer's Adam regions updated, as a checkpoint (their
/// Hugging Face names, in the family's on-disk layout, so `--weights` reads them back for the next
/// step), and the loss the wafer computed (`loss`, as `wafer reference --out` names it).
fn write_training(
    path: &std::path::Path,
    p: &Prepared,
    run: &functional::Run<f32>,
    outputs: &[MeshOutput],
) -> Result<(), Error> {
    let g = &run.graph;
    let mut updated = functional::weights::Weights::<f32> { tensors: Default::default(), source: "the wafer".into() };
    for op in g.op_ids().map(|o| g.op(o)) {
        if let waferscale::graph::OpKind::Adam { .. } = op.kind {
            let w = g.tensor(op.inputs[0]);
            let o = outputs
                .iter()
                .find(|o| Some(&o.tensor) == op.outputs.first())
                .ok_or_else(|| FunctionalError::Internal(format!("the wafer's run left no updated `{}`", w.name)))?;
            updated.tensors.insert(w.name.clone(), (w.shape.clone(), o.values.clone()));
        }
    }
    let family = match &p.model {
        Model::Transformer(s) => Some(s.family),
        Model::Op(_) => None,
    };
    let mut tensors = updated.on_disk(g, family);
    for (name, t) in run.primary_outputs() {
        if let Some(o) = outputs.iter().find(|o| o.tensor == t) {
            tensors.push((name, o.shape.clone(), o.values.clone()));
        }
    }
    write_f32(path, &tensors)?;
    Ok(())
}

/// Values run the whole program: a weight-streaming loop fast fidelity would cut runs every layer
/// (values need them all); anything else fast fidelity runs whole anyway.
fn fast_notes(p: &Prepared, fidelity: Fidelity) -> Vec<String> {
    let layers = super::run::loop_layers(p);
    let why = engine::fast::not_aggregated(layers).unwrap_or_else(|| {
        format!("a functional run computes the values of all {} layers of the loop", layers.unwrap_or(0))
    });
    (fidelity == Fidelity::Fast).then(|| engine::fast::whole_note(&why)).into_iter().collect()
}

/// `--decode-steps N`: the context's prefill and N decode steps on the mesh, each step from the cache
/// the previous program left, each compiled for its own context. The emulation returned (the timing
/// report's) is the first decode step's.
fn decode_steps(
    cmd: &FunctionalFlags,
    p: &Prepared,
    given: Option<Tokens>,
    steps: u64,
    opts: &Options,
    eopts: &EngineOptions,
    programs: Vec<(String, waferscale::mesh::MeshProgram)>,
) -> Result<(Emulated, Checked), Error> {
    let first = &p.graph.workload;
    let flag = format!("--decode-steps {steps}");
    let Some(copts) = p.options.as_ref() else {
        return Err(FunctionalError::Input(format!(
            "{flag}: a plan file fixes its context; give the model instead (each step compiles for its own context)"
        ))
        .into());
    };
    if let Model::Transformer(spec) = &p.model {
        let need = first.context + steps;
        if need > spec.max_positions {
            return Err(FunctionalError::Input(format!(
                "{flag}: a context of {} and {steps} new tokens need {need} positions; {} has {}",
                first.context, spec.name, spec.max_positions
            ))
            .into());
        }
    }
    // The whole sequences: the given ones, or seeded ones of context + steps tokens (for one sequence
    // the same first tokens as a one-step run's).
    let tokens = match given {
        Some(t) => t,
        None => {
            let last = waferscale::model::Workload { context: first.context + steps - 1, ..first.clone() };
            super::reference::inputs(None, &p.model, &last, None, cmd.seed).0
        }
    };
    let source = super::reference::inputs(None, &p.model, first, cmd.weights.as_ref(), cmd.seed).1;
    let mut step0 = Some(programs[0].1.clone());
    let done = decode::decode_on_mesh(&p.model, first, &source, &tokens, steps, Start::Mesh, opts, eopts, |w| {
        // The first decode step's program is compiled already (the one the timing report describes).
        if w == first {
            if let Some(prog) = step0.take() {
                return Ok((p.graph.clone(), prog));
            }
        }
        let (g, c) = compile::compile_model(&p.model, w, &p.hw, copts)?;
        let prog = c.step_programs()?.into_iter().next().map(|(_, prog)| prog).ok_or_else(|| {
            FunctionalError::Internal(format!("the compile for context {} gave no program", w.context))
        })?;
        Ok((g, prog))
    })?;
    if let Some(path) = &cmd.out {
        write_logits(path, &done.steps, first.batch, steps)?;
    }
    let mut outputs = Vec::new();
    let context = done.context.map(|c| {
        outputs.extend(c.outputs);
        (c.run.cycles, 0..outputs.len())
    });
    let mut checks = Vec::new();
    let mut runs = Vec::new();
    for st in done.steps {
        let at = outputs.len();
        outputs.extend(st.outputs);
        checks.push(StepCheck {
            context: st.context,
            cycles: st.run.cycles,
            vs_prefill: st.vs_prefill,
            outputs: at..outputs.len(),
        });
        runs.push(st.run);
    }
    let notes = vec![format!(
        "{flag}: this is the timing of the first decode step (context {}); the context's prefill and each later step ran their own programs (cycles in the functional check)",
        first.context
    )];
    runs.truncate(1);
    let checked =
        Checked { outputs, dtype: first.dtype, context, steps: checks, notes, moe_dropped: Vec::new(), routing: None };
    Ok((Emulated { programs, runs, notes: fast_notes(p, eopts.fidelity) }, checked))
}

/// --out with --decode-steps: the wafer's logits of every step as `logits`, `[batch, steps, vocab]`
/// (as transformers' logits of the sequence at those positions).
fn write_logits(path: &std::path::Path, done: &[DecodeStep], batch: u64, steps: u64) -> Result<(), Error> {
    let vocab = done.first().map_or(0, |s| s.logits.len() as u64 / batch.max(1));
    let mut all = vec![0f32; (batch * steps * vocab) as usize];
    for (s, st) in done.iter().enumerate() {
        for b in 0..batch as usize {
            let row = &st.logits[b * vocab as usize..(b + 1) * vocab as usize];
            let at = (b * steps as usize + s) * vocab as usize;
            all[at..at + vocab as usize].copy_from_slice(row);
        }
    }
    write_f32(path, &[("logits".to_string(), vec![batch, steps, vocab], all)])?;
    Ok(())
}
