//! Plan files: the inputs of a compile (model config text, workload, resolved hardware, mesh, mode)
//! plus the plan's summary for display. Loading a plan recompiles from its inputs, so the program is
//! never stored and never goes stale; internal IR types are not a file format.

use serde::{Deserialize, Serialize};

use crate::graph::Graph;
use crate::hw::{HwDoc, WaferHw};
use crate::model::{self, DType, Model, Phase, SingleOp, WorkloadArgs};
use crate::report::PlanSummary;
use crate::Error;

use super::{compile_model, CompileError, CompileOptions, Compiled, Mode};

/// Version of the plan file format.
pub const PLAN_VERSION: u32 = 1;

/// Everything a compile depends on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanInputs {
    /// The model as given (`gpt2-small`, a path, `gemv:16384x16384`).
    pub model: String,
    /// The config file's name and path as resolved, and its text (None for single ops).
    pub model_name: String,
    pub model_path: String,
    pub model_text: Option<String>,
    pub phase: String,
    pub batch: u64,
    pub seq: u64,
    pub context: u64,
    pub dtype: String,
    pub sparsity: f64,
    pub recompute: bool,
    /// Hardware name, path, the `--set` overrides, and the resolved description (TOML).
    pub hw_name: String,
    pub hw_path: String,
    pub hw_overrides: Vec<String>,
    pub hw_toml: String,
    /// `--mesh WxH`, when given.
    pub mesh: Option<(u32, u32)>,
    pub mode: Option<String>,
    pub wafers: u32,
    /// `--micro-batches M`, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub micro_batches: Option<u32>,
}

/// A plan file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanFile {
    pub version: u32,
    pub inputs: PlanInputs,
    pub summary: PlanSummary,
}

impl PlanInputs {
    /// Records the inputs of a compile; `model_arg` is what the user gave, `doc` the hardware after
    /// `extends` and `--set`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model_arg: &str,
        model: &Model,
        workload: &crate::model::Workload,
        doc: &HwDoc,
        overrides: &[String],
        mesh: Option<(u32, u32)>,
        opts: &CompileOptions,
    ) -> Result<PlanInputs, Error> {
        let (model_name, model_path, model_text) = match model {
            Model::Op(op) => (op.to_string(), String::new(), None),
            Model::Transformer(spec) => {
                let text = match model::embedded_models().iter().find(|f| f.path == spec.source) {
                    Some(f) => f.text.to_string(),
                    None => std::fs::read_to_string(&spec.source).map_err(|e| {
                        Error::Compile(CompileError::PlanFile {
                            path: spec.source.clone(),
                            message: format!("cannot read the model config to store in the plan: {e}"),
                        })
                    })?,
                };
                (spec.name.clone(), spec.source.clone(), Some(text))
            }
        };
        let hw_toml = toml::to_string(&doc.tree).map_err(|e| {
            Error::Compile(CompileError::Internal(format!("cannot write the hardware description: {e}")))
        })?;
        Ok(PlanInputs {
            model: model_arg.to_string(),
            model_name,
            model_path,
            model_text,
            phase: workload.phase.name().into(),
            batch: workload.batch,
            seq: workload.seq,
            context: workload.context,
            dtype: workload.dtype.name().into(),
            sparsity: workload.sparsity,
            recompute: workload.recompute,
            hw_name: doc.name.clone(),
            hw_path: doc.path.clone(),
            hw_overrides: overrides.to_vec(),
            hw_toml,
            mesh,
            mode: opts.mode.map(|m| m.name().to_string()),
            wafers: opts.wafers,
            micro_batches: opts.micro_batches,
        })
    }

    /// Rebuilds the model, graph and hardware, and compiles them.
    pub fn compile(&self, verify: bool) -> Result<(Graph, WaferHw, Compiled), Error> {
        let bad = |m: String| Error::Compile(CompileError::PlanFile { path: "plan".into(), message: m });
        let model = match &self.model_text {
            None => match SingleOp::parse(&self.model_name)? {
                Some(op) => Model::Op(op),
                None => return Err(bad(format!("`{}` is not a single op", self.model_name))),
            },
            Some(text) => Model::Transformer(model::parse_config(&self.model_name, &self.model_path, text)?),
        };
        let phase = Phase::parse(&self.phase).ok_or_else(|| bad(format!("unknown phase `{}`", self.phase)))?;
        let dtype = DType::parse(&self.dtype).ok_or_else(|| bad(format!("unknown dtype `{}`", self.dtype)))?;
        let args = match (&model, phase) {
            (Model::Op(_), _) => {
                WorkloadArgs { dtype: Some(dtype), sparsity: Some(self.sparsity), ..Default::default() }
            }
            (_, Phase::Decode) => WorkloadArgs {
                phase: Some(phase),
                batch: Some(self.batch),
                context: Some(self.context),
                dtype: Some(dtype),
                sparsity: Some(self.sparsity),
                ..Default::default()
            },
            _ => WorkloadArgs {
                phase: Some(phase),
                batch: Some(self.batch),
                seq: Some(self.seq),
                dtype: Some(dtype),
                sparsity: Some(self.sparsity),
                recompute: Some(self.recompute),
                ..Default::default()
            },
        };
        let workload = args.resolve(&model)?;
        let tree: toml::Table =
            self.hw_toml.parse().map_err(|e| bad(format!("the stored hardware description does not parse: {e}")))?;
        let doc = HwDoc { name: self.hw_name.clone(), path: self.hw_path.clone(), tree };
        let mut hw = WaferHw::from_doc(&doc)?;
        if let Some((w, h)) = self.mesh {
            hw = hw.with_mesh(w, h)?;
        }
        let mode = match &self.mode {
            None => None,
            Some(m) => Some(Mode::parse(m).ok_or_else(|| bad(format!("unknown mode `{m}`")))?),
        };
        let opts =
            CompileOptions { mode, wafers: self.wafers, verify, micro_batches: self.micro_batches, layer_iters: None };
        let (g, c) = compile_model(&model, &workload, &hw, &opts)?;
        Ok((g, hw, c))
    }
}

impl PlanFile {
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Recompiles the plan from its inputs and checks the result against the stored summary (a file
    /// edited by hand, or written by a compiler that plans differently, does not match).
    pub fn recompile(&self, path: &str, verify: bool) -> Result<(Graph, WaferHw, Compiled), Error> {
        let (g, hw, c) = self.inputs.compile(verify)?;
        if c.plan != self.summary {
            return Err(Error::Compile(CompileError::PlanFile {
                path: path.to_string(),
                message: "its stored summary differs from a recompile of its stored inputs (the file was edited, \
                          or written by a compiler that plans differently): recompile the model"
                    .into(),
            }));
        }
        Ok((g, hw, c))
    }

    /// Reads and checks a plan file (not recompiled).
    pub fn read(path: &str) -> Result<PlanFile, Error> {
        let bad = |message: String| Error::Compile(CompileError::PlanFile { path: path.to_string(), message });
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read the plan file: {e}")))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            bad(format!("not a plan file (truncated or corrupt JSON at line {}, column {}: {e})", e.line(), e.column()))
        })?;
        match v.get("version").and_then(|x| x.as_u64()) {
            Some(v) if v == PLAN_VERSION as u64 => {}
            Some(v) => {
                return Err(bad(format!(
                    "plan file version {v}; this wafer reads version {PLAN_VERSION}: recompile the model"
                )))
            }
            None => return Err(bad("not a plan file: no `version` field".into())),
        }
        serde_json::from_value(v).map_err(|e| bad(format!("not a valid plan file: {e}")))
    }
}

/// Loads a plan file and recompiles it: the graph, the hardware and the compiled plan and program.
pub fn load_plan(path: &str) -> Result<(Graph, WaferHw, Compiled), Error> {
    let f = PlanFile::read(path)?;
    f.recompile(path, cfg!(debug_assertions))
}
