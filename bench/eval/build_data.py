"""Documents of the repo's lm-eval tasks, built deterministically from held-out text.

Two tasks per text domain, both scored by loglikelihood only (what a served model's
``/v1/completions`` echo + logprobs gives):

* ``camera_lastword_<domain>`` (LAMBADA-style): a passage cut right before a word that
  closes a clause (followed by punctuation); the target is that word with its leading
  space.  Metrics: ``acc`` (the word is the greedy continuation) and ``perplexity``
  (per-word, ``exp(-mean log p(word | passage))``).
* ``camera_cloze_<domain>`` (multiple-choice cloze): a passage that ends at a sentence
  end; the choices are the true next sentence and ``CHOICES - 1`` distractor sentences of
  similar length from elsewhere in the same held-out text.  Metrics: ``acc``, ``acc_norm``.

Text is kept as it is (line breaks, indentation): the models were trained on raw text.
Every document is a pure function of (held-out text, seed, counts), so a cache of the
jsonl files can be rebuilt anywhere.

    python bench/eval/build_data.py [--out bench/.cache/eval] [--lastword 500] [--cloze 250]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE = REPO / "bench" / ".cache" / "eval"
CONTEXT_CHARS = 480  # ~140 tokens of the benchmark tokenizer: inside the trained sequence length
CHOICES = 4
SEED = 1234

# A lowercase word of 3+ letters after a space, closing a clause: the LAMBADA-like target.
_LAST_WORD = re.compile(r"(?<=\S )([A-Za-z][a-z]{2,})(?=[.,;:!?])")
# Sentence ends: ., ! or ? followed by whitespace.
_SENTENCE_END = re.compile(r"[.!?](?=\s)")


def heldout_domains() -> dict[str, str]:
    """Held-out text of each domain the benchmark data provides (``bench/text_data.py``).

    ``shakespeare``, ``kjv`` and ``python_docs``: whole works, books and doc directories
    no benchmark model was trained on.
    """
    sys.path.insert(0, str(REPO / "bench"))
    import text_data

    return text_data.heldout_texts()


def _context_before(text: str, end: int, chars: int) -> str:
    """``text[start:end]``, starting at the first line start at or after ``end - chars``."""
    start = max(0, end - chars)
    if start > 0:
        nl = text.find("\n", start, end)
        start = nl + 1 if nl != -1 else start
    return text[start:end].lstrip()


def lastword_docs(text: str, count: int, seed: int = SEED, context_chars: int = CONTEXT_CHARS) -> list[dict]:
    """``count`` LAMBADA-style documents ``{"context", "target"}`` (target without its space)."""
    rng = random.Random(seed)
    spots = [m for m in _LAST_WORD.finditer(text) if m.start() >= context_chars]
    if len(spots) < count:
        raise ValueError(f"held-out text has {len(spots)} last-word candidates, fewer than {count}")
    docs = []
    for m in rng.sample(spots, count):
        # The space before the word is lm-eval's target delimiter, not part of the context.
        context = _context_before(text, m.start() - 1, context_chars)
        docs.append({"context": context, "target": m.group(1)})
    return docs


def _sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) of each sentence: from the first non-space after a sentence end to the next end."""
    spans, start = [], 0
    for m in _SENTENCE_END.finditer(text):
        end = m.end()
        spans.append((start, end))
        start = end
    return spans


def _usable(sentence: str) -> bool:
    words = sentence.split()
    # Stage directions ([Exit.]), speaker names and one-word lines carry no continuation to guess.
    return (
        5 <= len(words) <= 40
        and len(sentence) <= 240
        and not any(c in sentence for c in "[]_")
        and all(len(line.split()) >= 3 for line in sentence.splitlines() if line.strip())
    )


def cloze_docs(
    text: str,
    count: int,
    seed: int = SEED,
    choices: int = CHOICES,
    context_chars: int = CONTEXT_CHARS,
) -> list[dict]:
    """``count`` cloze documents ``{"context", "choices", "label"}``; choices keep their leading space."""
    rng = random.Random(seed)
    spans = _sentences(text)
    # (leading whitespace, sentence body) of every sentence.
    parts = []
    for s, e in spans:
        raw = text[s:e]
        body = raw.lstrip()
        parts.append((raw[: len(raw) - len(body)], body))
    usable = [i for i, (_, body) in enumerate(parts) if _usable(body) and spans[i][0] >= context_chars]
    if len(usable) < count + choices:
        raise ValueError(f"held-out text has {len(usable)} usable sentences, fewer than {count + choices}")
    by_len = sorted(usable, key=lambda i: len(parts[i][1]))
    rank = {i: r for r, i in enumerate(by_len)}
    docs = []
    for i in rng.sample(usable, count):
        lead, true = parts[i]
        # Distractors: sentences of neighbouring length (so length alone does not give the answer).
        r = rank[i]
        pool = [j for j in by_len[max(0, r - 50) : r + 51] if parts[j][1] != true]
        picked = rng.sample(pool, choices - 1)
        options = [true] + [parts[j][1] for j in picked]
        order = list(range(choices))
        rng.shuffle(order)
        docs.append(
            {
                "context": _context_before(text, spans[i][0], context_chars).rstrip(),
                "choices": [lead + options[k] for k in order],
                "label": order.index(0),
            }
        )
    return docs


def write_jsonl(path: Path, docs: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    return path


def build(
    out: Path = CACHE,
    lastword: int = 500,
    cloze: int = 250,
    seed: int = SEED,
    domains: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Write ``lastword_<domain>.jsonl`` and ``cloze_<domain>.jsonl`` into ``out``; task name -> file."""
    domains = heldout_domains() if domains is None else domains
    files = {}
    for name, text in domains.items():
        files[f"camera_lastword_{name}"] = write_jsonl(
            out / f"lastword_{name}.jsonl", lastword_docs(text, lastword, seed)
        )
        files[f"camera_cloze_{name}"] = write_jsonl(
            out / f"cloze_{name}.jsonl", cloze_docs(text, cloze, seed)
        )
    return files


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=CACHE)
    p.add_argument("--lastword", type=int, default=500, help="documents per domain")
    p.add_argument("--cloze", type=int, default=250, help="documents per domain")
    p.add_argument("--seed", type=int, default=SEED)
    args = p.parse_args(argv)
    for task, path in build(args.out, args.lastword, args.cloze, args.seed).items():
        print(f"{task}: {path}")


if __name__ == "__main__":
    main()
