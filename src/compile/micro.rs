//! Micro-batching (gradient accumulation) for training: when a step's batch does not fit the wafer, the
//! step runs as `m` micro-batches of `batch / m` sequences through the same programs, one after the
//! other, the weight gradients summed off the wafer (in SwarmX / MemoryX under weight streaming) and the
//! optimizer applied once per step. This is how weight-streaming systems train at large batch: the
//! activations on the wafer are those of one micro-batch, while the weights stream once per micro-batch.
//!
//! The compile is that of one micro-batch's graph under weight streaming (pipelined training applies the
//! optimizer on the wafer every step, so it cannot accumulate); the plan reports the step (its FLOPs are the
//! micro-batch's times `m`, which equal the step graph's because every op on the wafer is linear in the
//! batch); the engine runs the micro-batch's programs and the report counts them `m` times.

use crate::graph::{self, Graph};
use crate::hw::WaferHw;
use crate::model::{Model, Phase, Workload};
use crate::Error;

use super::{compile, lower, CompileError, CompileOptions, Compiled, Mode};

/// Compiles one step of `model` under `workload`: the step's graph as one batch, or, for training whose
/// batch does not fit (an SRAM or mesh-size error) or when `opts.micro_batches` asks for it, the graph of
/// one micro-batch. Returns the step's graph (what the step computes, for summaries and references) and
/// the compile (`Compiled::micro_batches` says how many times its programs run per step).
pub fn compile_model(
    model: &Model,
    workload: &Workload,
    hw: &WaferHw,
    opts: &CompileOptions,
) -> Result<(Graph, Compiled), Error> {
    let g = graph::build(model, workload)?;
    if let Some(m) = opts.micro_batches {
        if m == 0 {
            return Err(bad("--micro-batches 0: at least one micro-batch".into()));
        }
        if m > 1 {
            if workload.phase != Phase::Train {
                return Err(bad(format!(
                    "--micro-batches {m}: micro-batches accumulate gradients, for --phase train only"
                )));
            }
            if opts.mode == Some(Mode::Pipelined) {
                return Err(bad(format!(
                    "--micro-batches {m} with --mode pipelined: pipelined training applies the optimizer on the \
                     wafer every step; micro-batches run under weight streaming, the gradients summed off the wafer"
                )));
            }
            if !workload.batch.is_multiple_of(m as u64) {
                return Err(bad(format!(
                    "--micro-batches {m} does not divide the batch of {} sequences into equal micro-batches",
                    workload.batch
                )));
            }
            let c = micro(model, workload, &g, hw, opts, m, format!("--micro-batches {m}"))?;
            return Ok((g, c));
        }
    }
    match compile(&g, hw, opts) {
        Ok(c) => Ok((g, c)),
        Err(e)
            if opts.micro_batches.is_none()
                && opts.mode != Some(Mode::Pipelined)
                && workload.phase == Phase::Train
                && workload.batch > 1
                && fits(&e) =>
        {
            // Try micro-batches from the smallest that the overflow suggests, up to one sequence each.
            let start = match &e {
                CompileError::Sram { needed, available, .. } if *available > 0 => needed.div_ceil(*available),
                _ => 2,
            }
            .max(2);
            let mut last = e;
            for m in (start..=workload.batch).filter(|m| workload.batch.is_multiple_of(*m)) {
                let Ok(m32) = u32::try_from(m) else { break };
                let why = format!(
                    "the batch of {} sequences does not fit the wafer at once ({})",
                    workload.batch,
                    short(&last)
                );
                match micro(model, workload, &g, hw, opts, m32, why) {
                    Ok(c) => return Ok((g, c)),
                    Err(Error::Compile(e2)) if fits(&e2) => last = e2,
                    Err(e2) => return Err(e2),
                }
            }
            Err(Error::Compile(last.rehint(
                crate::compile::lower::WS_HINT,
                "even micro-batches of one sequence do not fit: use a larger --mesh, a shorter sequence, or more \
                 SRAM per PE",
            )))
        }
        Err(e) => Err(e.into()),
    }
}

/// A failure that a smaller batch can cure: the data does not fit the PEs or the mesh.
fn fits(e: &CompileError) -> bool {
    matches!(e, CompileError::Sram { .. } | CompileError::MeshTooSmall { .. })
}

/// The first clause of an error, for a note.
fn short(e: &CompileError) -> String {
    let s = e.to_string();
    s.split(';').next().unwrap_or(&s).to_string()
}

fn bad(msg: String) -> Error {
    Error::Compile(CompileError::Unsupported(msg))
}

/// The compile of one micro-batch of `workload.batch / m` sequences, its plan describing the step.
fn micro(
    model: &Model,
    workload: &Workload,
    step: &Graph,
    hw: &WaferHw,
    opts: &CompileOptions,
    m: u32,
    why: String,
) -> Result<Compiled, Error> {
    let mw = Workload { batch: workload.batch / m as u64, ..workload.clone() };
    let g = graph::build(model, &mw)?;
    // Weight streaming: the optimizer runs off the wafer, once per step, on the summed gradients.
    let mut c = compile(&g, hw, &CompileOptions { mode: Some(Mode::WeightStreaming), ..opts.clone() })?;
    c.micro_batches = m;
    let p = &mut c.plan;
    p.micro_batches = m;
    p.workload = format!(
        "{}, in {m} micro-batches of {} x {} tokens (gradients accumulated off the wafer)",
        lower::workload_text(workload, false),
        mw.batch,
        mw.seq
    );
    let micro_wafer = p.wafer_flops;
    p.wafer_flops = micro_wafer * m as u64;
    let step_flops: u64 = step.op_ids().map(|o| step.op(o).cost.flops).sum();
    // Every op on the wafer is linear in the batch: the step's graph FLOPs are m micro-batches' wafer
    // FLOPs plus what runs off the wafer (the optimizer once, the embedding-gradient scatter per token).
    p.offload_flops = step_flops.checked_sub(p.wafer_flops).ok_or_else(|| {
        Error::Compile(CompileError::Internal(format!(
            "{m} micro-batches execute {} FLOPs on the wafer, more than the step's graph has ({step_flops})",
            p.wafer_flops
        )))
    })?;
    p.notes.push(format!(
        "micro-batching ({why}): the step runs as {m} micro-batches of {} sequences through the same programs, \
         one after the other, the weight gradients summed off the wafer and the optimizer applied once",
        mw.batch
    ));
    Ok(c)
}
