"""lm-eval's ``local-completions`` against a live ``vllm serve`` on a CAMERA-P checkpoint.

The repo's task templates (``bench/eval``) run on a handful of documents built by the
repo's data builder from a paragraph here, through the benchmark's own runner
(``bench/lm_eval_run.py``).  What lm-eval reports is checked against the server itself:
every loglikelihood equals the sum of the continuation's token logprobs from a plain
``/v1/completions`` echo request on the text (server-side tokenisation, offsets from the
server), and every accuracy and the perplexity follow from those numbers.
"""

from __future__ import annotations

import json
import math
import sys
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "eval"))
import build_data  # noqa: E402
import lm_eval_run  # noqa: E402

ARCH = "qwen3_moe"
CONTEXT_CHARS = 100
LASTWORD_DOCS, CLOZE_DOCS = 4, 3
TEXT = (
    "The river runs past the old mill and under the stone bridge. Children play on its banks "
    "in the long summer evenings, and their parents watch from the shade of the willows. "
    "In autumn the leaves fall into the water and drift slowly towards the sea. The miller "
    "grinds the grain that the farmers bring down from the hills. His wheel turns day and "
    "night while the water is high. When winter comes the river freezes along its edges, "
    "and the mill stands silent under the snow. Travellers cross the bridge on their way "
    "to the market town. They stop at the inn to warm their hands by the fire. The innkeeper "
    "tells them stories of floods that swept the valley long ago. In spring the ice breaks "
    "and the water rises again, brown and loud with melted snow. The miller repairs his "
    "wheel and waits for the first carts of the year. Swallows return to nest beneath the "
    "arches of the bridge. The children come back to the banks with their nets and jars.\n"
)
TOL = 1e-3


def _direct(url: str, key: str, context: str, continuation: str) -> tuple[float, bool]:
    """(sum of the continuation's token logprobs, all of them greedy) from one echo request."""
    body = {
        "model": lm_eval_run.load_test.SERVED_NAME,
        "prompt": context + continuation,
        "max_tokens": 1,
        "temperature": 0.0,
        "echo": True,
        "logprobs": 1,
    }
    req = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        lp = json.loads(r.read())["choices"][0]["logprobs"]
    n_prompt = len(lp["tokens"]) - 1  # the last token is the one generated
    picked = [i for i in range(n_prompt) if lp["text_offset"][i] >= len(context)]
    assert picked, f"no continuation tokens for {continuation!r}"
    assert "".join(lp["tokens"][i] for i in picked) == continuation
    total = sum(lp["token_logprobs"][i] for i in picked)
    greedy = all(lp["token_logprobs"][i] >= max(lp["top_logprobs"][i].values()) - 1e-6 for i in picked)
    return total, greedy


@pytest.fixture(scope="module")
def served(checkpoints, ckpt_root: Path):
    _, pruned = checkpoints(ARCH)
    server = lm_eval_run.serve(pruned, ckpt_root / "lm-eval-serve.log", eager=True, max_num_seqs=4)
    try:
        yield server, pruned
    finally:
        assert server.stop() == []


def test_task_builders_are_deterministic_and_well_formed() -> None:
    a = build_data.lastword_docs(TEXT, LASTWORD_DOCS, context_chars=CONTEXT_CHARS)
    assert a == build_data.lastword_docs(TEXT, LASTWORD_DOCS, context_chars=CONTEXT_CHARS)
    for d in a:
        assert TEXT.find(d["context"] + " " + d["target"]) != -1 and d["target"].isalpha()
    c = build_data.cloze_docs(TEXT, CLOZE_DOCS, context_chars=CONTEXT_CHARS)
    assert c == build_data.cloze_docs(TEXT, CLOZE_DOCS, context_chars=CONTEXT_CHARS)
    for d in c:
        assert len(d["choices"]) == build_data.CHOICES == len(set(d["choices"]))
        assert TEXT.find(d["context"] + d["choices"][d["label"]]) != -1
    assert build_data.cloze_docs(TEXT, CLOZE_DOCS, seed=7, context_chars=CONTEXT_CHARS) != c
    with pytest.raises(ValueError, match="fewer than"):
        build_data.lastword_docs(TEXT, 10_000, context_chars=CONTEXT_CHARS)


def test_repo_tasks_have_templates_and_data_builders(tmp_path: Path) -> None:
    names = lm_eval_run.task_names()
    assert names and all(n.startswith(("camera_lastword_", "camera_cloze_")) for n in names)
    domains = {n.removeprefix("camera_lastword_").removeprefix("camera_cloze_") for n in names}
    # The builder writes exactly the files the YAMLs read (same names, same relative paths).
    files = build_data.build(tmp_path, lastword=2, cloze=2, domains=dict.fromkeys(domains, TEXT))
    assert set(files) == set(names)
    for n in names:
        text = (lm_eval_run.TASK_DIR / f"{n}.yaml").read_text()
        kind = "lastword" if "lastword" in n else "cloze"
        assert f"include: _{kind}_template_yaml" in text and f"task: {n}" in text
        rel = files[n].relative_to(tmp_path)
        assert f"test: {build_data.CACHE.relative_to(build_data.REPO) / rel}" in text


def test_docs_section_is_replaced_in_place(tmp_path: Path) -> None:
    rows = [
        {
            "task": "camera_lastword_x",
            "metric": m,
            "value": v,
            "stderr": 0.01,
            "n": 5,
            "checkpoint": {"method": "dense", "setting": "uncompressed (fp32)", "path": "m"},
            "commit": "abc",
            "dirty": False,
        }
        for m, v in (("acc", 0.4), ("perplexity", 12.5))
    ]
    doc, png = tmp_path / "quality.md", tmp_path / "eval.png"
    doc.write_text("# Quality\n\nthe perplexity table\n")
    lm_eval_run.write_docs(rows, {"harness": "lm-eval x"}, doc, png)
    rows[0]["value"] = 0.6
    lm_eval_run.write_docs(rows, {"harness": "lm-eval x"}, doc, png)
    text = doc.read_text()
    assert text.startswith("# Quality\n\nthe perplexity table\n")
    assert text.count(lm_eval_run.SECTION_BEGIN) == 1 and text.count(lm_eval_run.SECTION_END) == 1
    assert "| dense | uncompressed (fp32) | 0.600 ± 0.010 | 12.5 ± 0.0 |" in text and "0.400" not in text
    assert png.stat().st_size > 0


@pytest.mark.vllm
def test_lm_eval_local_completions_matches_the_server(served, tmp_path: Path) -> None:
    server, ckpt = served
    last = build_data.write_jsonl(
        tmp_path / "lastword.jsonl",
        build_data.lastword_docs(TEXT, LASTWORD_DOCS, context_chars=CONTEXT_CHARS),
    )
    cloze = build_data.write_jsonl(
        tmp_path / "cloze.jsonl", build_data.cloze_docs(TEXT, CLOZE_DOCS, context_chars=CONTEXT_CHARS)
    )
    tasks = [
        lm_eval_run.task_config("lastword", "tiny_lastword", last),
        lm_eval_run.task_config("cloze", "tiny_cloze", cloze),
    ]
    out = lm_eval_run.evaluate(
        server.url, lm_eval_run.load_test.SERVED_NAME, ckpt, tasks, include_path=None, log_samples=True
    )
    assert out["n-samples"]["tiny_lastword"]["effective"] == LASTWORD_DOCS
    assert out["n-samples"]["tiny_cloze"]["effective"] == CLOZE_DOCS

    # Last word: loglikelihood and greediness of each document, then acc and perplexity.
    samples = out["samples"]["tiny_lastword"]
    assert len(samples) == LASTWORD_DOCS
    lls, greedy = [], []
    for s in samples:
        (ctx, cont), (ll, is_greedy) = s["arguments"][0], s["filtered_resps"][0]
        assert ctx == s["doc"]["context"] and cont == " " + s["doc"]["target"]
        want_ll, want_greedy = _direct(server.url, server.api_key, ctx, cont)
        assert abs(ll - want_ll) <= TOL, (cont, ll, want_ll)
        assert bool(is_greedy) == want_greedy
        lls.append(want_ll)
        greedy.append(want_greedy)
    res = out["results"]["tiny_lastword"]
    assert res["acc,none"] == pytest.approx(sum(greedy) / len(greedy))
    assert res["perplexity,none"] == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=TOL)

    # Cloze: every choice's loglikelihood, then acc and acc_norm (by characters, as lm-eval does).
    samples = out["samples"]["tiny_cloze"]
    assert len(samples) == CLOZE_DOCS
    hits = hits_norm = 0
    for s in samples:
        choices, label = s["doc"]["choices"], s["doc"]["label"]
        assert all(a[0] == s["doc"]["context"] for a in s["arguments"])
        assert [a[1] for a in s["arguments"]] == choices  # empty delimiter: choices keep their spacing
        want = [_direct(server.url, server.api_key, s["doc"]["context"], c)[0] for c in choices]
        got = [r[0] for r in s["filtered_resps"]]
        assert all(abs(g - w) <= TOL for g, w in zip(got, want)), (got, want)
        hits += max(range(len(want)), key=want.__getitem__) == label
        norm = [w / len(c) for w, c in zip(want, choices)]
        hits_norm += max(range(len(norm)), key=norm.__getitem__) == label
    res = out["results"]["tiny_cloze"]
    assert res["acc,none"] == pytest.approx(hits / CLOZE_DOCS)
    assert res["acc_norm,none"] == pytest.approx(hits_norm / CLOZE_DOCS)

    # The rows the benchmark writes: one per (task, metric), values in range, the right counts.
    rows = {(r["task"], r["metric"]): r for r in lm_eval_run.result_rows(out)}
    assert set(rows) == {
        ("tiny_lastword", "acc"),
        ("tiny_lastword", "perplexity"),
        ("tiny_cloze", "acc"),
        ("tiny_cloze", "acc_norm"),
    }
    for (task, metric), r in rows.items():
        assert r["n"] == (LASTWORD_DOCS if task == "tiny_lastword" else CLOZE_DOCS)
        assert (r["value"] > 1.0) if metric == "perplexity" else (0.0 <= r["value"] <= 1.0)
        assert r["stderr"] is None or r["stderr"] >= 0.0
