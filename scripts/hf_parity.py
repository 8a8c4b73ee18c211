#!/usr/bin/env python3
"""Dev-only parity check against the real Hugging Face libraries (run where `transformers` and `tokenizers` are
installed, e.g. the device machine; nothing in the test suite needs it).

  python3 scripts/hf_parity.py SHARED_DIR [CAPRL_CHECKPOINT CAPRL_LOGITS IDS]

1. `tokenizers` encodes/decodes every case of tests/fixtures/tok/qwen2_golden.jsonl (whose ids came from a JS
   port) with SHARED_DIR/data/qwen-tokenizer/tokenizer.json: any difference is printed.
2. `transformers` loads each tests/fixtures/qwen2_ref/<variant> checkpoint (written by scripts/qwen2_reference.py)
   in float32 with eager attention and its logits are compared with the committed PyTorch reference.
3. Optionally, a checkpoint written by `caprl init-model` is loaded by transformers and its logits compared with
   `caprl forward --dump-logits` output (float32 [T, V]) for the given comma-separated ids.
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


def hf_logits(path, ids):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager")
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


def main():
    shared = sys.argv[1]
    result = {"tokenizer": tokenizer_parity(shared), "qwen2_ref": model_parity()}
    if len(sys.argv) > 4:
        ckpt, logits_path, ids = sys.argv[2], sys.argv[3], [int(x) for x in sys.argv[4].split(",")]
        caprl = np.fromfile(logits_path, dtype="<f4").reshape(len(ids), -1)
        got = hf_logits(ckpt, ids)
        result["caprl_checkpoint"] = {"max_abs_diff": float(np.abs(got - caprl).max()),
                                      "max_abs_logit": float(np.abs(got).max())}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
