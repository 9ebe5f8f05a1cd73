#!/usr/bin/env python3
"""LLaMPPL's side of the bench's `llamppl_task_s`: "The Fed says", every word at most five
letters, 32 particles, 30 tokens, `smc_standard`, f32 weights, 2 torch threads.

Setup (a virtual environment; torch's CPU wheel is enough):
    python3 -m venv .venv-llamppl
    .venv-llamppl/bin/pip install torch transformers gguf llamppl
    scripts/fetch-model.sh
    .venv-llamppl/bin/python scripts/llamppl-task.py [--particles 32] [--reps 3]

The weights come from the project's GGUF (transformers dequantizes it to f32), so both sides
run the same model. Prints one JSON line per repetition and the median; pass the median to
the bench as SMC_BENCH_LLAMPPL_S to read `llamppl_speedup` on one machine.
"""
import argparse
import asyncio
import json
import re
import statistics
import time

import torch
from genlm.backend.llm import AsyncTransformer
from llamppl import CachedCausalLM, LMContext, Model, smc_standard
from transformers import AutoModelForCausalLM, AutoTokenizer


class ShortWords(Model):
    """Next token from the LM; a particle dies when a finished or growing word of its
    continuation has more than five letters (the target of `--max-word-letters 5`)."""

    def __init__(self, lm, prompt, max_tokens):
        super().__init__()
        self.context = LMContext(lm, prompt)
        self.eos = lm.tokenizer.eos_token_id
        self.left = max_tokens
        self.prompt_chars = len(str(self.context))

    async def step(self):
        token = await self.sample(self.context.next_token())
        self.left -= 1
        if token.token_id == self.eos:
            self.finish()
            return
        words = re.findall(r"[A-Za-z]+", str(self.context)[self.prompt_chars:])
        self.condition(all(len(w) <= 5 for w in words))
        if self.left == 0:
            self.finish()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", default="models")
    p.add_argument("--gguf", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    p.add_argument("--particles", type=int, default=32)
    p.add_argument("--tokens", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model_dir, gguf_file=a.gguf)
    hf = AutoModelForCausalLM.from_pretrained(a.model_dir, gguf_file=a.gguf, dtype=torch.float32)
    lm = CachedCausalLM(AsyncTransformer(hf, tok))
    times = []
    for rep in range(a.reps):
        t0 = time.time()
        asyncio.run(smc_standard(ShortWords(lm, "The Fed says", a.tokens), a.particles))
        times.append(time.time() - t0)
        print(json.dumps({"rep": rep, "llamppl_task_s": round(times[-1], 2)}), flush=True)
    print(json.dumps({"llamppl_task_s_median": round(statistics.median(times), 2)}))


if __name__ == "__main__":
    main()
