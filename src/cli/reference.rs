//! `wafer reference`: one step of a model on the plain fp32 reference evaluator (no mesh, no timing).

use std::path::{Path, PathBuf};

use clap::Args;

use super::{emit, to_json, WorkloadFlags};
use waferscale::functional::{
    self, weights::write_f32, FunctionalError, Options, Precision, ReferenceSummary, Tokens, WeightSource,
};
use waferscale::model::{self, DType, Model, Phase, Workload, WorkloadArgs};
use waferscale::Error;

/// Sequence length when neither --seq nor --tokens is given: the reference is plain loops, so the
/// graph commands' default (1024) would take minutes on a large model.
const DEFAULT_SEQ: u64 = 8;

#[derive(Args)]
pub struct ReferenceCmd {
    /// A shipped model name (gpt-tiny, all-minilm-l6-v2), a config.json path, or a single op.
    pub model: String,
    #[command(flatten)]
    pub workload: WorkloadFlags,
    /// A Hugging Face safetensors checkpoint (F32, F16, BF16 or F64); without it, seeded random weights.
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
    /// Seed of the random weights and of the tokens when none are given.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Token ids of one sequence, e.g. 101,7592,2088,102 (sets --seq; in decode, the context and the new token).
    #[arg(long, value_name = "IDS", conflicts_with = "input")]
    pub tokens: Option<String>,
    /// A safetensors file with `input_ids` (I64 or I32, [batch, seq] or [seq]).
    #[arg(long, value_name = "FILE")]
    pub input: Option<PathBuf>,
    /// Write the outputs as F32 safetensors: logits, or last_hidden_state and pooler_output, or for
    /// training the loss, every weight's gradient (grad.NAME) and its value after Adam (updated.NAME).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Also write the weights it ran on as a checkpoint in the family's Hugging Face layout.
    #[arg(long, value_name = "FILE")]
    pub save_weights: Option<PathBuf>,
    /// Print the summary as one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn read_input(path: &Path) -> Result<Tokens, FunctionalError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| FunctionalError::Read { path: p.clone(), source })?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| FunctionalError::Corrupt { path: p.clone(), reason: e.to_string() })?;
    let v = st.tensor("input_ids").map_err(|_| FunctionalError::MissingTensor {
        path: p.clone(),
        name: "input_ids".into(),
        model: "reference".into(),
        hint: String::new(),
    })?;
    let ids: Vec<i64> = match v.dtype() {
        safetensors::Dtype::I64 => {
            v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()
        }
        safetensors::Dtype::I32 => {
            v.data().chunks_exact(4).map(|c| i64::from(i32::from_le_bytes(c.try_into().unwrap_or([0; 4])))).collect()
        }
        d => {
            return Err(FunctionalError::DType {
                path: p,
                name: "input_ids".into(),
                dtype: format!("{d:?} (expected I64 or I32)"),
            })
        }
    };
    let batch = match v.shape() {
        [_] => 1,
        [b, _] if *b > 0 => *b,
        s => {
            return Err(FunctionalError::Input(format!(
                "{p}: `input_ids` has shape {s:?}; expected [batch, seq] or [seq] with batch > 0"
            )))
        }
    };
    Ok(Tokens { batch, ids })
}

/// The tokens given by `--tokens` or `--input`, if any.
pub fn given_tokens(tokens: Option<&str>, input: Option<&Path>) -> Result<Option<Tokens>, Error> {
    Ok(match (tokens, input) {
        (Some(t), _) => Some(Tokens::parse(t)?),
        (None, Some(p)) => Some(read_input(p)?),
        (None, None) => None,
    })
}

/// Sets batch and sequence (or, in decode, context) from the given tokens, checking the flags that
/// were given agree; without tokens, a transformer's sequence defaults to `DEFAULT_SEQ`.
pub fn apply_tokens(args: &mut WorkloadArgs, model: &Model, given: Option<&Tokens>) -> Result<(), Error> {
    if let Some(t) = given {
        let bad = |flag: &str, v: u64, want: usize| {
            FunctionalError::Input(format!("--{flag} {v} does not match the {want} given by the tokens"))
        };
        if args.batch.is_some_and(|b| b != t.batch as u64) {
            return Err(bad("batch", args.batch.unwrap_or(0), t.batch).into());
        }
        args.batch = Some(t.batch as u64);
        if args.phase == Some(Phase::Decode) {
            if t.len() < 2 {
                return Err(FunctionalError::Input(
                    "decode needs at least two tokens: a context and the new one".into(),
                )
                .into());
            }
            if args.context.is_some_and(|c| c + 1 != t.len() as u64) {
                return Err(bad("context", args.context.unwrap_or(0), t.len() - 1).into());
            }
            args.context = Some(t.len() as u64 - 1);
        } else {
            if args.seq.is_some_and(|s| s != t.len() as u64) {
                return Err(bad("seq", args.seq.unwrap_or(0), t.len()).into());
            }
            args.seq = Some(t.len() as u64);
        }
    } else if matches!(model, Model::Transformer(_)) && args.seq.is_none() && args.context.is_none() {
        args.seq = Some(DEFAULT_SEQ);
    }
    Ok(())
}

/// The tokens (given, or seeded for the workload's sequence) and the weights (a checkpoint, or seeded)
/// of a reference or functional run.
pub fn inputs(
    given: Option<Tokens>,
    model: &Model,
    workload: &Workload,
    weights: Option<&PathBuf>,
    seed: u64,
) -> (Tokens, WeightSource) {
    let tokens = match given {
        Some(t) => t,
        None => match model {
            Model::Transformer(s) => {
                let len = if workload.phase == Phase::Decode { workload.context + 1 } else { workload.seq };
                Tokens::seeded(seed, workload.batch as usize, len as usize, s.vocab)
            }
            // Single ops take no tokens; their inputs are seeded.
            Model::Op(_) => Tokens { batch: 1, ids: Vec::new() },
        },
    };
    let source = match weights {
        Some(p) => WeightSource::File(p.clone()),
        None => WeightSource::Seeded(seed),
    };
    (tokens, source)
}

pub fn run(cmd: ReferenceCmd) -> Result<(), Error> {
    let model = model::load(&cmd.model)?;
    let mut args = cmd.workload.args()?;
    args.phase = args.phase.or(Some(Phase::Prefill));
    args.dtype = args.dtype.or(Some(DType::Fp32));
    let given = given_tokens(cmd.tokens.as_deref(), cmd.input.as_deref())?;
    apply_tokens(&mut args, &model, given.as_ref())?;
    let workload = args.resolve(&model)?;
    if workload.sparsity > 0.0 && cmd.weights.is_none() {
        // Seeded weights are dense; a sparse run needs a checkpoint whose zeros are the sparsity.
        return Err(FunctionalError::Input(
            "--sparsity: the reference makes dense seeded weights; give a checkpoint with --weights (its zeros are its sparsity)".into(),
        )
        .into());
    }
    let precision = match workload.dtype {
        DType::Fp32 => Precision::Exact,
        DType::Fp16 | DType::Bf16 => Precision::Storage,
        DType::Fp8 => {
            return Err(FunctionalError::Input("the reference does not model fp8; use fp32, fp16 or bf16".into()).into())
        }
    };
    let (tokens, source) = inputs(given, &model, &workload, cmd.weights.as_ref(), cmd.seed);
    let opts = Options { precision, ..Options::default() };
    let run = functional::run::<f32>(&model, &workload, &source, &tokens, &opts)?;
    let summary = ReferenceSummary::new(&run, &tokens.ids);
    if let Some(out) = &cmd.out {
        let tensors: Vec<(String, Vec<u64>, Vec<f32>)> = run
            .primary_outputs()
            .into_iter()
            .chain(run.training_outputs())
            .map(|(name, t)| (name, run.graph.tensor(t).shape.clone(), run.values.f(t).to_vec()))
            .collect();
        write_f32(out, &tensors)?;
    }
    if let Some(path) = &cmd.save_weights {
        let family = match &model {
            Model::Transformer(s) => Some(s.family),
            Model::Op(_) => None,
        };
        run.weights.save(path, &run.graph, family)?;
    }
    let text = if cmd.json { to_json(&summary)? } else { summary.to_text() };
    emit(&text, None)
}
