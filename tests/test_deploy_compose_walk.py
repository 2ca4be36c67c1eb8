"""deploy/compose.yaml's deepwatch services, run here as compose lays them out.

No Docker engine runs here. Each deepwatch service is read from the compose files and handed to
tests/test_deploy_walk.py's ``Pod`` as the container it would be: its command, the image's ``ENV``
under the service's ``environment`` (the ``${VAR:?...}`` the operator must set filled with test
values, ``${VAR:-default}`` with its default), its settings file, in a private mount namespace
with the root read-only when the service says ``read_only`` and writable only where it mounts a
volume (the image's ``VOLUME`` where it mounts none, as Docker does) or a tmpfs (a real tmpfs with
the service's options, size included). It runs as the service's user, with its capabilities
dropped and no-new-privileges (setpriv). Its compose healthcheck must pass, run the same way;
detect must load its models, a desk verdict reach its bank, the prune job succeed, a server stop
within its stop_grace_period. Those runs need root (``unshare -m``) and are skipped elsewhere.

Statically, every deepwatch service (compose.yaml alone and with compose.gpu.yaml) must have the
read-only root, the bounded /tmp and the rest of the Kubernetes pods' hardening.
"""

from __future__ import annotations

import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests import test_deploy_walk as walk
from tests.test_deploy import DEPLOY, _dockerfile

broker = walk.broker  # the module-scoped embedded broker fixture, shared with the Kubernetes walk

COMPOSE_FILES = {"compose.yaml": ["compose.yaml"], "compose.gpu.yaml": ["compose.yaml", "compose.gpu.yaml"]}
REQUIRED = re.compile(r"\$\{(\w+):?\?[^}]*\}")  # ${VAR:?message} / ${VAR?message}
DEFAULTED = re.compile(r"\$\{(\w+):?-([^}]*)\}")  # ${VAR:-default} / ${VAR-default}


def _merge(base, over):
    """An override file over compose.yaml (`-f a -f b`): mappings merged key by key, sequences
    (volumes, tmpfs, ...) extended, anything else replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        return {k: _merge(base[k], over[k]) if k in base and k in over else over.get(k, base.get(k))
                for k in {**base, **over}}
    if isinstance(base, list) and isinstance(over, list):
        return base + [v for v in over if v not in base]
    return over


def _services(files: list[str]) -> dict[str, dict]:
    """The deepwatch services (built from deploy/Dockerfile or running a deepwatch image) of
    ``files`` merged in order."""
    doc: dict = {}
    for name in files:
        doc = _merge(doc, yaml.safe_load((DEPLOY / name).read_text()))
    return {n: s for n, s in doc["services"].items()
            if "build" in s or str(s.get("image", "")).startswith("deepwatch")}


def _image(instruction: str) -> str:
    [value] = [args for instr, args in _dockerfile() if instr == instruction]
    return value


def _env(svc: dict) -> dict[str, str]:
    env = svc.get("environment") or {}
    return {k: str(v) for k, v in (env.items() if isinstance(env, dict) else (e.split("=", 1) for e in env))}


def _tmpfs(svc: dict) -> dict[str, str]:
    """Mount path -> options of each tmpfs the service mounts."""
    entries = svc.get("tmpfs") or []
    return dict((e.split(":", 1) + [""])[:2] for e in ([entries] if isinstance(entries, str) else entries))


def _volumes(svc: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of each short-syntax volume: a named volume or a host path."""
    out = []
    for v in svc.get("volumes", []):
        source, target, *mode = str(v).split(":")
        out.append((source, target, "ro" in (mode[0].split(",") if mode else [])))
    return out


def _size(options: str) -> int | None:
    m = re.search(r"(?:^|,)size=(\d+)([kmg]?)(?:,|$)", options)
    return int(m.group(1)) * 1024 ** " kmg".index(m.group(2) or " ") if m else None


def _seconds(duration: str) -> float:
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3}[unit]
               for n, unit in re.findall(r"([\d.]+)(ms|h|m|s)", str(duration)))


# -- what every deepwatch service must carry -------------------------------------------
@pytest.mark.parametrize("files", list(COMPOSE_FILES))
def test_every_deepwatch_service_runs_read_only_unprivileged_with_a_bounded_tmp(files):
    """As the Kubernetes pods' securityContext: a read-only root, the image's non-root user, no
    capabilities, no privilege gain; /tmp a size-bounded tmpfs (the detect role builds its int8
    model in temporary files, the desk spools a large lookup upload there; in memory,
    so unbounded it could take the service's whole mem_limit); and the caches kept by path on a
    writable volume, not on the read-only root nor on the tmpfs that a restart empties."""
    services = _services(COMPOSE_FILES[files])
    assert {"pipeline", "detect", "desk", "ingest", "prune"} <= set(services), sorted(services)
    image_user = _image("USER")
    for name, svc in services.items():
        where = f"{files}: {name}"
        assert svc.get("read_only") is True, f"{where}: the root file system is writable"
        tmp = _tmpfs(svc)
        assert "/tmp" in tmp, f"{where}: no tmpfs at /tmp"
        assert _size(tmp["/tmp"]), f"{where}: /tmp is an unbounded tmpfs ({tmp['/tmp']!r})"
        assert "ALL" in (svc.get("cap_drop") or []) and not svc.get("cap_add"), f"{where}: keeps capabilities"
        opts = [re.sub(r"[:=]", "=", o) for o in svc.get("security_opt") or []]
        assert "no-new-privileges=true" in opts, f"{where}: may gain privileges (setuid binaries)"
        assert not svc.get("privileged"), where
        user = str(svc.get("user") or image_user)
        assert user == image_user and int(user.split(":")[0]) != 0, f"{where}: runs as {user}, not the image's user"
        env = {**walk._image_env(), **_env(svc)}
        caches = ["XDG_CACHE_HOME"] + (["CUDA_CACHE_PATH"] if env.get("DEEPWATCH_DETECT__DEVICE") == "cuda" else [])
        writable = [t for s, t, ro in _volumes(svc) if not ro and not s.startswith((".", "/"))]
        for var in caches:
            assert var in env and any(env[var] == w or env[var].startswith(w.rstrip("/") + "/") for w in writable), \
                f"{where}: {var}={env.get(var)} is on no writable volume"


# -- running the services ----------------------------------------------------------------
class Service(walk.Pod):
    """A compose service as ``Pod`` runs a container: its volumes and tmpfs as the container's
    mounts, ``read_only`` as ``readOnlyRootFilesystem``, and on top of ``Pod``'s mount namespace a
    real tmpfs with the service's options at each tmpfs path, and the service's user,
    ``cap_drop: [ALL]`` and no-new-privileges applied by setpriv. ``root`` must lie outside /tmp
    (a tmpfs there would hide it)."""

    def __init__(self, name: str, svc: dict, root: Path, broker_url: str, es_url: str):
        assert not root.is_relative_to("/tmp"), root
        self.svc, self.tmpfs = svc, _tmpfs(svc)
        env = _env(svc)
        args = list(svc["command"])
        if "--broker" in args:
            i = args.index("--broker") + 1
            assert args[i] == env["DEEPWATCH_BROKER"], f"{name}: --broker {args[i]} is not DEEPWATCH_BROKER"
            args[i] = "$(DEEPWATCH_BROKER)"  # compose's kafka:9092 -> the embedded broker
        env_list = []
        for k, v in env.items():
            if REQUIRED.fullmatch(v):  # the operator's secret: Pod fills it with a test value
                env_list.append({"name": k, "valueFrom": {"secretKeyRef": {"name": k, "key": k}}})
            elif m := DEFAULTED.fullmatch(v):
                env_list.append({"name": k, "value": m.group(2)})
            else:
                assert "${" not in v, f"{name}: {k}={v}: interpolation this walk does not read"
                env_list.append({"name": k, "value": v})
        ports = {int(env["DEEPWATCH_METRICS_PORT"])} if "DEEPWATCH_METRICS_PORT" in env else set()
        if "--port" in args:
            ports.add(int(args[args.index("--port") + 1]))
        mounts, self.files = [], []
        for i, (source, target, ro) in enumerate(_volumes(svc)):
            if source.startswith((".", "/")):
                path = (DEPLOY / source).resolve()
                # a file bound read-only: its directory as a read-only mount holding only that file
                # (the same to the process, the root around it being read-only too)
                assert path.is_file() and ro, f"{name}: {source}: only read-only file binds are walked"
                mounts.append({"name": f"bind{i}", "mountPath": str(Path(target).parent), "readOnly": True})
                self.files.append((target, path))
            else:
                mounts.append({"name": source, "mountPath": target, "readOnly": ro})
        mounts += [{"name": f"tmpfs{i}", "mountPath": path} for i, path in enumerate(self.tmpfs)]
        for path in shlex.split(_image("VOLUME").strip("[]").replace(",", " ")):
            if path not in {m["mountPath"] for m in mounts}:  # Docker mounts an anonymous volume there
                mounts.append({"name": f"anonymous{path.replace('/', '-')}", "mountPath": path})
        container = {
            "args": args, "env": env_list,
            "ports": [{"name": f"p{p}", "containerPort": p} for p in sorted(ports)],
            "volumeMounts": mounts, "securityContext": {"readOnlyRootFilesystem": bool(svc.get("read_only"))}}
        pod = {"volumes": [{"name": m["name"], "emptyDir": {}} for m in mounts]}
        super().__init__(f"compose/{name}", pod, container, root, broker_url, es_url)
        for target, path in self.files:
            shutil.copyfile(path, self.host(target))
        uid, _, gid = str(svc.get("user") or _image("USER")).partition(":")
        self.uid_gid = int(uid), int(gid or uid)
        for i, _ in enumerate(self.hidden_by_tmpfs()):  # made here: the root is read-only once mounted
            (self.root / f".kept{i}").mkdir()

    def hidden_by_tmpfs(self) -> list[tuple[Path, Path]]:
        """(tmpfs path on the host, what the service runs from under it): the checkout and its
        virtual environment, where a clone lies under /tmp. The image holds its code on the root;
        here a tmpfs over /tmp would hide it (setpriv: no such file)."""
        ours = {walk.REPO, walk.DEEPWATCH.parent.parent}
        return [(self.host(path), p) for path in self.tmpfs for p in sorted(ours)
                if p.is_relative_to(self.host(path)) and not any(p != q and p.is_relative_to(q) for q in ours)]

    def mount_script(self) -> str:
        mounts = []
        for path, opts in self.tmpfs.items():
            host = self.host(path)
            kept = [(shlex.quote(str(self.root / f".kept{i}")), shlex.quote(str(p)))
                    for i, (h, p) in enumerate(self.hidden_by_tmpfs()) if h == host]
            # bound aside first, then again on the fresh tmpfs, read-only as the image's code is
            mounts += [f"mount --bind {p} {aside}" for aside, p in kept]
            mounts.append(f"mount -t tmpfs -o {shlex.quote(opts or 'rw')} tmpfs {shlex.quote(str(host))}")
            mounts += [line for aside, p in kept
                       for line in (f"mkdir -p {p}", f"mount --bind {aside} {p}", f"mount -o remount,bind,ro {p}")]
        script = super().mount_script()
        assert script.endswith('exec "$@"'), script
        return script.removesuffix('exec "$@"') + "\n".join(mounts + ['exec "$@"'])

    def as_user(self, argv: list[str]) -> list[str]:
        uid, gid = self.uid_gid
        drop = ["--bounding-set=-all", "--inh-caps=-all"] if "ALL" in (self.svc.get("cap_drop") or []) else []
        nnp = ["--no-new-privs"] if any(o.replace("=", ":") == "no-new-privileges:true"
                                        for o in self.svc.get("security_opt") or []) else []
        return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", *drop, *nnp, "--", *argv]

    def argv(self) -> list[str]:
        return self.as_user(super().argv())

    def writable_dirs(self) -> list[Path]:
        return [self.host(m["mountPath"]) for m in self.mounts
                if not m.get("readOnly") and m["mountPath"] not in self.tmpfs]

    def start(self, log: Path) -> subprocess.Popen:
        # a fresh named (or anonymous) volume is a copy of the image's directory, which the image's
        # user owns (Dockerfile: chown deepwatch /data); so is HOME, though on the read-only root
        home = Path(self.env["HOME"])
        home.mkdir(parents=True, exist_ok=True)
        for d in [*self.writable_dirs(), home]:
            for p in [d, *d.rglob("*")]:
                shutil.chown(p, *self.uid_gid)
        return super().start(log)

    @property
    def healthchecked(self) -> bool:
        hc = self.svc.get("healthcheck") or {}
        return bool(hc.get("test")) and not hc.get("disable")

    def healthcheck(self) -> subprocess.CompletedProcess:
        """The service's compose healthcheck, run as the service runs (its namespace layout, user
        and environment), its ports those this walk gave the service."""
        hc = self.svc["healthcheck"]
        kind, *argv = hc["test"]
        assert kind in ("CMD", "CMD-SHELL"), hc["test"]
        argv = ["sh", "-c", argv[0]] if kind == "CMD-SHELL" else argv

        def port(m: re.Match) -> str:
            assert int(m.group(2)) in self.ports, f"{self.where}: the healthcheck asks port {m.group(2)}, which it serves not"
            return f"{m.group(1)}:{self.ports[int(m.group(2))]}"

        argv = [re.sub(r"(127\.0\.0\.1|localhost):(\d+)", port, a) for a in argv]
        cwd = self.root / walk.IMAGE_WORKDIR.lstrip("/")
        try:
            return subprocess.run(["unshare", "-m", "sh", "-c", self.mount_script(), "sh", *self.as_user(argv)],
                                  env=self.env, cwd=cwd, capture_output=True, text=True,
                                  timeout=_seconds(hc.get("timeout", "30s")))
        except subprocess.TimeoutExpired as e:
            return subprocess.CompletedProcess(e.cmd, 124, "", f"timed out after {e.timeout:g} s")

    def wait_healthy(self, proc: subprocess.Popen, log: Path) -> None:
        """Until the healthcheck passes: within its start_period (where failures do not count)
        and its retries at its interval."""
        hc = self.svc["healthcheck"]
        deadline = time.monotonic() + _seconds(hc.get("start_period", "0s")) + \
            _seconds(hc.get("interval", "30s")) * hc.get("retries", 3)
        while True:
            assert proc.poll() is None, f"{self.where} exited with {proc.returncode}: {log.read_text()[-3000:]}"
            res = self.healthcheck()
            if res.returncode == 0:
                return
            assert time.monotonic() < deadline, f"{self.where}: unhealthy: {res.stderr[-2000:]}\n{log.read_text()[-3000:]}"
            time.sleep(1)


@pytest.fixture
def root():
    """A container's tree, outside /tmp (the service's tmpfs is mounted over /tmp)."""
    d = Path(tempfile.mkdtemp(prefix="deepwatch-compose-walk-", dir="/var/tmp"))
    d.chmod(0o755)  # the container's root, which its non-root user walks
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


needs_setpriv = pytest.mark.skipif(shutil.which("setpriv") is None,
                                   reason="setpriv (util-linux) is not installed: it runs a service as its user")


@walk.needs_root
@needs_setpriv
@pytest.mark.parametrize("name", sorted(_services(["compose.yaml"])))
def test_each_service_runs_as_compose_lays_it_out(name, broker, fake_es, root, tmp_path):
    """Its healthcheck passes (detect also loads its models, whose int8 build writes temporary
    files); it runs as its user with no capabilities and no-new-privileges; a server stops within
    its stop_grace_period, the prune job reports and succeeds."""
    svc = _services(["compose.yaml"])[name]
    s = Service(name, svc, root / "container", broker.url, fake_es.url)
    if not s.healthchecked:
        # the job runs on the volume the pipeline workers share and have stored pictures in
        s.host("/data/blobs").mkdir(parents=True, exist_ok=True)
    log = tmp_path / "log.txt"
    proc = s.start(log)
    try:
        if not s.healthchecked:
            assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
            assert '"deleted"' in log.read_text(), log.read_text()[-3000:]
            return
        s.wait_healthy(proc, log)
        status = dict(line.split(":", 1) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines())
        assert status["Uid"].split()[0] == str(s.uid_gid[0]), f"{name}: runs as uid {status['Uid'].split()[0]}"
        assert int(status["CapEff"], 16) == int(status["CapBnd"], 16) == 0, \
            f"{name}: capabilities {status['CapEff'].strip()}, bounding set {status['CapBnd'].strip()}"
        assert status["NoNewPrivs"].strip() == "1", f"{name}: may gain privileges"
        if "detect" in svc["command"]:
            walk.wait_models_loaded(name, proc, log)  # after the healthcheck first passes
            res = s.healthcheck()
            assert res.returncode == 0, (res.stderr, log.read_text()[-3000:])
        assert proc.poll() is None, log.read_text()[-3000:]
        grace = _seconds(svc.get("stop_grace_period", "10s"))  # Docker's default
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} still ran {grace:g} s after SIGTERM (Docker kills it then): {log.read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@walk.needs_root
@needs_setpriv
def test_a_desk_verdict_banks_its_pictures_under_compose(broker, fake_es, root, tmp_path):
    """A "fake" verdict banks the cluster's pictures under compose's read-only root, as the
    service's user (the pictures are read from the blob store, not written to the tmpfs)."""
    from streams.es_store import EsFindingsStore
    from tests.desk_support import small_store

    s = Service("desk", _services(["compose.yaml"])["desk"], root / "container", broker.url, fake_es.url)
    shas = small_store(s.host("/data"), EsFindingsStore.from_url(fake_es.url))
    token = secrets.token_hex(24)
    s.env["DEEPWATCH_DESK_TOKENS"] = f"editor:walk:{token}"  # the operator's optional tokens
    log = tmp_path / "log.txt"
    proc = s.start(log)
    try:
        s.wait_healthy(proc, log)
        http = s.ports[int(s.c["args"][s.c["args"].index("--port") + 1])]
        auth = {"Authorization": f"Bearer {token}"}
        r = httpx.post(f"http://127.0.0.1:{http}/api/clusters/c-viral/verdict", json={"verdict": "fake"},
                       headers=auth, timeout=60)
        assert r.status_code == 201, (r.status_code, r.text, log.read_text()[-3000:])
        verdict = r.json()
        assert verdict["cluster_state"]["members"] == [shas["c-viral"]]
        assert verdict["effects"]["bank"] == "desk-fake" and verdict["effects"]["bank_entries_added"] == 1, verdict
        banks = httpx.get(f"http://127.0.0.1:{http}/api/banks", headers=auth, timeout=30).json()
        assert {b["name"]: b["entries"] for b in banks}.get("desk-fake") == 1, banks
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
