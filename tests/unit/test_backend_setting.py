"""CAMERA_VLLM_BACKEND: the served expert backend setting and its errors."""

from __future__ import annotations

import pytest

from camera_vllm.vllm_plugin.backend import BACKEND_ENV, BACKENDS, expert_backend, prune_on_slabs


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


@pytest.mark.parametrize(
    ("setting", "device", "want"),
    [
        ("", "cuda", True),
        ("", "cpu", False),
        ("cpu", "cpu", False),
        ("triton", "cpu", True),
        ("reference", "cpu", True),
        ("triton", "cuda", True),
    ],
)
def test_prune_layers_run_on_the_slab_kernels_off_cpu_or_when_forced(monkeypatch, setting, device, want):
    monkeypatch.setenv(BACKEND_ENV, setting)
    assert prune_on_slabs(device) is want


def test_cpu_backend_off_cpu_is_refused_for_prune_layers(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "cpu")
    with pytest.raises(ValueError, match="CAMERA_VLLM_BACKEND=cpu.*cuda"):
        prune_on_slabs("cuda")
