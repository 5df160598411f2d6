"""The compressor's model argument: a local directory or a Hugging Face hub id (cache first).

Uses ``huggingface_hub`` (already a transformers and vLLM dependency) so the cache, tokens,
``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` behave as in every other Hugging Face tool.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from ..format import names
from ..format.validate import weights_present

log = logging.getLogger(__name__)

#: What a compression reads from a hub repository: config, tokenizer and generation files,
#: and the safetensors weights (never .bin/.pt duplicates of them).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHE_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+$")


def hub_id_of(path: Path) -> str | None:
    """``ORG/NAME`` when ``path`` is a snapshot directory of the Hugging Face cache, else None."""
    m = _CACHE_SNAPSHOT.search(path.resolve().as_posix())
    return f"{m.group('org')}/{m.group('name')}" if m else None


def resolve_model(model: str | Path, revision: str | None = None) -> Path:
    """A local directory holding ``model``: the directory itself, or the hub id's snapshot.

    A hub id is looked up in the local cache first (no network); when it is not there
    (or only partly, e.g. the config without the weights) it is downloaded, unless
    ``HF_HUB_OFFLINE`` is set, in which case the error says how to fetch it.

    :raises FileNotFoundError: naming the argument, for anything that is neither.
    """
    path = Path(model)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"--revision {revision} applies to hub ids; {model} is a local directory")
        return path
    text = str(model)
    if path.exists() or not _HUB_ID.match(text):
        raise FileNotFoundError(f"{model}: not a model directory, and not a hub id of the form ORG/NAME")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        cached = Path(
            snapshot_download(text, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True)
        )
    except LocalEntryNotFoundError as err:
        # Incomplete per the cached tree listing (it names files we do not read, e.g. README
        # images): usable when what a compression reads is all there.
        partial = getattr(err, "snapshot_path", None)
        cached = Path(partial) if partial else None
    if cached is not None and (cached / names.CONFIG_FILE).is_file() and weights_present(cached):
        return cached
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"{model}{'@' + revision if revision else ''} is not (completely) in the local "
            "Hugging Face cache "
            f"and HF_HUB_OFFLINE is set: fetch it first (hf download {model}) or unset HF_HUB_OFFLINE"
        )
    log.info("downloading %s from the Hugging Face hub (config, tokenizer, safetensors weights)", model)
    try:
        return Path(snapshot_download(text, revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # noqa: BLE001 - HTTP, network and auth errors alike: say which model, keep the cause
        raise FileNotFoundError(f"{model}: could not download it from the Hugging Face hub ({err})") from None
