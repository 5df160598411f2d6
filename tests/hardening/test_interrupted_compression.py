"""A compression killed with SIGKILL never leaves a checkpoint that looks valid, and a rerun succeeds.

The output directory is published by one rename of a validated temporary directory
(``compress/writer.py``).  Killed runs are real processes killed with SIGKILL: from
outside while the CLI is scoring (prune) or while its temporary directory exists
(quantize: the writer is open for the whole streamed run), and from inside at exact
writer steps (``run_cli_killed_at.py``).  The reruns here happen in this process, so
they see the killed run's leftovers exactly as a user's next command would.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hardening_catalogue import Q_ARGS

from camera_vllm.cli import main
from camera_vllm.compress.writer import remove_stale_temp_dirs
from camera_vllm.format import names
from camera_vllm.format.validate import validate

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 180


def _calib_args(calib: Path) -> list[str]:
    return ["--calib", str(calib), "--num-seqs", "4", "--seq-len", "32", "--seed", "1", "--device", "cpu"]


def _prune_args(model: Path, out: Path, calib: Path) -> list[str]:
    return ["prune", str(model), "--ratio", "0.4", "--out", str(out), *_calib_args(calib)]


def _quantize_args(model: Path, out: Path, calib: Path) -> list[str]:
    bits = ",".join(str(b) for b in Q_ARGS["bits"])
    fractions = ",".join(str(f) for f in Q_ARGS["fractions"])
    return [
        "quantize", str(model), "--out", str(out), "--bits", bits, "--fractions", fractions,
        "--group-size", str(Q_ARGS["group_size"]), "--method", Q_ARGS["method"],
        "--prune-ratio", str(Q_ARGS["prune_ratio"]), *_calib_args(calib),
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _siblings(out: Path) -> list[Path]:
    """Temporary/old directories of ``out`` (``.<name>.tmp-<pid>`` / ``.<name>.old-<pid>``)."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-\d+$")
    return sorted(p for p in out.parent.iterdir() if pattern.match(p.name))


def _kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def _assert_rerun_publishes(args: list[str], out: Path, capsys) -> None:
    assert main(args) == 0, capsys.readouterr().err
    report = validate(out)
    assert report.ok, str(report)
    assert not (out / names.INCOMPLETE_MARKER).exists()
    assert _siblings(out) == [], "the rerun must remove what the killed run left"


def test_prune_killed_while_scoring(source: Path, calib_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "p"
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "camera_vllm.cli", *_prune_args(source, out, calib_file)],
            stdout=subprocess.DEVNULL, stderr=err, env=_env(),
        )  # fmt: skip
        _kill_when(proc, lambda: b"CAMERA layers" in log.read_bytes(), "the layer progress bar")
    assert not out.exists()
    assert not validate(out).ok
    _assert_rerun_publishes(_prune_args(source, out, calib_file), out, capsys)


def test_quantize_killed_with_its_temporary_directory(
    source: Path, calib_file: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "q"
    proc = subprocess.Popen(
        [sys.executable, "-m", "camera_vllm.cli", *_quantize_args(source, out, calib_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
    )  # fmt: skip
    tmp = tmp_path / f".q.tmp-{proc.pid}"
    _kill_when(proc, lambda: (tmp / names.INCOMPLETE_MARKER).is_file(), "the temporary directory")
    assert not out.exists()
    assert _siblings(out) == [tmp]
    report = validate(tmp)
    assert not report.ok and f"{names.INCOMPLETE_MARKER}: present" in str(report)
    _assert_rerun_publishes(_quantize_args(source, out, calib_file), out, capsys)


@pytest.mark.parametrize("point", ["after-shard", "marker-removed", "old-moved"])
def test_prune_killed_inside_the_writer(
    point: str, source: Path, calib_file: Path, good_p: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "p"
    args = _prune_args(source, out, calib_file)
    if point == "old-moved":
        shutil.copytree(good_p, out)  # an earlier checkpoint that --overwrite replaces
        args.append("--overwrite")
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "run_cli_killed_at.py"), point, *args, "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
    )  # fmt: skip
    output, _ = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL, output
    assert not out.exists()
    tmp = tmp_path / f".p.tmp-{proc.pid}"
    left = _siblings(out)
    assert tmp in left
    if point == "after-shard":
        assert (tmp / "shard-00000.safetensors").is_file() and not (tmp / names.CONFIG_FILE).exists()
        assert not validate(tmp).ok
    elif point == "marker-removed":
        # Complete but never published: it sits only under the hidden temporary name.
        assert not (tmp / names.INCOMPLETE_MARKER).exists() and (tmp / names.CONFIG_FILE).is_file()
    else:
        assert left == [tmp_path / f".p.old-{proc.pid}", tmp]
        assert validate(left[0]).ok  # the replaced checkpoint is still whole, under its hidden name
    if point == "old-moved":
        args.remove("--overwrite")  # the old directory is no longer at --out: a plain run must work
    _assert_rerun_publishes(args, out, capsys)


def test_stale_cleanup_spares_live_processes_and_other_outputs(tmp_path: Path) -> None:
    out = tmp_path / "ckpt"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = [_dead_pid(), _dead_pid()]
        live = tmp_path / f".ckpt.tmp-{sleeper.pid}"
        stale_tmp, stale_old = tmp_path / f".ckpt.tmp-{dead[0]}", tmp_path / f".ckpt.old-{dead[0]}"
        other_host = tmp_path / f".ckpt.tmp-{dead[1]}"
        other_output = tmp_path / f".ckpt2.tmp-{dead[0]}"
        for d in (live, stale_tmp, stale_old, other_host, other_output):
            d.mkdir()
            (d / names.INCOMPLETE_MARKER).write_text("camera-vllm: this checkpoint is being written\n")
        (other_host / names.INCOMPLETE_MARKER).write_text(
            f"camera-vllm: this checkpoint is being written by pid {dead[1]} on host another-host.example\n"
        )
        assert sorted(remove_stale_temp_dirs(out)) == sorted([stale_tmp, stale_old])
        assert live.is_dir() and other_host.is_dir() and other_output.is_dir()
        assert not stale_tmp.exists() and not stale_old.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    return int(proc.stdout)


def test_writer_never_publishes_an_invalid_checkpoint(good_p: Path, tmp_path: Path) -> None:
    """A writer whose tensors disagree with its quantization_config raises and publishes nothing."""
    import json

    from hardening_catalogue import E, load_tensors

    from camera_vllm.compress.writer import CheckpointWriter
    from camera_vllm.format.schema import CameraFormatError, CameraQuantConfig

    cfg = json.loads((good_p / names.CONFIG_FILE).read_text())
    qc = CameraQuantConfig.from_json_dict(cfg.pop("quantization_config"))
    tensors = load_tensors(good_p)
    dropped = E(1, 0, 2, "weight")
    del tensors[dropped]
    out = tmp_path / "out"
    with pytest.raises(CameraFormatError, match=f"tensor {re.escape(dropped)}: missing"):
        with CheckpointWriter(out) as writer:
            for name in sorted(tensors):
                writer.add(name, tensors[name])
            writer.commit(source_dir=good_p, config=cfg, quant_config=qc)
    assert not out.exists() and _siblings(out) == []
    # The same writer with every tensor publishes a directory that validates.
    tensors = load_tensors(good_p)
    with CheckpointWriter(out) as writer:
        for name in sorted(tensors):
            writer.add(name, tensors[name])
        assert writer.commit(source_dir=good_p, config=cfg, quant_config=qc) == out.resolve()
    assert validate(out).ok and _siblings(out) == []
