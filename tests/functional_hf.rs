//! The reference against Hugging Face transformers, every family: `tests/data/functional_hf.json`
//! holds what transformers (its version is in the file) computes in fp32 for the tiny models with
//! the reference's seeded weights (saved in each family's checkpoint layout and loaded with
//! `from_pretrained`) on fixed tokens: the last token's logits, BERT's hidden states and pooler
//! output, and one training step's loss (causal LM; BERT's masked-LM plus next-sentence, as
//! BertForPreTraining) and every weight's gradient (autograd; the first values of each, converted to
//! the reference's layout, held relative to the tensor's largest magnitude floored at 1e-2 of the
//! model's largest gradient, since a key bias's gradient is zero in exact arithmetic), and every
//! weight after one `torch.optim.Adam` step. `tools/hf_crosscheck.py` regenerates it
//! (it needs torch; this test does not). Beside the six tiny models, `tests/data/mistral-tiny-window3.json`
//! is llama-tiny as Mistral with a 3-token sliding window, shorter than the 8 tokens.
//!
//! Measured when generated: every value within 2e-6 of transformers, relative to the largest
//! magnitude of its tensor; the bound here is 1e-5, so that a different summation order passes
//! and any semantic difference (a mask, a rotary layout, a routing, a norm epsilon) fails.

use serde_json::Value;
use waferscale::functional::{self, Options, Real, Tokens, WeightSource};
use waferscale::model::{self, DType, Phase, WorkloadArgs};

fn run(name: &str, phase: Phase, seed: u64, tokens: &[i64]) -> functional::Run<f32> {
    let model = model::load(name).unwrap();
    let args = WorkloadArgs {
        phase: Some(phase),
        batch: Some(1),
        seq: Some(tokens.len() as u64),
        dtype: Some(DType::Fp32),
        ..Default::default()
    };
    let wl = args.resolve(&model).unwrap();
    functional::run::<f32>(&model, &wl, &WeightSource::Seeded(seed), &Tokens::one(tokens.to_vec()), &Options::default())
        .unwrap()
}

#[test]
fn reference_matches_transformers_on_every_family() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/functional_hf.json")).unwrap();
    let data: Value = serde_json::from_str(&text).unwrap();
    let seed = data["seed"].as_u64().unwrap();
    let tokens: Vec<i64> = data["tokens"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap()).collect();
    let models = data["models"].as_object().unwrap();
    assert_eq!(models.len(), 7, "one entry per tiny model, and Mistral with a sliding window");
    for (name, outputs) in models {
        // A shipped name, or a config path relative to the repository.
        let arg = outputs["model"].as_str().unwrap();
        let prefill = run(arg, Phase::Prefill, seed, &tokens);
        let train = outputs.get("loss").map(|_| run(arg, Phase::Train, seed, &tokens));
        for (key, want) in outputs.as_object().unwrap().iter().filter(|(k, _)| *k != "model") {
            let hf: Vec<f64> = want["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let r = if key == "loss" || key.starts_with("grad.") || key.starts_with("updated.") {
                train.as_ref().unwrap()
            } else {
                &prefill
            };
            let ours: Vec<f64> = if key == "loss" {
                // The sum of the step's losses (BERT: masked-LM + next-sentence, as BertForPreTraining).
                let losses = r.primary_outputs().into_iter().filter(|(n, _)| n.ends_with("loss"));
                vec![losses.map(|(_, t)| r.values.f(t)[0].to_f64()).sum()]
            } else {
                let (_, t) = r
                    .primary_outputs()
                    .into_iter()
                    .chain(r.training_outputs())
                    .find(|(n, _)| n == key)
                    .unwrap_or_else(|| panic!("{name}: no {key}"));
                let shape: Vec<u64> = want["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).collect();
                assert_eq!(r.graph.tensor(t).elems(), shape.iter().product::<u64>(), "{name} {key}");
                r.values.f(t).iter().take(hf.len()).map(|x| x.to_f64()).collect()
            };
            assert_eq!(ours.len(), hf.len(), "{name} {key}");
            // Gradients store their first values and the whole tensor's largest magnitude.
            let scale = want["scale"].as_f64().unwrap_or_else(|| hf.iter().fold(0.0f64, |m, x| m.max(x.abs())));
            // After Adam's first step a weight has moved by about lr * sign(g): where the gradient is
            // rounding noise (zero in exact arithmetic) either sign is right, so only |step| <= lr holds.
            let noise: Vec<bool> = match key.strip_prefix("updated.") {
                Some(w) => {
                    let g = &outputs[&format!("grad.{w}")];
                    let gscale = g["scale"].as_f64().unwrap();
                    g["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap().abs() <= 1e-4 * gscale).collect()
                }
                None => vec![false; hf.len()],
            };
            let lr = functional::AdamConfig::default().lr;
            let mut diff = 0.0f64;
            for (i, (a, b)) in ours.iter().zip(&hf).enumerate() {
                if noise[i] {
                    assert!((a - b).abs() <= 2.0 * lr * (1.0 + 1e-3), "{name} {key}[{i}]: {a} vs {b}");
                } else {
                    diff = diff.max((a - b).abs() / scale);
                }
            }
            assert!(diff < 1e-5, "{name} {key}: max |reference - transformers| / max |transformers| = {diff:e}");
        }
    }
}
