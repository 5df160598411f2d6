"""bench/quality.py: merging recomputed rows into the table, and the generated CAMERA-Q vs MC-like verdict."""

from __future__ import annotations

import json

import quality  # bench/quality.py (pytest's pythonpath has bench/)


def _row(method: str, setting: str, ppl: float, commit: str) -> dict:
    return {
        "method": method,
        "setting": setting,
        "ppl_reference": ppl,
        "ppl_served": ppl,
        "expert_bytes": 100,
        "commit": commit,
    }


def test_merge_keeps_old_rows_in_table_order_and_records_commits(tmp_path):
    done = {
        ("dense", "uncompressed (fp32)"): _row("dense", "uncompressed (fp32)", 60.0, "old"),
        ("camera-q gptq", "2.25 bpw"): _row("camera-q gptq", "2.25 bpw", 62.0, "old"),
        ("gone", "x"): _row("gone", "x", 1.0, "old"),
    }
    new = [_row("mc-like gptq", "2.25 bpw", 63.0, "new")]
    out = tmp_path / "q.json"
    quality._write_json(out, {"commit": "new", "dirty": False}, {"windows": 32}, new, done)
    data = json.loads(out.read_text())
    keys = [(r["method"], r["setting"]) for r in data["rows"]]
    assert keys == [
        ("dense", "uncompressed (fp32)"),
        ("camera-q gptq", "2.25 bpw"),
        ("mc-like gptq", "2.25 bpw"),
    ]
    assert (
        data["row_commits"] == ["new", "old"] and data["stamp"]["commit"] == "new" and data["windows"] == 32
    )


def test_verdict_counts_wins_both_ways():
    rows = [
        _row("camera-q gptq", "2.25 bpw", 62.0, "c"),
        _row("mc-like gptq", "2.25 bpw", 63.0, "c"),
        _row("camera-q rtn", "2.5 bpw", 64.0, "c"),
        _row("mc-like rtn", "2.5 bpw", 63.0, "c"),
        _row("camera-q rtn", "2.25 bpw", 64.0, "c"),
        _row("mc-like rtn", "2.25 bpw", 64.1, "c"),
        _row("uniform gptq 2-bit", "2.25 bpw (g128)", 61.5, "c"),
    ]
    text = "\n".join(quality._mc_verdict(rows))
    assert (
        "2.25 bpw, GPTQ: CAMERA-Q 62.00" in text
        and "CAMERA-Q wins; uniform 2-bit GPTQ at the same bytes: 61.50" in text
    )
    assert "2.5 bpw, RTN: CAMERA-Q 64.00" in text and "MC-like wins" in text
    assert "2.25 bpw, RTN: CAMERA-Q 64.00" in text and "about equal" in text
    assert "CAMERA-Q wins 1, MC-like wins 1, the rest" in text
    assert quality._mc_verdict(rows[:1]) == []
