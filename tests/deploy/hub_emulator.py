"""A loopback Hugging Face Hub: one model repo served from a local directory, for tests.

Just what huggingface_hub 2.4 calls to find and download a model (``hf_hub_download``,
``snapshot_download``, ``model_info``/``repo_info``, ``list_repo_tree``/``list_repo_files``,
``get_paths_info``, ``HfFileSystem.ls``), answered the way huggingface.co answers:

* ``GET /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}``: model info (``sha``,
  ``siblings`` with ``rfilename``; sizes, blob ids and LFS info with ``?blobs=true``);
* ``GET /api/models/{repo}/tree/{rev}[/{path}]``: the tree listing (one page, no ``Link``);
* ``POST /api/models/{repo}/paths-info/{rev}``: the same entries for the named paths;
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: a regular file answers 200 with ``ETag`` (its
  git blob id), ``X-Repo-Commit`` and ``Content-Length``; an LFS file (``*.safetensors``)
  answers 302 to a separate "CDN" origin, with ``X-Linked-Etag`` (its sha256),
  ``X-Linked-Size`` and ``X-Repo-Commit`` on the redirect, as the Hub does;
* ``GET /lfs/{sha256}`` on the CDN origin: the bytes (``Range`` honoured);
* ``GET /api/agent-harnesses``: an empty registry (huggingface_hub fetches it to build its
  user-agent header).

Missing files answer 404 with ``X-Error-Code: EntryNotFound`` (and ``X-Repo-Commit``), unknown
revisions ``RevisionNotFound``, other repos ``RepoNotFound``, as the Hub does.  Every request
is recorded, in arrival order, as ``(origin, method, path)`` in :attr:`HubEmulator.requests`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

LFS_PATTERNS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass(frozen=True)
class RepoEntry:
    path: str
    data: bytes
    blob_id: str  # git oid of what git stores: the file, or its LFS pointer
    lfs_sha256: str | None

    @property
    def size(self) -> int:
        return len(self.data)

    def tree_json(self) -> dict:
        entry = {"type": "file", "oid": self.blob_id, "size": self.size, "path": self.path}
        if self.lfs_sha256 is not None:
            pointer = _lfs_pointer(self.lfs_sha256, self.size)
            entry["lfs"] = {"oid": self.lfs_sha256, "size": self.size, "pointerSize": len(pointer)}
        return entry


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _entries(root: Path) -> dict[str, RepoEntry]:
    out = {}
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = f.relative_to(root).as_posix()
        data = f.read_bytes()
        if rel.endswith(LFS_PATTERNS):
            sha = hashlib.sha256(data).hexdigest()
            out[rel] = RepoEntry(rel, data, _git_blob_id(_lfs_pointer(sha, len(data))), sha)
        else:
            out[rel] = RepoEntry(rel, data, _git_blob_id(data), None)
    return out


class HubEmulator:
    """Serve ``repo_id`` from ``root`` on 127.0.0.1 (``endpoint``), its LFS files from a second port."""

    def __init__(self, repo_id: str, root: Path, revision: str = "main"):
        self.repo_id, self.revision = repo_id, revision
        self.files = _entries(Path(root))
        self.by_sha = {e.lfs_sha256: e for e in self.files.values() if e.lfs_sha256}
        listing = "\n".join(f"{e.path} {e.blob_id}" for e in self.files.values())
        self.commit = hashlib.sha1(listing.encode()).hexdigest()
        self.requests: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._hub = ThreadingHTTPServer(("127.0.0.1", 0), self._handler("hub"))
        self._cdn = ThreadingHTTPServer(("127.0.0.1", 0), self._handler("cdn"))
        for srv in (self._hub, self._cdn):
            srv.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._hub.server_address[1]}"
        self.cdn = f"http://127.0.0.1:{self._cdn.server_address[1]}"
        self._threads = [
            threading.Thread(target=srv.serve_forever, daemon=True) for srv in (self._hub, self._cdn)
        ]

    # -- lifecycle ----------------------------------------------------------------------------------
    def __enter__(self) -> HubEmulator:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        for srv in (self._hub, self._cdn):
            srv.shutdown()
            srv.server_close()

    # -- what was asked -----------------------------------------------------------------------------
    def log(self) -> list[tuple[str, str, str]]:
        with self._lock:
            return list(self.requests)

    def _record(self, origin: str, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((origin, method, path))

    # -- answers ------------------------------------------------------------------------------------
    def _model_info(self, query: dict) -> dict:
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = []
        for e in self.files.values():
            s = {"rfilename": e.path}
            if blobs:
                s.update(size=e.size, blobId=e.blob_id)
                if e.lfs_sha256:
                    pointer = _lfs_pointer(e.lfs_sha256, e.size)
                    s["lfs"] = {"size": e.size, "sha256": e.lfs_sha256, "pointerSize": len(pointer)}
            siblings.append(s)
        author = self.repo_id.split("/")[0]
        return {
            "_id": self.commit[:24],
            "id": self.repo_id,
            "modelId": self.repo_id,
            "author": author,
            "sha": self.commit,
            "lastModified": "2025-01-01T00:00:00.000Z",
            "createdAt": "2025-01-01T00:00:00.000Z",
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "library_name": "transformers",
            "tags": ["transformers", "safetensors"],
            "siblings": siblings,
        }

    def _tree(self, sub: str, recursive: bool) -> list[dict] | None:
        sub = sub.strip("/")
        if sub in self.files:
            return [self.files[sub].tree_json()]
        prefix = sub + "/" if sub else ""
        out, folders = [], set()
        for path, e in self.files.items():
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if "/" in rest:
                parts = rest.split("/")
                for i in range(1, len(parts) if recursive else 2):
                    folders.add(prefix + "/".join(parts[:i]))
                if not recursive:
                    continue
            out.append(e.tree_json())
        if not out and not folders:
            return None
        dirs = [
            {"type": "directory", "oid": _git_blob_id(d.encode()), "size": 0, "path": d}
            for d in sorted(folders)
        ]
        return dirs + out

    def _handler(self, origin: str):
        emu = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "HubEmulator/1"

            def log_message(self, *args) -> None:  # keep pytest's output clean
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
                self.send_response(status)
                hdrs = {"Content-Length": str(len(body)), **(headers or {})}
                for k, v in hdrs.items():
                    self.send_header(k, v)
                self.end_headers()
                if not head and body:
                    self.wfile.write(body)

            def _json(self, obj, status: int = 200, head: bool = False):
                self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head)

            def _error(self, code: str, status: int = 404, head: bool = False, commit: bool = False):
                hdrs = {"X-Error-Code": code, "X-Error-Message": code, "Content-Type": "application/json"}
                if commit:
                    hdrs["X-Repo-Commit"] = emu.commit
                self._send(status, json.dumps({"error": code}).encode(), hdrs, head)

            def _revision_ok(self, rev: str) -> bool:
                return unquote(rev) in (emu.revision, emu.commit)

            def do_HEAD(self):
                self._route("HEAD")

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def _route(self, method: str) -> None:
                url = urlsplit(self.path)
                path, query = unquote(url.path), parse_qs(url.query)
                emu._record(origin, method, self.path)
                head = method == "HEAD"
                if origin == "cdn":
                    m = re.fullmatch(r"/lfs/([0-9a-f]{64})", path)
                    if m and m.group(1) in emu.by_sha and method in ("GET", "HEAD"):
                        return self._file(emu.by_sha[m.group(1)].data, {}, head)
                    return self._send(404, b"not found", head=head)
                repo = re.escape(emu.repo_id)
                if path == "/api/agent-harnesses" and method == "GET":
                    return self._json({"standardEnvVars": [], "harnesses": {}})
                if m := re.fullmatch(rf"/api/models/{repo}(?:/revision/(?P<rev>[^/]+))?", path):
                    if method != "GET":
                        return self._send(405, head=head)
                    if m.group("rev") and not self._revision_ok(m.group("rev")):
                        return self._error("RevisionNotFound")
                    return self._json(emu._model_info(query))
                if m := re.fullmatch(rf"/api/models/{repo}/tree/(?P<rev>[^/]+)(?P<sub>/.*)?", path):
                    if not self._revision_ok(m.group("rev")):
                        return self._error("RevisionNotFound")
                    recursive = query.get("recursive", ["false"])[0].lower() == "true"
                    tree = emu._tree(m.group("sub") or "", recursive)
                    return self._error("EntryNotFound") if tree is None else self._json(tree)
                if m := re.fullmatch(rf"/api/models/{repo}/paths-info/(?P<rev>[^/]+)", path):
                    if not self._revision_ok(m.group("rev")):
                        return self._error("RevisionNotFound")
                    length = int(self.headers.get("Content-Length") or 0)
                    form = parse_qs(self.rfile.read(length).decode())
                    wanted = [p.strip("/") for p in form.get("paths", [])]
                    return self._json([emu.files[p].tree_json() for p in wanted if p in emu.files])
                if m := re.fullmatch(rf"/{repo}/resolve/(?P<rev>[^/]+)/(?P<file>.+)", path):
                    if method not in ("GET", "HEAD"):
                        return self._send(405, head=head)
                    if not self._revision_ok(m.group("rev")):
                        return self._error("RevisionNotFound", head=head)
                    entry = emu.files.get(m.group("file"))
                    if entry is None:
                        return self._error("EntryNotFound", head=head, commit=True)
                    hdrs = {"X-Repo-Commit": emu.commit, "ETag": f'"{entry.blob_id}"'}
                    if entry.lfs_sha256 is not None:
                        hdrs.update(
                            {
                                "X-Linked-Etag": f'"{entry.lfs_sha256}"',
                                "X-Linked-Size": str(entry.size),
                                "Location": f"{emu.cdn}/lfs/{entry.lfs_sha256}?filename={quote(entry.path)}",
                            }
                        )
                        return self._send(302, b"", hdrs, head)
                    return self._file(entry.data, hdrs, head)
                if re.match(r"/api/models/[^/]+/[^/]+", path) or re.match(r"/[^/]+/[^/]+/resolve/", path):
                    return self._error("RepoNotFound", status=401, head=head)
                return self._send(404, b"not found", head=head)

            def _file(self, data: bytes, hdrs: dict, head: bool) -> None:
                hdrs = {**hdrs, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
                rng = self.headers.get("Range")
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
                if m:
                    start = int(m.group(1))
                    end = int(m.group(2)) if m.group(2) else len(data) - 1
                    if start >= len(data):
                        return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, head)
                    end = min(end, len(data) - 1)
                    hdrs["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                    return self._send(206, data[start : end + 1], hdrs, head)
                return self._send(200, data, hdrs, head)

        return Handler
