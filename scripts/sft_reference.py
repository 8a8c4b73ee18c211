#!/usr/bin/python3
"""Dev-only: an independent float64 PyTorch reference of a whole `caprl sft` run, for tests/golden/test_sft_ref.c.

Run with Debian's torch:  /usr/bin/python3 scripts/sft_reference.py tests/fixtures/sft_ref

It writes a tiny random Qwen2 checkpoint (byte-level vocabulary: ids 0-255 are the bytes, 256-261 the special tokens
of tests/byte_tokenizer.h, which the test adds as tokenizer.json), a data file mixing raw prompt/completion records
and chat records, and then trains it the way docs/cli.md ("sft") and docs/formats.md ("SFT data") specify, with
nothing taken from caprl: each record tokenized (ChatML with the default system prompt for chat records, the loss
on every reply and its <|im_end|>; the completion's tokens for raw ones), the step's loss the mean over all loss
tokens of the batch, autograd in float64 on the forward of scripts/qwen2_reference.py (transformers' Qwen2
arithmetic, RoPE tables in float32 as transformers builds them), torch.nn.utils.clip_grad_norm_, and AdamW as
torch.optim.AdamW with betas 0.9 / 0.95, eps 1e-8 and caprl's schedule (linear warmup to --lr over --warmup steps,
step s (0-based) at lr * s / warmup as transformers' schedulers, then cosine to min_lr_ratio * lr at the last step).

Every step of a run takes all the records (batch = record count), so the data order inside a step changes
nothing but rounding. Per run: RUN.json (the caprl sft arguments, and per step the loss, lr and gradient norm
before clipping) and RUN.safetensors (the final weights, float32).
"""
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qwen2_reference import forward, param_shapes, save_safetensors  # noqa: E402

SPECIAL = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
V, C, F, L, H, HKV, THETA = 262, 32, 48, 2, 4, 2, 10000.0

RECORDS = [
    {"prompt": "Caption: a red circle at the top left.\nQ: Where is the circle?\nA:", "completion": " top left."},
    {"prompt": "2 + 3 =", "completion": " 5"},
    {"prompt": "Colour of the sky:", "completion": " blue, mostly; grey in November."},
    {"prompt": "abc", "completion": "defghij"},
    {"messages": [{"role": "user", "content": "Name a shape."}, {"role": "assistant", "content": "A square."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Count to 3."},
                  {"role": "assistant", "content": "1 2 3"}]},
]

# name: caprl sft options (beyond --model/--data/--out) and what the reference does with them
RUNS = {
    "cosine_clip_wd": {"lr": 3e-3, "steps": 8, "warmup": 2, "schedule": "cosine", "min_lr_ratio": 0.1,
                       "weight_decay": 0.1, "max_grad_norm": 2.0, "micro_batch_tokens": 256, "freeze_embed": False},
    "constant_frozen_embed": {"lr": 2e-3, "steps": 6, "warmup": 0, "schedule": "constant", "min_lr_ratio": 0.1,
                              "weight_decay": 0.0, "max_grad_norm": 0.0, "micro_batch_tokens": 512,
                              "freeze_embed": True},
}


def encode(text):
    """The byte-level tokenizer without merges: special tokens by id, every other byte is its own id."""
    ids, i = [], 0
    while i < len(text):
        for s, sid in SPECIAL.items():
            if text.startswith(s, i):
                ids.append(sid)
                i += len(s)
                break
        else:
            ids.extend(text[i].encode("utf-8"))
            i += 1
    return ids


def tokenize(rec):
    """(ids, loss mask): mask[t] says that token t carries the loss."""
    if "prompt" in rec:
        p, c = encode(rec["prompt"]), encode(rec["completion"])
        return p + c, [False] * len(p) + [True] * len(c)
    msgs = rec["messages"]
    if msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": DEFAULT_SYSTEM}] + msgs
    ids, mask = [], []
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            part = encode(m["content"] + "<|im_end|>")
            ids += part
            mask += [True] * len(part)
            if i + 1 < len(msgs):
                ids.append(ord("\n"))
                mask.append(False)
        else:
            part = encode(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
            if i + 1 < len(msgs) and msgs[i + 1]["role"] == "assistant":
                part += encode("<|im_start|>assistant\n")
            ids += part
            mask += [False] * len(part)
    return ids, mask


def init_params(gen):
    shapes = param_shapes(V, C, F, L, H, HKV, tied=True)
    params = {}
    for n in sorted(shapes):
        t = torch.randn(shapes[n], generator=gen, dtype=torch.float64) * (0.1 if "norm" in n else 0.15)
        params[n] = (t + 1.0 if "norm" in n else t).float()
    return params


def lr_at(run, step):
    lr = run["lr"]
    if run["warmup"] > 0 and step < run["warmup"]:
        return lr * step / run["warmup"]
    if run["schedule"] == "constant":
        return lr
    progress = min(1.0, (step - run["warmup"]) / max(1, run["steps"] - run["warmup"]))
    floor = run["min_lr_ratio"]
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(run, init, cfg, data):
    p = {n: t.double().clone().requires_grad_(not (run["freeze_embed"] and "embed_tokens" in n))
         for n, t in init.items()}
    trained = [t for t in p.values() if t.requires_grad]
    # OpenRLHF's get_optimizer_grouped_parameters: no decay for biases and norm weights
    no_decay = {id(t) for name, t in p.items() if t.requires_grad and any(
        k in name for k in ("bias", "layer_norm.weight", "layernorm.weight", "norm.weight", "ln_f.weight"))}
    m = {id(t): torch.zeros_like(t) for t in trained}
    v = {id(t): torch.zeros_like(t) for t in trained}
    n_loss = sum(sum(mask[1:]) for _, mask in data)
    steps = []
    for s in range(run["steps"]):
        total = 0.0
        for ids, mask in data:
            logits = forward(p, cfg, ids)
            target = torch.tensor(ids[1:])
            keep = torch.tensor(mask[1:])
            nll = torch.nn.functional.cross_entropy(logits[:-1], target, reduction="none")
            total = total + nll[keep].sum()
        loss = total / n_loss
        for t in trained:
            t.grad = None
        loss.backward()
        grad_norm = math.sqrt(sum(float((t.grad ** 2).sum()) for t in trained))
        if run["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(trained, run["max_grad_norm"])
        lr = lr_at(run, s)
        b1, b2, eps, k = 0.9, 0.95, 1e-8, s + 1
        with torch.no_grad():
            for t in trained:
                g = t.grad
                if id(t) not in no_decay:
                    t.mul_(1 - lr * run["weight_decay"])
                m[id(t)].mul_(b1).add_(g, alpha=1 - b1)
                v[id(t)].mul_(b2).addcmul_(g, g, value=1 - b2)
                denom = (v[id(t)].sqrt() / math.sqrt(1 - b2 ** k)).add_(eps)
                t.addcdiv_(m[id(t)], denom, value=-lr / (1 - b1 ** k))
        steps.append({"step": s + 1, "loss": float(loss), "lr": lr, "grad_norm": grad_norm})
        print(run["name"], steps[-1])
    return {n: t.detach().float() for n, t in p.items()}, steps


def main(out):
    os.makedirs(os.path.join(out, "model"), exist_ok=True)
    init = init_params(torch.Generator().manual_seed(20261127))
    cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": C,
           "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": HKV,
           "vocab_size": V, "rms_norm_eps": 1e-6, "rope_theta": THETA, "tie_word_embeddings": True,
           "max_position_embeddings": 1024, "bos_token_id": None, "eos_token_id": SPECIAL["<|im_end|>"],
           "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": L, "attention_dropout": 0.0,
           "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32", "transformers_version": "4.45.0"}
    with open(os.path.join(out, "model", "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_safetensors(os.path.join(out, "model", "model.safetensors"), init)
    with open(os.path.join(out, "train.jsonl"), "w") as f:
        for r in RECORDS:
            f.write(json.dumps(r) + "\n")
    data = [tokenize(r) for r in RECORDS]
    for name, run in RUNS.items():
        run = dict(run, name=name)
        final, steps = train(run, init, cfg, data)
        args = (f"--batch {len(RECORDS)} --max-steps {run['steps']} --lr {run['lr']} --warmup {run['warmup']} "
                f"--schedule {run['schedule']} --min-lr-ratio {run['min_lr_ratio']} "
                f"--weight-decay {run['weight_decay']} --max-grad-norm {run['max_grad_norm']} "
                f"--micro-batch-tokens {run['micro_batch_tokens']}" + (" --freeze embed" if run["freeze_embed"] else ""))
        with open(os.path.join(out, name + ".json"), "w") as f:
            json.dump({"args": args, "loss_tokens": sum(sum(mk[1:]) for _, mk in data), "steps": steps}, f,
                      indent=1)
        save_safetensors(os.path.join(out, name + ".safetensors"), final)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/sft_ref")
