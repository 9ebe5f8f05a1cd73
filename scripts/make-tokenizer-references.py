#!/usr/bin/env python3
"""Make tests/fixtures/tokenizers/: corpus.json (the strings) and, for each real tokenizer fetched by
scripts/fetch-tokenizers.sh into models/tokenizers/<name>/, <name>.reference.json with
  - the Python `tokenizers` ids of every corpus string, encode(s, add_special_tokens=True) (the
    tokenizer's own post-processor: BOS where it adds one) and add_special_tokens=False;
  - the bytes of every vocabulary entry (byte-level BPE: through the inverse byte-to-unicode map;
    SentencePiece-style: "\u2581" -> " ", "<0xNN>" -> the byte NN; added tokens: their UTF-8 content),
    as FNV-1a 64 hashes (whole table and per block of 4096 ids; see README) plus explicit hex for a sample
    of ids, and the whole table as <name>.vocab-bytes.txt.gz (one line per id: lowercase hex, gzip with
    mtime 0);
  - stop tokens (eos_token of tokenizer_config.json, and the end-of-turn tokens the family uses);
  - `transformers` apply_chat_template(..., tokenize=False) for a few conversations (errors recorded).

Dependencies (versions used): python 3.11.7, tokenizers 0.23.3, transformers 5.24.0, jinja2 3.1.6
(torch is not needed). Commands:
    scripts/fetch-tokenizers.sh
    /tmp/v12/bin/python scripts/make-tokenizer-references.py
Deterministic (same bytes on re-run).
"""
import gzip
import hashlib
import io
import json
import os
import sys

import tokenizers
import transformers
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "models", "tokenizers")
OUT = os.path.join(ROOT, "tests", "fixtures", "tokenizers")
NAMES = ["llama3", "qwen3", "gemma3", "llama2"]
BLOCK = 4096          # ids per block hash
SAMPLE_EVERY = 997    # explicit hex for every id divisible by this, plus the first 512 and all added tokens

FNV_OFFSET, FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3

# End-of-turn tokens by family (from their generation_config.json files, which the npm packages do not ship).
KNOWN_STOPS = {
    "llama3": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    "qwen3": ["<|im_end|>", "<|endoftext|>"],
    "gemma3": ["<eos>", "<end_of_turn>"],
    "llama2": ["</s>"],
}

transformers.utils.logging.set_verbosity_error()


def fnv1a(data, h=FNV_OFFSET):
    for b in data:
        h ^= b
        h = (h * FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return h


def corpus():
    prose = [
        "Hello, world!", "The quick brown fox jumps over the lazy dog.", "It's a dog's life, isn't it?",
        "I'd've thought they'll say we're fine.", "Sequential Monte Carlo steers language models.",
        "Particles are resampled when the effective sample size drops below half.",
        "She said: \"Don't go there.\"", "(parenthesised) [bracketed] {braced} <angled>",
        "e-mail: someone@example.com; url: https://example.org/path?q=1&r=2#frag",
        "ALL CAPS SENTENCE WITH NUMBERS 123", "MiXeD cAsE wOrDs", "end.", "a", "A", "I", "?", "!!!", "...",
        "--", "—em dash— and –en dash–", "“curly quotes” and ‘single’ ones", "¿Qué pasa? ¡Nada!",
    ]
    accents = [
        "naïve café", "déjà vu", "Straße", "ñandú", "Ångström", "crème brûlée", "façade", "Zürich",
        "Ελληνικά γράμματα", "Русский текст", "עברית", "العربية", "हिन्दी", "ไทย", "Tiếng Việt",
        "e\u0301 (e + combining acute)", "\u00e9 (precomposed é)", "ﬁ ligature", "Ⅻ roman", "①②③",
    ]
    cjk = [
        "東京", "日本語のテキスト", "中文文本测试", "한국어 텍스트", "你好，世界！", "これはペンです。",
        "漢字とひらがなとカタカナ", "全角　スペース", "ｆｕｌｌｗｉｄｔｈ", "中文 English 混合",
    ]
    emoji = [
        "🙂", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "❤️", "🇫🇷🇯🇵", "emoji 😀 in text", "🤖🤖🤖",
        "1️⃣ keycap", "👩🏾‍💻 coder", "🧑‍🚀", "😀😃😄😁", "text🙂text",
    ]
    code = [
        "def f(x):\n    return x + 1\n", "fn main() {\n    println!(\"hi\");\n}\n", "int main(void) { return 0; }",
        "for (let i = 0; i < n; i++) { sum += a[i]; }", "SELECT * FROM t WHERE id = 42;",
        "<div class=\"a\">text</div>", "{\"key\": [1, 2, 3], \"nested\": {\"a\": null}}",
        "x = y ** 2 // 3 % 4", "if a && b || !c { }", "#include <stdio.h>", "$ ls -la | grep foo > out.txt",
        "    four spaces indent", "\tone tab indent", "\t\ttwo tabs", "a\\nb (backslash n)", "path\\to\\file",
        "λx. x", "```python\nprint(1)\n```", "// comment\n/* block */", "@decorator\nclass A: pass",
    ]
    ws = [
        " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "a  b", "a   b", "a    b", "a\tb", "a\t\tb",
        "a\nb", "a\n\nb", "a \n b", "trailing space ", "trailing spaces   ", " leading space",
        "  two leading spaces", "   three leading", "\tleading tab", "\nleading newline", "x\u00a0y (nbsp)",
        "x\u2009y (thin space)", "x\u3000y (ideographic space)", "line1\nline2\nline3", "\n\n\n",
        " \t \n", "end with newline\n",
    ]
    digits = [
        "0", "1", "12", "123", "1234", "12345", "123456", "1234567", "12345678901234567890",
        "3.14159", "2.71828", "-42", "+7", "1,000,000", "1.000.000", "10^9", "1e-4", "0x1F", "0b1010",
        "2026-11-27", "12:34:56", "$1,234.56", "50%", "v1.2.3", "No. 9", "٣٤٥ (Arabic-Indic)", "१२३",
        "In 2024, 12% of 1,000 people", "phone 555-0100", "9999999999999999",
    ]
    specials = [
        "<|im_end|>", "<|im_start|>user\nhi<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>", "<s>", "</s>", "<unk>", "<bos>", "<eos>", "<pad>",
        "<start_of_turn>user\nhi<end_of_turn>", "<end_of_turn>", "[INST] hi [/INST]", "<think>\n\n</think>",
        "text<|im_end|>more", "<0x41>", "<|fake_token|>", "< s >",
    ]
    odd = [
        "", ".", ",", "'", "\"", "`", "\\", "\u200b (zero width space)", "\ufeffBOM", "a\u0000b (NUL)",
        "\u2581 (lower one eighth block)", "▁▁", "Ġ (G with dot)", "Ċ", "�", "\U0001F600" * 5, "x" * 100,
        "ab" * 40, " " * 17, "\t" * 5 + "x",
    ]
    base = prose + accents + cjk + emoji + code + ws + digits + specials + odd
    # Combinations, for longer strings mixing the categories.
    combos = []
    for i in range(40):
        parts = [prose[i % len(prose)], accents[(3 * i) % len(accents)], cjk[(5 * i) % len(cjk)],
                 emoji[(7 * i) % len(emoji)], digits[(11 * i) % len(digits)], ws[(13 * i) % len(ws)]]
        combos.append(" ".join(parts[: 2 + i % 5]))
    return base + combos


def vocab_bytes(tok_json):
    model = tok_json["model"]
    vocab = model["vocab"]
    added = {a["id"]: a["content"] for a in tok_json["added_tokens"]}
    size = max(list(vocab.values()) + list(added)) + 1
    bytelevel = model.get("byte_fallback") is not True
    if bytelevel:
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        inv = {chr(c): b for b, c in zip(bs, cs)}
    table = [None] * size
    for s, i in vocab.items():
        if bytelevel:
            table[i] = bytes(inv[c] for c in s)
        elif len(s) == 6 and s.startswith("<0x") and s.endswith(">"):
            table[i] = bytes([int(s[3:5], 16)])
        else:
            table[i] = s.replace("\u2581", " ").encode("utf-8")
    for i, s in added.items():
        table[i] = s.encode("utf-8")
    missing = [i for i, b in enumerate(table) if b is None]
    assert not missing, missing[:10]
    return table, ("byte-level" if bytelevel else "sentencepiece-bpe")


def table_hash(table, lo, hi):
    h = FNV_OFFSET
    for b in table[lo:hi]:
        h = fnv1a(len(b).to_bytes(4, "little"), h)
        h = fnv1a(b, h)
    return f"{h:016x}"


def chat_outputs(name):
    from transformers import AutoTokenizer
    path = os.path.join(SRC, name)
    out = {"class": None, "cases": []}
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        return out, None
    out["class"] = type(tok).__name__
    convs = [
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
    for label, msgs, agp in convs:
        entry = {"name": label, "messages": msgs, "add_generation_prompt": agp}
        try:
            entry["text"] = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=agp)
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {e}"
        out["cases"].append(entry)
    return out, tok


def main():
    os.makedirs(OUT, exist_ok=True)
    strings = corpus()
    assert len(strings) >= 200 and len(set(strings)) == len(strings), (len(strings), len(set(strings)))
    with open(os.path.join(OUT, "corpus.json"), "w", encoding="utf-8") as f:
        json.dump(strings, f, ensure_ascii=False, indent=0)
        f.write("\n")
    for name in sys.argv[1:] or NAMES:
        d = os.path.join(SRC, name)
        if not os.path.exists(os.path.join(d, "tokenizer.json")):
            sys.exit(f"{d}/tokenizer.json is missing: run scripts/fetch-tokenizers.sh first")
        tj = json.load(open(os.path.join(d, "tokenizer.json"), encoding="utf-8"))
        cfg = json.load(open(os.path.join(d, "tokenizer_config.json"), encoding="utf-8"))
        source = open(os.path.join(d, "SOURCE")).read().strip() if os.path.exists(os.path.join(d, "SOURCE")) else None
        tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        table, kind = vocab_bytes(tj)
        enc = []
        for s in strings:
            enc.append([tok.encode(s, add_special_tokens=True).ids, tok.encode(s, add_special_tokens=False).ids])
        chats, hf = chat_outputs(name)
        # transformers' own tokenizer class may rebuild the pipeline: count where it disagrees.
        hf_mismatch = None
        if hf is not None:
            hf_mismatch = [i for i, s in enumerate(strings) if hf(s, add_special_tokens=False)["input_ids"] != enc[i][1]]
        vid = {s: i for s, i in tj["model"]["vocab"].items()}
        vid.update({a["content"]: a["id"] for a in tj["added_tokens"]})
        sample_ids = sorted(set(range(min(512, len(table)))) | set(range(0, len(table), SAMPLE_EVERY))
                            | {a["id"] for a in tj["added_tokens"]})
        ref = {
            "name": name,
            "source": source,
            "versions": {"tokenizers": tokenizers.__version__, "transformers": transformers.__version__},
            "kind": kind,
            "vocab_size": len(table),
            "bos_token": cfg.get("bos_token"), "eos_token": cfg.get("eos_token"),
            "add_bos_token": cfg.get("add_bos_token"),
            "stop_tokens": {"eos_token": cfg.get("eos_token"),
                            "eos_token_id": vid.get(cfg.get("eos_token")),
                            "end_of_turn": {s: vid.get(s) for s in KNOWN_STOPS[name]},
                            "note": "end_of_turn lists the ids of the family's generation_config.json eos "
                                    "tokens (not shipped in the npm package; from the published configs)"},
            "vocab_bytes": {
                "format": "table[i] = bytes of id i alone (no Strip decoder, no leading-space removal); "
                          "hash = FNV-1a 64 over, for each id in order, u32 little-endian length then the bytes",
                "fnv1a64_all": table_hash(table, 0, len(table)),
                "block_size": BLOCK,
                "fnv1a64_blocks": [table_hash(table, lo, min(lo + BLOCK, len(table)))
                                   for lo in range(0, len(table), BLOCK)],
                "sample_hex": {str(i): table[i].hex() for i in sample_ids},
                "full_table_file": f"{name}.vocab-bytes.txt.gz",
            },
            "encode_format": "encodings[k] = [ids with add_special_tokens=True, ids with add_special_tokens=False] "
                             "for corpus.json[k], from tokenizers.Tokenizer.from_file(tokenizer.json)",
            "transformers_tokenizer_mismatches": hf_mismatch,
            "chat_template": chats,
        }
        head = json.dumps(ref, ensure_ascii=False, indent=1)
        with open(os.path.join(OUT, f"{name}.reference.json"), "w", encoding="utf-8") as f:
            f.write(head[:-2] + ',\n "encodings": [\n')
            f.write(",\n".join("  " + json.dumps(e) for e in enc))
            f.write("\n ]\n}\n")
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
            gz.write("".join(b.hex() + "\n" for b in table).encode("ascii"))
        with open(os.path.join(OUT, f"{name}.vocab-bytes.txt.gz"), "wb") as f:
            f.write(buf.getvalue())
        print(f"{name}: {kind}, vocab {len(table)}, chat class {chats['class']}, "
              f"transformers mismatches {None if hf_mismatch is None else len(hf_mismatch)}")


if __name__ == "__main__":
    main()
