"""Calibration files -> seeded token windows, and the errors that name the culprit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from camera_vllm.compress.calibrate import CalibrationError, CalibSpec, read_documents, tokenize_calibration
from camera_vllm.testing.tiny_models import build_tokenizer

TEXT = "To be, or not to be, that is the question. " * 40


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _stream(tok, docs: list[str]) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return out


def _is_window(stream: list[int], window: list[int]) -> bool:
    n = len(window)
    return any(stream[i : i + n] == window for i in range(len(stream) - n + 1))


def test_text_file_windows_are_seeded_slices_of_the_stream(tok, tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text(TEXT)
    spec = CalibSpec(num_seqs=5, seq_len=24, seed=7)
    ids = tokenize_calibration([f], tok, spec)
    assert ids.shape == (5, 24) and ids.dtype == torch.int64
    stream = _stream(tok, [TEXT])
    assert all(_is_window(stream, row.tolist()) for row in ids)
    assert torch.equal(ids, tokenize_calibration([f], tok, spec))
    other = tokenize_calibration([f], tok, CalibSpec(num_seqs=5, seq_len=24, seed=8))
    assert not torch.equal(ids, other)


def test_jsonl_documents_are_joined_with_eos(tok, tmp_path: Path) -> None:
    f = tmp_path / "docs.jsonl"
    docs = ["first document about foxes. " * 5, "second one, with dogs! " * 5]
    f.write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)) + "\n\n")
    assert read_documents([f]) == docs
    n = len(_stream(tok, docs))
    ids = tokenize_calibration([f], tok, CalibSpec(num_seqs=3, seq_len=n, seed=0))
    # seq_len == stream length: the only window is the whole stream, EOS between documents.
    assert ids[0].tolist() == _stream(tok, docs)
    assert (ids[0] == tok.eos_token_id).sum() == 2


def test_custom_text_key_and_forced_format(tok, tmp_path: Path) -> None:
    f = tmp_path / "data.txt"  # .txt suffix, JSON-lines content
    f.write_text(json.dumps({"body": TEXT}) + "\n")
    assert read_documents([f], fmt="jsonl", text_key="body") == [TEXT]
    assert read_documents([f], fmt="text") == [f.read_text()]


@pytest.mark.parametrize(
    "content, fmt, message",
    [
        ("", "text", "has no text"),
        ("   \n\n", "text", "has no text"),
        ('{"text": "x"}\n{not json}\n', "jsonl", ":2: not valid JSON"),
        ('{"body": "x"}\n', "jsonl", ":1: record has no 'text' field"),
        ('{"text": 3}\n', "jsonl", "is not a string"),
    ],
)
def test_bad_files_name_the_file(tmp_path: Path, content: str, fmt: str, message: str) -> None:
    f = tmp_path / "bad_calib.data"
    f.write_text(content)
    with pytest.raises(CalibrationError) as err:
        read_documents([f], fmt=fmt)
    assert "bad_calib.data" in str(err.value) and message in str(err.value)


def test_missing_and_too_short(tok, tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="nope.txt: calibration file not found"):
        read_documents([tmp_path / "nope.txt"])
    with pytest.raises(CalibrationError, match="no calibration files"):
        read_documents([])
    f = tmp_path / "short.txt"
    f.write_text("just a few words")
    with pytest.raises(
        CalibrationError, match=r"too short: \d+ tokens in .*short.txt; need at least seq_len=500"
    ):
        tokenize_calibration([f], tok, CalibSpec(num_seqs=1, seq_len=500))


def test_seq_len_bounded_by_the_model(tok, tmp_path: Path) -> None:
    f = tmp_path / "a.txt"
    f.write_text(TEXT * 10)
    with pytest.raises(CalibrationError, match="exceeds the model's max_position_embeddings 64"):
        tokenize_calibration([f], tok, CalibSpec(num_seqs=1, seq_len=65), max_positions=64)
    ids = tokenize_calibration([f], tok, CalibSpec(num_seqs=2), max_positions=64)
    assert ids.shape == (2, 64)  # default seq_len = min(2048, max_position_embeddings)
    with pytest.raises(ValueError, match="num_seqs"):
        CalibSpec(num_seqs=0)
