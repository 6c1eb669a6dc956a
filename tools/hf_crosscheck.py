#!/usr/bin/env python3
"""Cross-checks `wafer reference` against Hugging Face transformers on the tiny models.

For each model in models/tiny/: `wafer reference` runs seeded weights on fixed tokens and saves the
weights it used (in the family's checkpoint layout) and its outputs; transformers loads the same
config.json and checkpoint (from_pretrained, so its own weight conversions apply: Mixtral's fused
experts, tied embeddings) and computes the same forward pass in fp32 with eager attention. The
script prints the largest difference per model and writes transformers' outputs to
tests/data/functional_hf.json (and, for the decoders, the loss and every weight's gradient of one
training step, from autograd), which tests/functional_hf.rs holds the reference to in every
`cargo test` (no torch needed there).

Needs torch and transformers (not used by CI):
    python3 -m venv /tmp/hf && /tmp/hf/bin/pip install torch transformers
    /tmp/hf/bin/python tools/hf_crosscheck.py [path/to/wafer]
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
import transformers
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAFER = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "target", "release", "wafer")
SEED = 1
# Token ids below the tiny vocabulary (256); several repeats so attention has structure.
TOKENS = [3, 141, 59, 26, 5, 35, 89, 79]
# name -> (kind, config): the tiny models, and Mistral with a sliding window shorter than TOKENS.
MODELS = {
    "gpt-tiny": ("causal", "models/tiny/gpt-tiny.json"),
    "gptj-tiny": ("causal", "models/tiny/gptj-tiny.json"),
    "neox-tiny": ("causal", "models/tiny/neox-tiny.json"),
    "llama-tiny": ("causal", "models/tiny/llama-tiny.json"),
    # With a capacity factor of experts / top_k no token is dropped (Mixtral has no capacity); the
    # wafer's default factor of 1.0 drops copies past a balanced share, which transformers never does.
    "mixtral-tiny": ("causal", "tests/data/mixtral-tiny-nodrop.json"),
    "bert-tiny": ("bert", "models/tiny/bert-tiny.json"),
    "mistral-tiny-window3": ("causal", "tests/data/mistral-tiny-window3.json"),
}


GRAD_VALUES = 24


def hf_grads(model, name, ours, prefix="grad.", of=lambda p: p.grad):
    """For each `PREFIX.NAME` tensor of the reference's training outputs, transformers' counterpart
    (`of(parameter)`: its gradient, or its value), in the reference's layout, with the reference's."""
    params = {n: of(p) for n, p in model.named_parameters()}
    cfg = model.config
    out = {}
    for key, ours_grad in ours.items():
        if not key.startswith(prefix):
            continue
        w = key[len(prefix):]
        if ".*." in w:
            # Mixtral: the reference stacks experts.E.w1/w3/w2; transformers fuses w1 and w3 into
            # experts.gate_up_proj [E, 2F, H] and keeps w2 as experts.down_proj [E, H, F].
            base, part = w.split(".*.")
            base = base.replace("block_sparse_moe", "mlp")
            f = cfg.intermediate_size
            if part == "w1.weight":
                t = params[base + ".gate_up_proj"][:, :f, :]
            elif part == "w3.weight":
                t = params[base + ".gate_up_proj"][:, f:, :]
            else:
                t = params[base + ".down_proj"]
        else:
            # Names transformers 5 renamed on load: Mixtral's block_sparse_moe, GPT-NeoX's embed_out.
            cands = [w, "transformer." + w, "bert." + w, w.replace("block_sparse_moe", "mlp"), w.replace("embed_out", "lm_head")]
            hit = next((c for c in cands if c in params), None)
            if hit is None:
                raise SystemExit(f"{name}: no transformers parameter for {w}")
            t = params[hit]
            if "query_key_value" in w:
                # GPT-NeoX: transformers' rows are per head (q, k, v of head 0, ...); the reference's
                # are all q, all k, all v.
                heads = cfg.num_attention_heads
                d = t.shape[0] // (3 * heads)
                idx = [h * 3 * d + part * d + j for part in range(3) for h in range(heads) for j in range(d)]
                t = t[idx]
        out[w] = (ours_grad.reshape(t.shape), t.detach().clone())
    return out


def main():
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.manual_seed(0)
    result = {
        "generated_by": "tools/hf_crosscheck.py",
        "torch": torch.__version__.split("+")[0],
        "transformers": transformers.__version__,
        "seed": SEED,
        "tokens": TOKENS,
        "models": {},
    }
    worst = 0.0
    for name, (kind, config) in MODELS.items():
        with tempfile.TemporaryDirectory() as d:
            shutil.copy(os.path.join(ROOT, config), os.path.join(d, "config.json"))
            arg = name if config.startswith("models/") else os.path.join(ROOT, config)
            subprocess.run(
                [WAFER, "reference", arg, "--seed", str(SEED), "--tokens", ",".join(map(str, TOKENS)),
                 "--save-weights", os.path.join(d, "model.safetensors"), "--out", os.path.join(d, "out.safetensors")],
                check=True, stdout=subprocess.DEVNULL)
            ours = load_file(os.path.join(d, "out.safetensors"))
            ids = torch.tensor([TOKENS])
            with torch.no_grad():
                if kind == "bert":
                    model = transformers.BertModel.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")
                    model.eval()
                    out = model(input_ids=ids, token_type_ids=torch.zeros_like(ids))
                    theirs = {"last_hidden_state": out.last_hidden_state[0], "pooler_output": out.pooler_output}
                else:
                    model = transformers.AutoModelForCausalLM.from_pretrained(
                        d, dtype=torch.float32, attn_implementation="eager")
                    model.eval()
                    theirs = {"logits": model(input_ids=ids).logits[:, -1, :]}
            if kind == "causal":
                # One training step's loss: transformers shifts the labels inside, as the reference's
                # labels (next token, -100 at the end) do.
                train = os.path.join(d, "train.safetensors")
                subprocess.run(
                    [WAFER, "reference", arg, "--phase", "train", "--seed", str(SEED),
                     "--tokens", ",".join(map(str, TOKENS)), "--out", train],
                    check=True, stdout=subprocess.DEVNULL)
                ours_train = load_file(train)
                ours["loss"] = ours_train["loss"]
                model.zero_grad()
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                theirs["loss"] = loss.detach().reshape(1)
                grads = hf_grads(model, name, ours_train)
                # One torch.optim.Adam step (its defaults are the reference's: lr 1e-3, betas
                # (0.9, 0.999), eps 1e-8, no weight decay) from zero moments.
                torch.optim.Adam(model.parameters(), lr=1e-3).step()
                updated = hf_grads(model, name, ours_train, "updated.", lambda p: p.data)
            if kind == "bert":
                # BertForPreTraining: masked-LM loss with every token as its own label, plus the
                # next-sentence loss with label 0, as the reference's training graph computes them.
                train = os.path.join(d, "train.safetensors")
                ckpt = os.path.join(d, "model.safetensors")
                subprocess.run(
                    [WAFER, "reference", arg, "--phase", "train", "--seed", str(SEED),
                     "--tokens", ",".join(map(str, TOKENS)), "--save-weights", ckpt, "--out", train],
                    check=True, stdout=subprocess.DEVNULL)
                # The head model's checkpoint keeps the encoder under `bert.`, the heads under `cls.`.
                sd = load_file(ckpt)
                save_file({(k if k.startswith("cls.") else "bert." + k): v for k, v in sd.items()}, ckpt)
                model = transformers.BertForPreTraining.from_pretrained(
                    d, dtype=torch.float32, attn_implementation="eager")
                model.eval()
                ours_train = load_file(train)
                ours["loss"] = ours_train["mlm_loss"] + ours_train["nsp_loss"]
                loss = model(input_ids=ids, token_type_ids=torch.zeros_like(ids), labels=ids,
                             next_sentence_label=torch.tensor([0])).loss
                loss.backward()
                theirs["loss"] = loss.detach().reshape(1)
                grads = hf_grads(model, name, ours_train)
                # One torch.optim.Adam step (its defaults are the reference's: lr 1e-3, betas
                # (0.9, 0.999), eps 1e-8, no weight decay) from zero moments.
                torch.optim.Adam(model.parameters(), lr=1e-3).step()
                updated = hf_grads(model, name, ours_train, "updated.", lambda p: p.data)
            entry = {"model": arg if arg == name else config}
            for key, t in theirs.items():
                o = ours[key].reshape(t.shape)
                diff = (o - t).abs().max().item() / t.abs().max().item()
                worst = max(worst, diff)
                print(f"{name:14} {key:18} shape {list(t.shape)}  max |ours - hf| / max |hf| = {diff:.2e}")
                entry[key] = {"shape": list(t.shape), "values": [float(x) for x in t.flatten()]}
            # Every weight's gradient (the first GRAD_VALUES values, in the reference's layout), held
            # relative to its largest magnitude, floored at 1e-2 of the model's largest gradient: some
            # gradients are exactly zero in exact arithmetic (a key bias shifts every score of a row
            # equally), and both sides then hold rounding noise.
            top = max(t.abs().max().item() for _, t in grads.values())
            worst_grad = 0.0
            for wname, (o, t) in grads.items():
                scale = max(t.abs().max().item(), 1e-2 * top)
                diff = (o - t).abs().max().item() / scale
                worst_grad = max(worst_grad, diff)
                entry["grad." + wname] = {"shape": list(t.shape), "scale": scale,
                                           "values": [float(x) for x in t.flatten()[:GRAD_VALUES]]}
            worst = max(worst, worst_grad)
            # Weights after the Adam step, relative to the tensor's size, where the gradient is clear
            # of rounding noise: Adam's first step moves each weight by lr * g / (|g| + eps), about
            # lr * sign(g), so where g is noise (zero in exact arithmetic) the two may step either way.
            worst_upd = 0.0
            for wname, (o, t) in updated.items():
                scale = max(t.abs().max().item(), 1e-30)
                g = grads[wname][1].reshape(-1)
                clear = g.abs() > 1e-4 * entry["grad." + wname]["scale"]
                diff = (o - t).abs().reshape(-1)
                worst_upd = max(worst_upd, (diff[clear].max().item() if clear.any() else 0.0) / scale)
                entry["updated." + wname] = {"shape": list(t.shape), "scale": scale,
                                              "values": [float(x) for x in t.flatten()[:GRAD_VALUES]]}
            worst = max(worst, worst_upd)
            print(f"{name:14} {len(updated)} updated weights  max |ours - hf| / max |hf| = {worst_upd:.2e}")
            print(f"{name:14} {len(grads)} weight gradients  max |ours - hf| / scale = {worst_grad:.2e}")
            result["models"][name] = entry
    path = os.path.join(ROOT, "tests", "data", "functional_hf.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"worst relative difference {worst:.2e}; wrote {path}")


if __name__ == "__main__":
    main()
