#!/usr/bin/env python3
"""Dev-only parity check against the real Hugging Face libraries (run where `transformers` and `tokenizers` are
installed, e.g. the device machine; nothing in the test suite needs it).

  python3 scripts/hf_parity.py SHARED_DIR [WORK_DIR]

1. `tokenizers` encodes/decodes every case of tests/fixtures/tok/qwen2_golden.jsonl (whose ids came from a JS
   port) with SHARED_DIR/data/qwen-tokenizer/tokenizer.json: any difference is printed.
2. `transformers` loads each tests/fixtures/qwen2_ref/<variant> checkpoint (written by scripts/qwen2_reference.py)
   in float32 with eager attention and its logits are compared with the committed PyTorch reference.
3. Optionally (WORK_DIR), a Qwen2.5-VL checkpoint written by `caprl init-model --preset tiny-vl` is loaded by
   transformers: HF's slow image processor is compared with `caprl preprocess`, and the model's logits with
   `caprl forward --image` (see scripts/device_parity.sh for how WORK_DIR is filled).
Prints one JSON object with the max differences.
"""
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tokenizer_parity(shared):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(shared, "data", "qwen-tokenizer", "tokenizer.json"))
    bad, n = [], 0
    with open(os.path.join(ROOT, "tests", "fixtures", "tok", "qwen2_golden.jsonl"), encoding="utf-8") as f:
        for line in f:
            case = json.loads(line)
            if "text" not in case or "ids" not in case:
                continue
            n += 1
            ids = tok.encode(case["text"], add_special_tokens=False).ids
            if ids != case["ids"]:
                bad.append({"text": case["text"][:80], "hf": ids[:40], "golden": case["ids"][:40]})
            dec = tok.decode(case["ids"], skip_special_tokens=False)
            if "decoded" in case and dec != case["decoded"]:
                bad.append({"decode": case["text"][:80], "hf": dec[:80], "golden": case["decoded"][:80]})
    return {"cases": n, "mismatches": bad}


def load_hf(cls, path):
    try:
        return cls.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    except TypeError:
        return cls.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager")


def hf_logits(path, ids):
    from transformers import AutoModelForCausalLM
    model = load_hf(AutoModelForCausalLM, path)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def model_parity():
    out = {}
    ref_dir = os.path.join(ROOT, "tests", "fixtures", "qwen2_ref")
    for name in sorted(os.listdir(ref_dir)):
        d = os.path.join(ref_dir, name)
        if not os.path.isdir(d):
            continue
        ids = [int(x) for x in open(d + ".ids").read().strip().split(",")]
        ref = np.fromfile(d + ".logits", dtype="<f4").reshape(len(ids), -1)
        got = hf_logits(d, ids)
        out[name] = {"max_abs_diff": float(np.abs(got - ref).max()), "max_abs_logit": float(np.abs(ref).max())}
    return out


def vl_parity(work):
    """A Qwen2.5-VL checkpoint written by `caprl init-model --preset tiny-vl`, one image: HF's slow image processor
    against `caprl preprocess`, and Qwen2_5_VLForConditionalGeneration's logits against `caprl forward --image`."""
    from PIL import Image
    from transformers import Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    ckpt = os.path.join(work, "vl")
    meta = json.load(open(os.path.join(work, "vl_meta.json")))
    proc = Qwen2VLImageProcessor.from_pretrained(ckpt)
    img = Image.open(meta["image"]).convert("RGB")
    enc = proc(images=[img], return_tensors="pt")
    pv, grid = enc["pixel_values"].float(), enc["image_grid_thw"]
    ours = np.fromfile(os.path.join(work, "vl_pixels.f32"), dtype="<f4").reshape(pv.shape)
    res = {"grid_hf": grid.tolist(), "grid_caprl": meta["grid_thw"],
           "pixels_max_abs_diff": float(np.abs(pv.numpy() - ours).max())}
    model = load_hf(Qwen2_5_VLForConditionalGeneration, ckpt)
    model.eval()
    ids = torch.tensor([meta["ids"]])
    # transformers 5 locates image tokens for the M-RoPE positions through the processor's mm_token_type_ids
    # (1 at image tokens); without it every token gets a text position
    image_token_id = json.load(open(os.path.join(ckpt, "config.json")))["image_token_id"]
    kwargs = {"mm_token_type_ids": (ids == image_token_id).int()}
    with torch.no_grad():
        try:
            out = model(input_ids=ids, pixel_values=torch.from_numpy(ours), image_grid_thw=grid, **kwargs)
        except TypeError:  # transformers 4.x computes the positions from the ids alone
            out = model(input_ids=ids, pixel_values=torch.from_numpy(ours), image_grid_thw=grid)
        logits = out.logits[0].numpy()
    caprl = np.fromfile(os.path.join(work, "vl_logits.f32"), dtype="<f4").reshape(logits.shape)
    res["logits_max_abs_diff"] = float(np.abs(logits - caprl).max())
    res["max_abs_logit"] = float(np.abs(logits).max())
    return res


def read_safetensors(path):
    """Minimal reader (the safetensors package may differ between machines): {name: float32 array}."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        base = 8 + n
        out = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            assert info["dtype"] == "F32", name
            a, b = info["data_offsets"]
            f.seek(base + a)
            out[name] = np.frombuffer(f.read(b - a), dtype="<f4").reshape(info["shape"])
        return out


def checkpoint_name(hf_name, names):
    """transformers 5 renames Qwen2.5-VL's tensors (model.language_model.*, model.visual.*); map back."""
    for cand in (hf_name, hf_name.replace("model.language_model.", "model."),
                 hf_name.replace("model.visual.", "visual.")):
        if cand in names:
            return cand
    return None


def vl_inputs(work, ckpt, ids):
    """caprl's pixel_values of the parity image (every tiny-vl checkpoint here has the same preprocessor config),
    its grid, and the image-token mask transformers 5 needs for M-RoPE."""
    meta = json.load(open(os.path.join(work, "vl_meta.json")))
    t, h, w = meta["grid_thw"]
    pv = np.fromfile(os.path.join(work, "vl_pixels.f32"), dtype="<f4").reshape(t * h * w, -1)
    image_token_id = json.load(open(os.path.join(ckpt, "config.json")))["image_token_id"]
    return {"pixel_values": torch.from_numpy(pv.copy()), "image_grid_thw": torch.tensor([[t, h, w]]),
            "mm_token_type_ids": (ids == image_token_id).int()}


def grads_parity(work, name, vl):
    """torch autograd of HF's causal-LM loss with labels[:K] = -100 against `caprl forward --dump-grads`."""
    from transformers import AutoModelForCausalLM, Qwen2_5_VLForConditionalGeneration
    ckpt = os.path.join(work, name)
    summary = json.load(open(os.path.join(work, name + "_summary.json")))
    ours = read_safetensors(os.path.join(work, name + "_grads.safetensors"))
    model = load_hf(Qwen2_5_VLForConditionalGeneration if vl else AutoModelForCausalLM, ckpt)
    model.train()
    ids = torch.tensor([summary["ids"]])
    labels = ids.clone()
    labels[0, :summary["loss_from"]] = -100
    kwargs = vl_inputs(work, ckpt, ids) if vl else {}
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    res = {"loss_hf": float(out.loss), "loss_caprl": summary["loss"], "tensors": 0, "unmatched": [],
           "max_rel_diff": 0.0, "worst": None}
    for hf_name, prm in model.named_parameters():
        cn = checkpoint_name(hf_name, ours)
        if cn is None or prm.grad is None:
            res["unmatched"].append(hf_name)
            continue
        g = prm.grad.detach().float().numpy()
        scale = max(float(np.abs(g).max()), 1e-30)
        d = float(np.abs(g - ours[cn]).max()) / scale
        res["tensors"] += 1
        if d > res["max_rel_diff"]:
            res["max_rel_diff"], res["worst"] = d, cn
    res["caprl_tensors"] = len(ours)
    return res


def sft_checkpoint_parity(work, name, vl):
    """A checkpoint written by `caprl sft` (step-2, bf16 text or f32 VL) loads in transformers and gives caprl's
    logits."""
    from transformers import AutoModelForCausalLM, Qwen2_5_VLForConditionalGeneration
    ckpt = os.path.join(work, name + "_ckpt")
    summary = json.load(open(os.path.join(work, name + "_summary.json")))
    model = load_hf(Qwen2_5_VLForConditionalGeneration if vl else AutoModelForCausalLM, ckpt)
    model.eval()
    ids = torch.tensor([summary["ids"]])
    kwargs = vl_inputs(work, ckpt, ids) if vl else {}
    with torch.no_grad():
        logits = model(input_ids=ids, **kwargs).logits[0].float().numpy()
    ours = np.fromfile(os.path.join(work, name + "_logits.f32"), dtype="<f4").reshape(logits.shape)
    return {"logits_max_abs_diff": float(np.abs(logits - ours).max()), "max_abs_logit": float(np.abs(logits).max()),
            "dtype": json.load(open(os.path.join(ckpt, "config.json"))).get("torch_dtype")}


def main():
    shared = sys.argv[1]
    result = {}
    for name, fn in (("tokenizer", lambda: tokenizer_parity(shared)), ("qwen2_ref", model_parity)):
        try:
            result[name] = fn()
        except Exception as e:  # report and go on: one failing check must not hide the others
            result[name] = {"exception": repr(e)}
    if len(sys.argv) > 2:
        try:
            result["vl"] = vl_parity(sys.argv[2])
        except Exception as e:
            import traceback
            result["vl"] = {"exception": traceback.format_exc()[-3000:]}
        checks = (("grads_text", lambda w: grads_parity(w, "gt", False)),
                  ("grads_vl", lambda w: grads_parity(w, "gv", True)),
                  ("sft_ckpt_text_bf16", lambda w: sft_checkpoint_parity(w, "st", False)),
                  ("sft_ckpt_vl_f32", lambda w: sft_checkpoint_parity(w, "sv", True)))
        for name, fn in checks:
            try:
                result[name] = fn(sys.argv[2])
            except Exception:
                import traceback
                result[name] = {"exception": traceback.format_exc()[-3000:]}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
