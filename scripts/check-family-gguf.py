#!/usr/bin/env python3
"""Check tests/fixtures/families/*/model.gguf against model.safetensors with the inverse mapping that
tests/fixtures/families/README.md documents (independently of the writer in make-family-fixtures.py):
GGUF names -> HF names, llama q/k un-permuted, Gemma norms minus 1, ggml dims reversed; also the
vocabulary and a few metadata keys. Exits non-zero on any mismatch.

Usage: /tmp/v12/bin/python scripts/check-family-gguf.py   (needs gguf, numpy, safetensors)
"""
import json
import os
import sys

import numpy as np
from gguf import GGUFReader
from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAM = os.path.join(ROOT, "tests", "fixtures", "families")

BLOCK_MAP = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_qkv": "self_attn.qkv_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj",
    "ffn_down": "mlp.down_proj", "post_ffw_norm": "post_feedforward_layernorm",
}


def field(r, key):
    f = r.fields[key]
    v = f.parts[f.data[0]]
    return bytes(v).decode() if f.types[0].name == "STRING" else v.tolist()[0]


def strings(r, key):
    f = r.fields[key]
    return [bytes(f.parts[i]).decode() for i in f.data]


def main():
    bad = 0
    for name in sorted(os.listdir(FAM)):
        bad_before = bad
        path = os.path.join(FAM, name, "model.gguf")
        if not os.path.exists(path):
            continue
        cfg = json.load(open(os.path.join(FAM, name, "config.json")))
        sd = load_file(os.path.join(FAM, name, "model.safetensors"))
        r = GGUFReader(path)
        arch = field(r, "general.architecture")
        gemma = arch.startswith("gemma")
        nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
        seen = set()
        for t in r.tensors:
            a = np.array(t.data).reshape([int(x) for x in reversed(t.shape.tolist())])
            parts = t.name.split(".")
            if t.name in ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"):
                continue
            if parts[0] == "blk":
                i, short, kind = parts[1], parts[2], parts[3]
                if short == "ffn_norm":
                    hf = "pre_feedforward_layernorm" if gemma else "post_attention_layernorm"
                elif short == "post_attention_norm":
                    hf = "post_attention_layernorm"
                elif short == "ffn_up":
                    hf = "mlp.gate_up_proj" if arch == "phi3" else "mlp.up_proj"
                else:
                    hf = BLOCK_MAP[short]
                key = f"model.layers.{i}.{hf}.{kind}"
                if arch == "llama" and short in ("attn_q", "attn_k") and kind == "weight":
                    n = nh if short == "attn_q" else nkv
                    a = a.reshape(n, hd // 2, 2, -1).swapaxes(1, 2).reshape(a.shape)
            else:
                key = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
                       "output_norm.weight": "model.norm.weight"}[t.name]
            ref = sd[key]
            if gemma and t.name.endswith("norm.weight"):
                # stored as f32(1 + w): exactly the factor HF's Gemma RMSNorm computes, (1.0 + w) in f32
                ref = (np.float32(1.0) + ref).astype(np.float32)
            if a.shape != ref.shape or not np.array_equal(a, ref):
                print(f"{name}: {t.name} != {key}")
                bad += 1
            seen.add(key)
        missing = set(sd) - seen
        if missing:
            print(f"{name}: HF tensors not in the GGUF: {sorted(missing)}")
            bad += 1
        tj = json.load(open(os.path.join(FAM, name, "tokenizer.json")))
        vocab = {**tj["model"]["vocab"], **{a["content"]: a["id"] for a in tj["added_tokens"]}}
        toks = strings(r, "tokenizer.ggml.tokens")
        if len(toks) != cfg["vocab_size"] or any(toks[i] != s for s, i in vocab.items()):
            print(f"{name}: token list differs")
            bad += 1
        checks = {f"{arch}.block_count": cfg["num_hidden_layers"], f"{arch}.embedding_length": cfg["hidden_size"],
                  f"{arch}.attention.head_count": nh, f"{arch}.attention.head_count_kv": nkv,
                  f"{arch}.rope.freq_base": cfg["rope_theta"]}
        for k, v in checks.items():
            if abs(field(r, k) - v) > 1e-6 * max(1.0, abs(v)):
                print(f"{name}: {k} = {field(r, k)} != {v}")
                bad += 1
        print(f"{name}: {arch}, {len(r.tensors)} tensors, {len(toks)} tokens: {'ok' if bad == bad_before else 'FAILED'}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
