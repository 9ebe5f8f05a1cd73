#!/usr/bin/env python3
"""Write tests/fixtures/smollm2_tokenizer.json: reference token ids for the GGUF tokenizer.

Reference implementation: Hugging Face `transformers` converting the tokenizer stored in the
same GGUF file that the Rust tests load (SmolLM2-135M-Instruct.Q4_1.gguf, fetched by
scripts/fetch-model.sh).

Command used (transformers 5.24.0, gguf 0.19.0, tokenizers 0.23.3, no torch):
    python3 -m venv /tmp/tokvenv && /tmp/tokvenv/bin/pip install transformers gguf
    /tmp/tokvenv/bin/python scripts/make-tokenizer-fixture.py
"""
import json
import os
import sys
import types

import transformers
from transformers import PreTrainedTokenizerFast

# transformers' GGUF reader imports torch at module level but only uses it for tensor data,
# which the tokenizer path never touches. When torch is not installed (CPU-only boxes where
# PyPI's CUDA wheels are impractical), a stub whose attributes are inert placeholders is enough. It is
# installed after transformers has checked (and cached) that torch is unavailable.
try:
    import torch  # noqa: F401
except ImportError:
    _stub = types.ModuleType("torch")

    def _placeholder(name: str) -> str:
        # Any attribute (dtypes, type names used in annotations) is an inert placeholder.
        return f"torch.{name}"

    _stub.__getattr__ = _placeholder
    sys.modules["torch"] = _stub

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(ROOT, "models")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = os.path.join(ROOT, "tests", "fixtures", "smollm2_tokenizer.json")

STRINGS = [
    "Hello, world!",
    "The Fed says",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "multiple   inner    spaces",
    "1234567890",
    "Pi is 3.14159 and e is 2.71828.",
    "In 2024, 12% of 1,000 people",
    "line one\nline two\n\nline four",
    "tabs\tand\r\nCRLF",
    "naïve café résumé",
    "日本語のテキスト",
    "Привет, мир!",
    "emoji 🙂🚀 and ✓",
    "def f(x):\n    return x ** 2  # square\n",
    "fn main() { println!(\"{}\", 42); }",
    "<html><body class=\"a-b\">x&amp;y</body></html>",
    "I'm sure you'll see they've done it, we'd agree.",
    "CamelCaseIdentifier snake_case_name kebab-case",
    "The capital of France is Paris.",
    "    indented\n\t\ttabbed",
    "a",
    "<|im_start|>user\nHi<|im_end|>\n",
    "x = [1, 22, 333]; y = {'k': -0.5e-3}",
    "Ünïcödé ß ﬁ Å",
]


def main() -> None:
    # AutoTokenizer would also build the model config, which needs torch; the tokenizer class
    # itself converts the GGUF tokenizer (get_gguf_tokenizer + convert_gguf_tokenizer).
    tok = PreTrainedTokenizerFast.from_pretrained(MODEL_DIR, gguf_file=GGUF)
    cases = []
    for s in STRINGS:
        ids = tok.encode(s, add_special_tokens=False)
        cases.append({"text": s, "ids": ids})
    data = {
        "source": f"transformers {transformers.__version__} PreTrainedTokenizerFast.from_pretrained(models/, gguf_file={GGUF!r}), encode(text, add_special_tokens=False)",
        "model": GGUF,
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "cases": cases,
    }
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} cases to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
