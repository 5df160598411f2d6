"""CAMERA_VLLM_BACKEND: the served expert backend setting and its errors."""

from __future__ import annotations

import pytest

from camera_vllm.vllm_plugin.backend import BACKEND_ENV, BACKENDS, expert_backend


def test_unset_or_empty_is_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert expert_backend() == "auto"
    monkeypatch.setenv(BACKEND_ENV, " ")
    assert expert_backend() == "auto"


@pytest.mark.parametrize("value", BACKENDS)
def test_every_backend_is_accepted_in_any_case(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(BACKEND_ENV, value.upper())
    assert expert_backend() == value


def test_a_bad_value_names_the_variable_and_the_choices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match=r"CAMERA_VLLM_BACKEND='cuda'.*auto, triton, cpu, reference"):
        expert_backend()
