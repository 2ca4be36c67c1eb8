"""The Kubernetes workloads of deploy/k8s/base, run here as their manifests run them.

tests/test_deploy.py reads the manifests against the code; this walks them as an operator
would: each container's command and arguments, its environment (the image's ``ENV`` under the
container's ``env``, Secrets filled with test values) and its settings file (the ConfigMap as
written), against the embedded broker and the loopback Elasticsearch fake, in a private mount
namespace laid out as the pod is: the root file system read-only when the container says
``readOnlyRootFilesystem``, and writable only where the pod mounts a writable volume. Its probes
must answer 200, the detect role must load its models, a desk verdict must reach its bank, a
CronJob's run must succeed and a Deployment's process must stop within its grace period. Those
runs need root (``unshare -m`` and bind mounts) and are skipped elsewhere.

deploy/prometheus/prometheus.yml, its targets pointed at those processes, scrapes each as the job
its rules select. The README's kustomization that points the workloads at a registry is rendered
with kubectl.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
import yaml

from streams.broker import free_port
from tests.support import wait_healthy
from tests.test_deploy import DEPLOY, K8S, _kustomize_resources, _pod_templates

REPO = Path(__file__).resolve().parents[1]
DEEPWATCH = Path(sys.executable).with_name("deepwatch")
IMAGE_WORKDIR = "/app"  # the Dockerfile's WORKDIR: a relative path a process writes lands there

def _can_unshare() -> bool:
    """Whether this process may make a private mount namespace: root alone is not enough in a
    container without CAP_SYS_ADMIN, where ``unshare -m`` fails."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_root = pytest.mark.skipif(not DEEPWATCH.exists() or not _can_unshare(),
                                reason="needs root allowed to unshare (bind mounts in a private mount namespace)")


def _deepwatch_containers(docs: list[dict], prefix: str = "deepwatch:") -> list[tuple[str, dict, dict]]:
    """(kind/name, pod spec, container) of every container that runs the deepwatch image
    (named ``prefix``TAG)."""
    return [(where, pod, c) for where, pod in _pod_templates(docs) for c in pod["containers"]
            if c["image"].startswith(prefix)]


def _image_env() -> dict[str, str]:
    """The Dockerfile's ``ENV`` (every container starts with it under its own ``env``)."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    env: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(tok.split("=", 1) for tok in shlex.split(line[4:]))
    return env


def _rendered(overlay: str) -> list[dict]:
    """What `kubectl apply -k` would apply (patches included) where kubectl is installed; base's
    files as written otherwise."""
    if shutil.which("kubectl") is None:
        if overlay != "base":
            pytest.skip("kubectl is not installed: `kubectl kustomize` renders the overlays' patches")
        return _kustomize_resources(K8S / overlay)
    res = subprocess.run(["kubectl", "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


@pytest.mark.parametrize("overlay", ["base", "overlays/gpu", "overlays/eck"])
def test_every_deepwatch_container_has_a_read_only_root_and_a_writable_tmp(overlay):
    """The detect role builds its int8 model in temporary files and the desk spools a large
    lookup upload there: with the root read-only those need /tmp on a volume
    (they stopped with "No usable temporary directory" without one), and the caches kept by path
    must lie on a writable volume too."""
    found = _deepwatch_containers(_rendered(overlay))
    assert len(found) >= 6, found
    for where, pod, c in found:
        assert (c.get("securityContext") or {}).get("readOnlyRootFilesystem") is True, f"{overlay}: {where}"
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
        assert tmp and not tmp[0].get("readOnly"), f"{overlay}: {where}: no writable /tmp"
        assert "emptyDir" in volumes[tmp[0]["name"]], f"{overlay}: {where}: /tmp is not pod-local scratch"
        # caches kept by path, not in /tmp: the ONNX exports (XDG_CACHE_HOME, the image's ENV), and on CUDA
        # the driver's JIT cache, whose default is under the read-only HOME
        env = {**_image_env(), **{e["name"]: e["value"] for e in c.get("env", []) if "value" in e}}
        caches = ["XDG_CACHE_HOME"] + (["CUDA_CACHE_PATH"] if env.get("DEEPWATCH_DETECT__DEVICE") == "cuda" else [])
        writable = [m["mountPath"] for m in c.get("volumeMounts", []) if not m.get("readOnly")]
        for var in caches:
            assert var in env and any(env[var] == w or env[var].startswith(w.rstrip("/") + "/") for w in writable), \
                f"{overlay}: {where}: {var}={env.get(var)} is on the read-only root"


# -- running the workloads -----------------------------------------------------------
def _pod_ip() -> str:
    """This machine's address on its network (what a kubelet probes and Prometheus scrapes: the
    pod's IP, not its loopback); loopback where it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent, the route picks the address
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"



@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    from streams.broker import EmbeddedBroker, ensure_topics
    from streams.settings import Settings
    from streams.topics import topic_specs

    settings = Settings()
    with EmbeddedBroker(tmp_path_factory.mktemp("broker")) as b:
        ensure_topics(b.bootstrap, topic_specs(settings), settings=settings)
        yield b


class Pod:
    """One container of a manifest, laid out under ``root`` (a container path P is root/P,
    /tmp stays /tmp) and started in a mount namespace where only its writable volumes are."""

    def __init__(self, where: str, pod: dict, container: dict, root: Path, broker_url: str, es_url: str):
        self.where, self.pod, self.c, self.root = where, pod, container, root
        self.ports = {p["containerPort"]: free_port() for p in container.get("ports", [])}
        self.port_names = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        self.mounts = sorted(container.get("volumeMounts", []), key=lambda m: m["mountPath"])
        for m in self.mounts:
            host = self.host(m["mountPath"])
            host.mkdir(parents=True, exist_ok=True)  # the kubelet makes each mount point and subPath
            cm = volumes[m["name"]].get("configMap")
            if cm:
                [doc] = [d for d in _kustomize_resources(K8S / "base")
                         if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == cm["name"]]
                for key, text in doc["data"].items():
                    (host / key).write_text(text)
        self.read_only_root = bool((container.get("securityContext") or {}).get("readOnlyRootFilesystem"))
        self.env = self._env(broker_url, es_url)

    def host(self, path: str) -> Path:
        return Path(path) if path == "/tmp" or path.startswith("/tmp/") else self.root / path.lstrip("/")

    def _translate(self, value: str) -> str:
        for m in sorted(self.mounts, key=lambda m: -len(m["mountPath"])):
            if value == m["mountPath"] or value.startswith(m["mountPath"] + "/"):
                return str(self.host(m["mountPath"])) + value[len(m["mountPath"]):]
        if value.startswith("/data"):  # the image's ENV naming a path under a volume the pod mounts
            return str(self.root) + value
        return value

    def _env(self, broker_url: str, es_url: str) -> dict[str, str]:
        env = {k: self._translate(v) for k, v in _image_env().items()}
        env.update(PATH=f"{DEEPWATCH.parent}:/usr/bin:/bin", HOME=str(self.root / "home/deepwatch"), LANG="C.UTF-8")
        for e in self.c.get("env", []):
            if "value" in e:
                env[e["name"]] = self._translate(e["value"])
            elif not e["valueFrom"]["secretKeyRef"].get("optional"):
                name = e["name"]
                env[name] = f"walk:{secrets.token_hex(16)}" if name.endswith("TOKENS") else secrets.token_hex(16)
        # what this machine has instead of the cluster's: the embedded broker (one node), the ES
        # fake (plain http, so no CA bundle), and free ports for the container's
        if "DEEPWATCH_BROKER" in env:
            env["DEEPWATCH_BROKER"] = broker_url
        env.pop("DEEPWATCH_FINDINGS__CA_CERTS", None)
        env["DEEPWATCH_FINDINGS__URL"] = es_url
        env["DEEPWATCH_KAFKA__REPLICATION_FACTOR"] = "1"
        if "DEEPWATCH_METRICS_PORT" in env:
            env["DEEPWATCH_METRICS_PORT"] = str(self.ports[int(env["DEEPWATCH_METRICS_PORT"])])
        return env

    def argv(self) -> list[str]:
        args = [re.sub(r"\$\((\w+)\)", lambda m: self.env[m.group(1)], a) for a in self.c["args"]]
        if "--port" in args:
            i = args.index("--port") + 1
            args[i] = str(self.ports[int(args[i])])
        return [str(DEEPWATCH), *args]

    def mount_script(self) -> str:
        """Every volume a mount of its own (a bind of its directory), then the read-only ones
        made so, and with ``readOnlyRootFilesystem`` the rest: the root, /tmp unless a volume is
        mounted there, and the pod's tree (HOME, the working directory) but for its volumes.
        Read-only last: a bind copies the flags of the mount it is made on."""
        root = shlex.quote(str(self.root))
        lines = ["set -e", "mount --make-rprivate /", "mount --bind /tmp /tmp", f"mount --bind {root} {root}"]
        paths = {m["mountPath"]: shlex.quote(str(self.host(m["mountPath"]))) for m in self.mounts}
        lines += [f"mount --bind {p} {p}" for path, p in paths.items() if path != "/tmp"]
        lines += [f"mount -o remount,bind,ro {paths[m['mountPath']]}" for m in self.mounts if m.get("readOnly")]
        if self.read_only_root:
            if "/tmp" not in paths:
                lines.append("mount -o remount,bind,ro /tmp")
            lines += [f"mount -o remount,bind,ro {root}", "mount -o remount,bind,ro /"]
        lines.append('exec "$@"')
        return "\n".join(lines)

    def start(self, log: Path) -> subprocess.Popen:
        cwd = self.root / IMAGE_WORKDIR.lstrip("/")
        cwd.mkdir(parents=True, exist_ok=True)
        Path(self.env["HOME"]).mkdir(parents=True, exist_ok=True)  # the image's user has one (useradd --create-home)
        return subprocess.Popen(["unshare", "-m", "sh", "-c", self.mount_script(), "sh", *self.argv()],
                                env=self.env, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)

    def probe_urls(self) -> list[str]:
        out = []
        for kind in ("readinessProbe", "livenessProbe"):
            get = (self.c.get(kind) or {}).get("httpGet")
            if get:
                port = get["port"] if isinstance(get["port"], int) else self.port_names[get["port"]]
                out.append(f"http://{_pod_ip()}:{self.ports[port]}{get['path']}")
        return out


def wait_models_loaded(where: str, proc: subprocess.Popen, log: Path, timeout_s: float = 240) -> None:
    """The detect role loads its models after its probes first answer; a failure to load ends the process."""
    deadline = time.monotonic() + timeout_s
    while '"models loaded"' not in log.read_text():
        assert proc.poll() is None, f"{where} exited with {proc.returncode}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def _workloads() -> list:
    return [pytest.param(where, id=where.split("/")[1]) for where, _, _ in
            _deepwatch_containers(_kustomize_resources(K8S / "base"))]


@needs_root
@pytest.mark.parametrize("where", _workloads())
def test_each_workload_runs_as_its_manifest_lays_it_out(where, broker, fake_es, tmp_path):
    """Probes answer, the detect role loads its models (its int8 build writes temporary files),
    the prune job reports, and a SIGTERM ends the process within the pod's grace period."""
    [(_, pod, container)] = [w for w in _deepwatch_containers(_kustomize_resources(K8S / "base")) if w[0] == where]
    p = Pod(where, pod, container, tmp_path / "pod", broker.url, fake_es.url)
    log = tmp_path / "log.txt"
    proc = p.start(log)
    try:
        if where.startswith("CronJob/"):
            assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
            assert '"deleted"' in log.read_text(), log.read_text()[-3000:]
            return
        urls = p.probe_urls()
        assert urls, f"{where}: no HTTP probe"
        for url in urls:
            wait_healthy(url, proc, timeout_s=120)
        if "detect" in container["args"]:
            wait_models_loaded(where, proc, log)
        for url in urls:
            r = httpx.get(url, timeout=5)
            assert r.status_code == 200, (url, r.text)
        assert proc.poll() is None, log.read_text()[-3000:]
        # a stop inside the pod's grace period (Kubernetes' default 30 s where none is set)
        grace = pod.get("terminationGracePeriodSeconds", 30)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{where} still ran {grace} s after SIGTERM (the kubelet kills it then): "
                        f"{log.read_text()[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@needs_root
def test_a_desk_verdict_banks_its_pictures_with_the_root_read_only(broker, fake_es, tmp_path):
    """A "fake" verdict banks the cluster's pictures with the desk's root read-only (it wrote
    them to temporary files first, and failed without a /tmp volume; now it reads them from
    the blob store one at a time)."""
    from streams.es_store import EsFindingsStore
    from tests.desk_support import small_store

    [(where, pod, container)] = [w for w in _deepwatch_containers(_kustomize_resources(K8S / "base"))
                                 if w[0] == "Deployment/deepwatch-desk"]
    p = Pod(where, pod, container, tmp_path / "pod", broker.url, fake_es.url)
    shas = small_store(p.host("/data"), EsFindingsStore.from_url(fake_es.url))
    token = secrets.token_hex(24)
    p.env["DEEPWATCH_DESK_TOKENS"] = f"editor:walk:{token}"  # the optional Secret deepwatch-desk
    log = tmp_path / "log.txt"
    proc = p.start(log)
    try:
        http = f"http://127.0.0.1:{p.ports[p.port_names['http']]}"
        wait_healthy(f"{http}/healthz", proc, timeout_s=120)
        r = httpx.post(f"{http}/api/clusters/c-viral/verdict", json={"verdict": "fake"},
                       headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert r.status_code == 201, (r.status_code, r.text, log.read_text()[-3000:])
        verdict = r.json()
        assert verdict["cluster_state"]["members"] == [shas["c-viral"]]
        assert verdict["effects"]["bank"] == "desk-fake" and verdict["effects"]["bank_entries_added"] == 1, verdict
        banks = httpx.get(f"{http}/api/banks", headers={"Authorization": f"Bearer {token}"}, timeout=30).json()
        assert {b["name"]: b["entries"] for b in banks}.get("desk-fake") == 1, banks
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("overlay", ["base", "overlays/gpu"])
def test_the_readmes_image_kustomization_points_every_workload_at_the_registry(overlay, tmp_path):
    """`kubectl apply -k deploy/k8s/base` as it stands runs `deepwatch:latest`, which a node pulls from
    Docker Hub's library (no such image) on every start: the README's own kustomization must send every
    workload to the operator's registry, each with the tag it had (detect keeps :gpu in the gpu overlay)."""
    readme = (DEPLOY / "README.md").read_text()
    section = readme.split("**The image, before applying.**", 1)
    assert len(section) == 2, "deploy/README.md does not say where the image comes from"
    [snippet] = re.findall(r"```yaml\n(.*?)```", section[1], re.S)[:1]
    kust = yaml.safe_load(snippet)
    assert kust["resources"] == ["../deploy/k8s/base"], kust
    kust["resources"] = [f"../deploy/k8s/{overlay}"]
    (tmp_path / "deploy").symlink_to(DEPLOY)  # the README's layout: the kustomization beside deploy/
    (tmp_path / "my-deepwatch").mkdir()
    (tmp_path / "my-deepwatch" / "kustomization.yaml").write_text(yaml.safe_dump(kust))
    [image] = kust["images"]
    before = {where: c["image"] for where, _, c in _deepwatch_containers(_rendered(overlay))}
    res = subprocess.run(["kubectl", "kustomize", str(tmp_path / "my-deepwatch")], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    after = {where: c["image"] for where, _, c in
             _deepwatch_containers([d for d in yaml.safe_load_all(res.stdout) if d], prefix=image["newName"] + ":")}
    assert len(after) >= 6 and set(after) == set(before), (before, after)
    for where, was in before.items():
        assert after[where] == f"{image['newName']}:{was.split(':', 1)[1]}", (where, was, after[where])


# compose's DNS names (deploy/prometheus/prometheus.yml) -> the Kubernetes workloads that serve them here
SCRAPED_AS = {"pipeline": ["deepwatch-analyze", "deepwatch-cluster"], "detect": ["deepwatch-detect"],
              "desk": ["deepwatch-desk"], "ingest": ["deepwatch-ingest"]}
# the rules that say a process or its event loop is gone: quiet while every process runs
LIVENESS_RULES = {"DeepwatchWorkerDown", "DeepwatchNoWorkers", "DeepwatchWorkerLoopStalled", "DeepwatchDeskDown",
                  "DeepwatchNoDesk", "DeepwatchDeskLoopStalled", "DeepwatchIngestDown", "DeepwatchNoIngest",
                  "DeepwatchIngestLoopStalled"}


def _epoch(rfc3339: str) -> float:
    """Prometheus's RFC 3339 time (nanoseconds, ``Z``) in seconds since 1970."""
    head, _, frac = rfc3339.rstrip("Z").partition(".")
    return datetime.fromisoformat(head).replace(tzinfo=timezone.utc).timestamp() + float(f"0.{frac or 0}")


@needs_root
@pytest.mark.skipif(shutil.which("prometheus") is None,
                    reason="prometheus is not installed (.ci/install-prometheus.sh)")
def test_the_deploy_prometheus_scrapes_every_process_on_the_port_it_serves(broker, fake_es, tmp_path):
    """deploy/prometheus/prometheus.yml with only its targets changed (DNS discovery of the compose
    services -> the addresses the processes listen on here, the DNS name kept for its `role` relabel)
    and the generated rules: every deepwatch process is up in its job, each serves the heartbeat the
    loop-stalled rules read, and none of the rules about a missing process or loop is pending."""
    workloads = {where.split("/")[1]: (where, pod, c) for where, pod, c in
                 _deepwatch_containers(_kustomize_resources(K8S / "base")) if where.startswith("Deployment/")}
    procs: dict[str, tuple[Pod, subprocess.Popen]] = {}
    prom: subprocess.Popen | None = None
    prom_port = free_port()
    try:
        for name, (where, pod, c) in workloads.items():
            p = Pod(where, pod, c, tmp_path / name, broker.url, fake_es.url)
            procs[name] = (p, p.start(tmp_path / f"{name}.log"))
        for p, proc in procs.values():
            for url in p.probe_urls():
                wait_healthy(url, proc, timeout_s=120)
        cfg = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
        rules = yaml.safe_load((REPO / "dashboards" / "generated" / "prometheus" / "deepwatch-rules.yaml").read_text())
        for group in rules["groups"]:
            group["interval"] = "1s"  # its own 30 s would leave the first evaluation's pending states for the test
        (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
        cfg["rule_files"] = [str(tmp_path / "rules.yaml")]
        cfg.pop("alerting")  # no Alertmanager here; the rules' states are read from Prometheus
        cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
        jobs = {}
        for job in cfg["scrape_configs"]:
            if job["job_name"] == "prometheus":
                job["static_configs"] = [{"targets": [f"127.0.0.1:{prom_port}"]}]
            for sd in job.pop("dns_sd_configs", []):
                for dns in sd["names"]:
                    for w in SCRAPED_AS[dns]:
                        assert sd["port"] in procs[w][0].ports, f"{job['job_name']}: {w} serves nothing on {sd['port']}"
                job.setdefault("static_configs", []).extend(
                    {"targets": [f"{_pod_ip()}:{procs[w][0].ports[sd['port']]}" for w in SCRAPED_AS[dns]],
                     "labels": {"__meta_dns_name": dns}} for dns in sd["names"])
                jobs[job["job_name"]] = sum(len(SCRAPED_AS[dns]) for dns in sd["names"])
        assert jobs == {"deepwatch": 3, "deepwatch-desk": 1, "deepwatch-ingest": 1}, jobs
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
        prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=(tmp_path / "prometheus.log").open("w"), stderr=subprocess.STDOUT)
        api = f"http://127.0.0.1:{prom_port}/api/v1"

        def query(q: str) -> list[dict]:
            # a starting Prometheus answers 503 "Service Unavailable" until its TSDB is open: retried below
            return httpx.get(f"{api}/query", params={"query": q}, timeout=5).raise_for_status().json()["data"]["result"]

        deadline = time.monotonic() + 90
        while True:
            assert prom.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                up = {(r["metric"]["job"], r["metric"]["instance"]): r["value"][1]
                      for r in query('up{job=~"deepwatch.*"}')}
                beats = {(r["metric"]["job"], r["metric"]["instance"])
                         for r in query('deepwatch_loop_heartbeat_timestamp_seconds{job=~"deepwatch.*"} > 0')}
            except httpx.HTTPError:
                up, beats = {}, set()
            if len(up) == sum(jobs.values()) and set(up.values()) == {"1"} and beats == set(up):
                break
            assert time.monotonic() < deadline, (up, beats, (tmp_path / "prometheus.log").read_text()[-2000:])
            time.sleep(1)
        roles = {r["metric"].get("role") for r in query('up{job="deepwatch"}')}
        assert roles == {"pipeline", "detect"}, roles  # the relabel the worker panels group by
        scraped = time.time()
        while True:  # until every rule was evaluated over these scrapes (its first evaluation came before them)
            groups = httpx.get(f"{api}/rules", timeout=5).raise_for_status().json()["data"]["groups"]
            alerting = [r for g in groups for r in g["rules"] if r["type"] == "alerting"]
            if all(_epoch(r["lastEvaluation"]) > scraped for r in alerting):
                break
            assert time.monotonic() < deadline, [(r["name"], r["lastEvaluation"]) for r in alerting]
            time.sleep(0.5)
        states = {r["name"]: r.get("state") for r in alerting}
        assert LIVENESS_RULES <= set(states), sorted(states)
        assert {n: s for n, s in states.items() if n in LIVENESS_RULES and s != "inactive"} == {}
    finally:
        running = [proc for _, proc in procs.values()] + ([prom] if prom else [])
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in running:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("overlay", ["base", "overlays/gpu", "overlays/eck"])
def test_a_node_drain_evicts_one_replica_at_a_time_and_never_blocks(overlay):
    """Each Deployment of more than one replica has a PodDisruptionBudget letting one of its pods go
    at a time (a drain took both analyze pods, or both ingest endpoints, at once); none of one
    replica has a budget (it would block the drain for good) and no budget selects another's pods."""
    docs = _rendered(overlay)
    budgets = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        covering = [b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()]
        if dep["spec"].get("replicas", 1) > 1:
            assert [b["spec"].get("maxUnavailable") for b in covering] == [1], dep["metadata"]["name"]
        else:
            assert covering == [], dep["metadata"]["name"]
