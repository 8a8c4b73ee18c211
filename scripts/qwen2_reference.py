#!/usr/bin/python3
"""Dev-only: write tiny Qwen2 checkpoints in exact Hugging Face layout (our own safetensors writer in plain
Python, not caprl's) and their logits from a PyTorch forward written from spec/qwen.md section 2 the way
transformers' modeling_qwen2.py computes it (rotate_half RoPE, repeat_kv GQA, eager attention, SwiGLU).

Run with Debian's torch:  /usr/bin/python3 scripts/qwen2_reference.py tests/fixtures/qwen2_ref
Outputs per variant: DIR/<variant>/{config.json, generation_config.json, model.safetensors}, DIR/<variant>.ids
(token ids, one line) and DIR/<variant>.logits (float32 [T, V], little-endian).
"""
import json
import os
import struct
import sys

import torch

VARIANTS = {
    # name: (dtype, tied, vocab, hidden, ffn, layers, heads, kv_heads, theta)
    "f32_tied": (torch.float32, True, 160, 48, 72, 2, 6, 2, 10000.0),
    "f32_untied": (torch.float32, False, 160, 64, 96, 2, 4, 1, 1000000.0),
    "bf16_tied": (torch.bfloat16, True, 160, 48, 72, 2, 6, 3, 10000.0),
}
IDS = [3, 17, 159, 0, 42, 42, 100, 7, 120, 64, 5, 99, 12, 1, 150, 77]


def save_safetensors(path, tensors):
    """The format as the safetensors README describes it: u64 header size, JSON header, data."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name].contiguous()
        raw = t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()
        header[name] = {"dtype": {torch.float32: "F32", torch.bfloat16: "BF16"}[t.dtype],
                        "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def rmsnorm(x, w, eps):
    var = x.pow(2).mean(-1, keepdim=True)
    return w * (x * torch.rsqrt(var + eps))


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def forward(p, cfg, ids):
    D = cfg["hidden_size"] // cfg["num_attention_heads"]
    H, Hkv, T = cfg["num_attention_heads"], cfg["num_key_value_heads"], len(ids)
    eps = cfg["rms_norm_eps"]
    inv_freq = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    freqs = torch.outer(torch.arange(T).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    x = p["model.embed_tokens.weight"][torch.tensor(ids)]
    mask = torch.full((T, T), float("-inf")).triu(1)
    for l in range(cfg["num_hidden_layers"]):
        g = lambda n: p[f"model.layers.{l}.{n}"]
        a = rmsnorm(x, g("input_layernorm.weight"), eps)
        q = (a @ g("self_attn.q_proj.weight").T + g("self_attn.q_proj.bias")).view(T, H, D).transpose(0, 1)
        k = (a @ g("self_attn.k_proj.weight").T + g("self_attn.k_proj.bias")).view(T, Hkv, D).transpose(0, 1)
        v = (a @ g("self_attn.v_proj.weight").T + g("self_attn.v_proj.bias")).view(T, Hkv, D).transpose(0, 1)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k = k.repeat_interleave(H // Hkv, dim=0)
        v = v.repeat_interleave(H // Hkv, dim=0)
        att = torch.softmax(q @ k.transpose(1, 2) * D ** -0.5 + mask, dim=-1) @ v
        x = x + att.transpose(0, 1).reshape(T, H * D) @ g("self_attn.o_proj.weight").T
        m = rmsnorm(x, g("post_attention_layernorm.weight"), eps)
        gate = torch.nn.functional.silu(m @ g("mlp.gate_proj.weight").T)
        x = x + (gate * (m @ g("mlp.up_proj.weight").T)) @ g("mlp.down_proj.weight").T
    x = rmsnorm(x, p["model.norm.weight"], eps)
    lm = p["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else p["lm_head.weight"]
    return x @ lm.T


def param_shapes(V, C, F, L, H, Hkv, tied):
    """Every tensor of a Qwen2 checkpoint in Hugging Face names, with its shape."""
    D = C // H
    shapes = {"model.embed_tokens.weight": (V, C), "model.norm.weight": (C,)}
    for l in range(L):
        pre = f"model.layers.{l}."
        shapes.update({pre + "input_layernorm.weight": (C,), pre + "post_attention_layernorm.weight": (C,),
                       pre + "self_attn.q_proj.weight": (H * D, C), pre + "self_attn.q_proj.bias": (H * D,),
                       pre + "self_attn.k_proj.weight": (Hkv * D, C), pre + "self_attn.k_proj.bias": (Hkv * D,),
                       pre + "self_attn.v_proj.weight": (Hkv * D, C), pre + "self_attn.v_proj.bias": (Hkv * D,),
                       pre + "self_attn.o_proj.weight": (C, H * D), pre + "mlp.gate_proj.weight": (F, C),
                       pre + "mlp.up_proj.weight": (F, C), pre + "mlp.down_proj.weight": (C, F)})
    if not tied:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def main(out):
    for name, (dtype, tied, V, C, F, L, H, Hkv, theta) in VARIANTS.items():
        gen = torch.Generator().manual_seed(1234)
        shapes = param_shapes(V, C, F, L, H, Hkv, tied)
        params = {}
        for n in sorted(shapes):
            t = torch.randn(shapes[n], generator=gen) * (0.1 if "norm" in n else 0.08)
            params[n] = (t + 1.0 if "norm" in n else t).to(dtype)
        cfg = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
               "hidden_size": C, "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H,
               "num_key_value_heads": Hkv, "vocab_size": V, "rms_norm_eps": 1e-6, "rope_theta": theta,
               "tie_word_embeddings": tied, "max_position_embeddings": 512, "bos_token_id": None,
               "eos_token_id": V - 1, "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": L,
               "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
               "torch_dtype": "float32" if dtype == torch.float32 else "bfloat16",
               "transformers_version": "4.45.0"}
        d = os.path.join(out, name)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(d, "generation_config.json"), "w") as f:
            json.dump({"eos_token_id": [V - 1], "do_sample": False}, f, indent=2)
        save_safetensors(os.path.join(d, "model.safetensors"), params)
        # the reference computes in float32 from the stored values (bf16 widened exactly)
        logits = forward({n: t.float() for n, t in params.items()}, cfg, IDS)
        with open(os.path.join(out, name + ".ids"), "w") as f:
            f.write(",".join(map(str, IDS)) + "\n")
        with open(os.path.join(out, name + ".logits"), "wb") as f:
            f.write(logits.detach().numpy().astype("<f4").tobytes())
        print(name, "logits", tuple(logits.shape), "max |logit|", float(logits.abs().max()))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/qwen2_ref")
