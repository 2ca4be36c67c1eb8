"""deploy/ (image, compose, Kubernetes) agrees with what the code does.

Nothing here builds an image or starts a container: the files are parsed and
checked against the settings loader (which refuses unknown ``DEEPWATCH_*``
variables), the command line, the routes the apps serve and each other.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
SECRET_NAME = re.compile(r"(PASSWORD|SECRET|TOKENS?|API_KEY)$")


# -- loading -----------------------------------------------------------------------
def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _compose() -> dict:
    [doc] = _docs(DEPLOY / "compose.yaml")
    return doc


def _deepwatch_services() -> dict[str, dict]:
    return {n: s for n, s in _compose()["services"].items()
            if "build" in s or str(s.get("image", "")).startswith("deepwatch")}


def _env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    return env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def _kustomize_resources(directory: Path) -> list[dict]:
    """What `kubectl apply -k DIR` applies, without patches: every resource file
    the kustomization lists, recursively through bases."""
    [kust] = _docs(directory / "kustomization.yaml")
    out: list[dict] = []
    for res in kust.get("resources", []):
        target = (directory / res).resolve()
        out += _kustomize_resources(target) if target.is_dir() else _docs(target)
    return out


def _deployments(directory: Path = K8S / "base") -> list[dict]:
    return [d for d in _kustomize_resources(directory) if d.get("kind") == "Deployment"]


def _containers(dep: dict) -> list[dict]:
    return dep["spec"]["template"]["spec"]["containers"]


def _cli():
    import typer

    from streams.cli import app

    return typer.main.get_command(app)


# -- every file parses ---------------------------------------------------------------
def test_every_yaml_file_under_deploy_parses():
    files = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
    assert len(files) >= 10
    for path in files:
        assert _docs(path), f"{path} is empty"


def test_settings_files_are_valid():
    from streams.settings import Settings

    Settings.model_validate(tomllib.loads((DEPLOY / "deepwatch.toml").read_text()))
    for cm in (d for d in _kustomize_resources(K8S / "base") if d["kind"] == "ConfigMap"):
        for key, text in cm["data"].items():
            if key.endswith(".toml"):
                Settings.model_validate(tomllib.loads(text))


# -- environment variables: the loader refuses unknown DEEPWATCH_* ------------------
def _compose_overrides() -> list[tuple[Path, dict]]:
    """compose.*.yaml: files given after compose.yaml (-f), e.g. the GPU detect worker."""
    return [(p, _docs(p)[0]) for p in sorted(DEPLOY.glob("compose.*.yaml"))]


def _all_deepwatch_env() -> list[tuple[str, str]]:
    found = [(f"compose/{name}", k) for name, s in _deepwatch_services().items() for k in _env(s)]
    for path, doc in _compose_overrides():
        found += [(f"{path.name}/{name}", k) for name, s in doc["services"].items() for k in _env(s)]
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in _docs(path):
            spec = (doc.get("spec") or {}).get("template", {}).get("spec", {})
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                found += [(f"{path.relative_to(DEPLOY)}/{c['name']}", e["name"]) for e in c.get("env", [])]
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        found += [("Dockerfile", m) for m in re.findall(r"\b(DEEPWATCH_[A-Z0-9_]+)=", line)]
    return [(where, name) for where, name in found if name.startswith("DEEPWATCH_")]


def test_every_deepwatch_variable_is_one_the_settings_loader_accepts():
    from streams.settings_check import SettingsError, check_environment

    found = _all_deepwatch_env()
    assert len({w for w, _ in found}) >= 6, found  # compose services, k8s containers, the Dockerfile
    bad = []
    for where, name in found:
        try:
            check_environment({name: "x"})
        except SettingsError as e:
            bad.append(f"{where}: {e}")
    assert not bad, bad


def test_every_deepwatch_variable_the_deploy_docs_name_is_accepted():
    """An operator copies names from comments and the README: each must be a
    setting, a documented non-setting or a secret (a typo stops every process)."""
    from streams.settings_check import SettingsError, check_environment

    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + sorted((REPO / "dashboards" / "generated").rglob("*.yaml"))
    bad, seen = [], 0
    for path in files:
        for name in set(re.findall(r"\bDEEPWATCH_[A-Z0-9_]+\b", path.read_text())):
            if name.endswith("_"):  # a family, "DEEPWATCH_ES_*"
                continue
            seen += 1
            try:
                check_environment({name: "x"})
            except SettingsError as e:
                bad.append(f"{path.relative_to(REPO)}: {e}")
    assert seen >= 20 and not bad, bad


def _container_envs() -> list[tuple[str, dict[str, str], str]]:
    """(where, literal DEEPWATCH_* values, settings-file text) of every deepwatch process."""
    out = []
    compose_toml = (DEPLOY / "deepwatch.toml").read_text()
    overrides = {name: s for _, doc in _compose_overrides() for name, s in doc["services"].items()}
    for name, svc in _deepwatch_services().items():
        env = {**_env(svc), **_env(overrides.get(name, {}))}
        out.append((f"compose/{name}", {k: str(v) for k, v in env.items() if not str(v).startswith("${")}, compose_toml))
    for overlay in ("base", "overlays/gpu", "overlays/eck"):
        resources = _kustomize_resources(K8S / overlay)
        [cm] = [d for d in resources if d.get("kind") == "ConfigMap"]
        patches = {}
        for patch in (_docs(K8S / overlay / "kustomization.yaml")[0].get("patches") or []):
            for doc in _docs(K8S / overlay / patch["path"]):
                for c in _containers(doc):
                    patches[(doc["metadata"]["name"], c["name"])] = {e["name"]: e.get("value") for e in c.get("env", [])}
        for dep in (d for d in resources if d.get("kind") == "Deployment"):
            for c in _containers(dep):
                env = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
                env.update(patches.get((dep["metadata"]["name"], c["name"]), {}))
                out.append((f"{overlay}/{dep['metadata']['name']}", env, cm["data"]["deepwatch.toml"]))
    return out


def test_every_process_starts_with_its_environment_and_settings_file(tmp_path, monkeypatch):
    """The values too, not only the names: what `load_settings` does at every
    start, with each container's literal env over the settings file it mounts."""
    from streams.settings import load_settings

    found = _container_envs()
    assert len(found) >= 12, found
    bad = []
    for where, env, toml in found:
        for k in [k for k in os.environ if k.startswith("DEEPWATCH_")]:
            monkeypatch.delenv(k)
        cfg = tmp_path / "deepwatch.toml"
        cfg.write_text(toml)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("DEEPWATCH_CONFIG", str(cfg))
        try:
            s = load_settings()
        except ValueError as e:  # SettingsError, or a value pydantic refuses
            bad.append(f"{where}: {e}")
            continue
        if "DEEPWATCH_METRICS_PORT" in env:
            assert s.metrics_port == int(env["DEEPWATCH_METRICS_PORT"]), where
    assert not bad, bad


def test_k8s_pods_that_mount_the_es_ca_bundle_verify_with_it(tmp_path, monkeypatch):
    """findings.ca_certs names the file in the es-ca volume of every pod that
    mounts it (its Deployment env over the ConfigMap's settings file): a pod
    without it would check ECK's self-signed certificate against the system's
    CAs and fail every request."""
    from streams.settings import load_settings

    [cm] = [d for d in _kustomize_resources(K8S / "base") if d.get("kind") == "ConfigMap"]
    cfg = tmp_path / "deepwatch.toml"
    cfg.write_text(cm["data"]["deepwatch.toml"])
    checked = []
    for path in sorted((K8S / "base").glob("*.yaml")):
        for doc in _docs(path):
            spec = doc.get("spec") or {}
            job = spec.get("jobTemplate", {}).get("spec")  # a CronJob's pod template is one level down
            pod = (job or spec).get("template", {}).get("spec", {})
            for c in pod.get("containers", []):
                mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
                if "es-ca" not in mounts:
                    continue
                for k in [k for k in os.environ if k.startswith("DEEPWATCH_")]:
                    monkeypatch.delenv(k)
                for e in c.get("env", []):
                    if "value" in e:
                        monkeypatch.setenv(e["name"], e["value"])
                monkeypatch.setenv("DEEPWATCH_CONFIG", str(cfg))
                s = load_settings()
                assert s.findings.ca_certs and s.findings.ca_certs.parent == Path(mounts["es-ca"]), path.name
                assert s.findings.verify_certs, path.name
                checked.append(path.name)
    assert sorted(checked) == ["analyze.yaml", "cluster.yaml", "desk.yaml", "prune.yaml"], checked


# -- the command line ----------------------------------------------------------------
def _check_command(cli, argv: list[str], where: str) -> None:
    cmd, rest = cli, list(argv)
    while hasattr(cmd, "commands"):  # a group (typer may vendor its own click)
        assert rest and rest[0] in cmd.commands, f"{where}: `deepwatch {' '.join(argv)}`: no such command"
        cmd, rest = cmd.commands[rest[0]], rest[1:]
    opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    for arg in rest:
        if arg.startswith("--"):
            assert arg.split("=", 1)[0] in opts, f"{where}: `deepwatch {' '.join(argv)}`: {arg} is not an option of {cmd.name}"


def _invocations() -> list[tuple[str, list[str]]]:
    out = [(f"compose/{n}", list(s["command"])) for n, s in _deepwatch_services().items() if s.get("command")]
    for path in sorted(K8S.rglob("*.yaml")):
        for doc in _docs(path):
            for c in (doc.get("spec") or {}).get("template", {}).get("spec", {}).get("containers", []):
                if c.get("args"):
                    out.append((f"{path.relative_to(DEPLOY)}/{c['name']}", list(c["args"])))
    # commands the deploy docs and comments tell an operator to type
    commands = set(_cli().commands)
    rules = REPO / "dashboards" / "generated" / "prometheus" / "deepwatch-rules.yaml"
    for path in [DEPLOY / "README.md", *sorted(DEPLOY.glob("compose*.yaml")), DEPLOY / "Dockerfile",
                 *sorted(K8S.rglob("*.yaml")), *sorted(K8S.rglob("*.yml")), rules]:
        for m in re.finditer(r"(?<![\w/.-])deepwatch ([a-z][a-z-]+(?: [^\n`|;&)#']*)?)", path.read_text()):
            words = m.group(1).split()
            if words[0] in commands:
                out.append((f"{path.relative_to(REPO)}", words))
    return out


def test_every_command_and_flag_in_deploy_exists():
    cli = _cli()
    found = _invocations()
    assert sum(w.startswith("compose/") for w, _ in found) >= 3 and any("README" in w for w, _ in found)
    for where, argv in found:
        _check_command(cli, argv, where)


# -- ports and probes ----------------------------------------------------------------
def _routes(*modules: Path) -> set[str]:
    """The paths the modules' route decorators declare (on the app or on a router)."""
    return {path for module in modules
            for path in re.findall(r"@\w+\.(?:get|api_route|post)\(\s*\"([^\"]+)\"", module.read_text())}


DESK_ROUTES = _routes(*sorted((REPO / "streams" / "desk").glob("*.py")))
INGEST_ROUTES = _routes(REPO / "streams" / "ingest_server.py")
# streams.metrics.serve: prometheus_client's /metrics plus the paths it answers itself (/healthz)
METRICS_ROUTES = {"/metrics", *re.findall(r'"PATH_INFO"\) == "([^"]+)"', (REPO / "streams" / "metrics.py").read_text())}


def _opt(argv: list[str], flag: str) -> str | None:
    return argv[argv.index(flag) + 1] if flag in argv else None


def _served_paths(argv: list[str], port: int, metrics_port: int | None) -> set[str] | None:
    """Paths a `deepwatch ...` process answers on ``port`` (None: it does not listen there)."""
    if metrics_port is not None and port == metrics_port:
        return METRICS_ROUTES
    if argv[0] == "serve" and port == int(_opt(argv, "--port") or 8080):
        return DESK_ROUTES
    if argv[0] == "serve-ingest" and port == int(_opt(argv, "--port") or 8087):
        return INGEST_ROUTES
    return None


def test_desk_and_ingest_answer_health_probes():
    assert "/healthz" in DESK_ROUTES and "/healthz" in INGEST_ROUTES and "/metrics" in INGEST_ROUTES
    assert METRICS_ROUTES == {"/metrics", "/healthz"}


def test_k8s_ports_and_probes_point_at_what_the_process_serves():
    for dep in _deployments():
        meta = dep["spec"]["template"]["metadata"]
        for c in _containers(dep):
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            metrics_port = int(env["DEEPWATCH_METRICS_PORT"]) if env.get("DEEPWATCH_METRICS_PORT") else None
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            where = dep["metadata"]["name"]
            if "metrics" in ports:
                assert ports["metrics"] == metrics_port, f"{where}: the metrics port is not DEEPWATCH_METRICS_PORT"
                assert int(meta["annotations"]["prometheus.io/port"]) == metrics_port, where
            for name, port in ports.items():
                assert _served_paths(c["args"], port, metrics_port) is not None, f"{where}: nothing listens on {name}={port}"
            for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
                probe = c.get(kind, {}).get("httpGet")
                if probe:
                    port = ports.get(probe["port"], probe["port"])
                    served = _served_paths(c["args"], int(port), metrics_port)
                    assert served and probe["path"] in served, f"{where}: {kind} {probe['path']} on {port}: not served"
    services = [d for d in _kustomize_resources(K8S / "base") if d["kind"] == "Service"]
    by_component = {d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in _deployments()}
    for svc in services:
        [dep] = [by_component[svc["spec"]["selector"]["app.kubernetes.io/component"]]]
        names = {p["name"] for c in _containers(dep) for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in names, f"{svc['metadata']['name']}: targetPort {p['targetPort']} is no container port"


def test_compose_ports_healthchecks_and_scrapes_agree():
    compose = _compose()
    for name, svc in _deepwatch_services().items():
        env = _env(svc)
        metrics_port = int(env["DEEPWATCH_METRICS_PORT"]) if env.get("DEEPWATCH_METRICS_PORT") else None
        argv = svc["command"]
        test = " ".join(svc.get("healthcheck", {}).get("test", []))
        for port, path in re.findall(r"http://(?:127\.0\.0\.1|localhost):(\d+)(/[\w/-]*)", test):
            served = _served_paths(argv, int(port), metrics_port)
            assert served and path in served, f"compose/{name}: healthcheck {path} on {port}: not served"
        for published in svc.get("ports", []):
            target = int(str(published).rsplit(":", 1)[1])
            assert _served_paths(argv, target, metrics_port) is not None, f"compose/{name}: nothing listens on {target}"
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    for job in prom["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            for target in sd["names"]:
                svc = compose["services"][target]
                metrics_port = _env(svc).get("DEEPWATCH_METRICS_PORT")
                served = _served_paths(svc["command"], sd["port"], int(metrics_port) if metrics_port else None)
                assert served and "/metrics" in served, (job["job_name"], target, sd["port"])


def test_compose_services_reach_the_broker_and_the_host_can_too():
    compose = _compose()
    kafka = _env(compose["services"]["kafka"])
    advertised = {u.split("://", 1)[0]: u.split("://", 1)[1] for u in kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    for name, svc in _deepwatch_services().items():
        for url in [_env(svc).get("DEEPWATCH_BROKER"), _opt(svc["command"], "--broker")]:
            if url:
                assert url.removeprefix("kafka://") in advertised.values(), f"compose/{name}: {url} is not a listener"
                assert url.removeprefix("kafka://").split(":")[0] in compose["services"], name
    # the README's way to produce events from the host must reach a listener
    # advertised under an address the host can use, and published there
    readme = (DEPLOY / "README.md").read_text()
    hosts = re.findall(r"deepwatch ingest \S+ --broker kafka://([\w.]+:\d+)", readme)
    assert hosts, "deploy/README.md shows no way to produce events"
    published = {str(p).rsplit(":", 2)[-2] + ":" + str(p).rsplit(":", 1)[1] for p in compose["services"]["kafka"].get("ports", [])}
    for hostport in hosts:
        assert hostport in advertised.values(), f"{hostport} is not an advertised listener (clients get sent those)"
        assert hostport.split(":")[1] in {p.split(":")[1] for p in published}, f"kafka does not publish {hostport}"


# -- secrets, exposure, privileges, resources ----------------------------------------
def test_compose_publishes_on_loopback_only_and_has_no_default_credentials():
    for name, svc in _compose()["services"].items():
        for p in svc.get("ports", []):
            assert str(p).startswith("127.0.0.1:"), f"compose/{name} publishes {p} on every interface"
        for key, value in _env(svc).items():
            if SECRET_NAME.search(key) and value not in (None, ""):
                v = str(value)
                m = re.fullmatch(r"\$\{(\w+)(?:(:?[-?])(.*))?\}", v)
                assert m, f"compose/{name}: {key} is a literal, not from the environment"
                assert m.group(2) in (None, ":?", "?") or m.group(3) == "", f"compose/{name}: {key} defaults to {m.group(3)!r}"


def test_k8s_secrets_come_from_secret_objects_and_none_is_applied_from_git():
    for dep in _deployments():
        for c in _containers(dep):
            for e in c.get("env", []):
                if SECRET_NAME.search(e["name"]):
                    assert "secretKeyRef" in e.get("valueFrom", {}), f"{dep['metadata']['name']}: {e['name']} in plain env"
    for overlay in (K8S / "base", *sorted((K8S / "overlays").iterdir())):
        applied = _kustomize_resources(overlay)
        secrets = [d["metadata"]["name"] for d in applied if d.get("kind") == "Secret"]
        assert not secrets, f"{overlay.name} applies Secrets from git (placeholders would overwrite real keys): {secrets}"
        for cm in (d for d in applied if d.get("kind") == "ConfigMap"):
            text = "\n".join(map(str, cm.get("data", {}).values()))
            assert not re.search(r"(?im)^\s*(password|api_key|token|secret)\s*=", text), cm["metadata"]["name"]


def test_k8s_pods_run_restricted_with_limits():
    for dep in _deployments():
        name = dep["metadata"]["name"]
        pod = dep["spec"]["template"]["spec"]
        sc = pod.get("securityContext", {})
        assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, name
        assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        for c in _containers(dep):
            csc = c.get("securityContext", {})
            assert csc.get("allowPrivilegeEscalation") is False and "ALL" in csc.get("capabilities", {}).get("drop", []), name
            assert not csc.get("privileged") and csc.get("runAsUser", 1) != 0, name
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c.get("resources", {}).get(kind, {})), f"{name}: no {kind}"


def test_the_namespace_says_which_pod_security_standard_it_holds_pods_to():
    # "Pods run under the restricted Pod Security Standard", said the README, with no label to make a
    # cluster check it: a pod that slipped would have run anyway
    ns = yaml.safe_load((REPO / "deploy" / "k8s" / "base" / "namespace.yaml").read_text())
    labels = ns["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/warn"] == labels["pod-security.kubernetes.io/audit"] == "restricted"
    assert labels["pod-security.kubernetes.io/enforce"] in ("baseline", "restricted")


def test_compose_deepwatch_services_have_memory_limits():
    for name, svc in _deepwatch_services().items():
        assert svc.get("mem_limit") or svc.get("deploy", {}).get("resources", {}).get("limits"), name


# -- the data directory --------------------------------------------------------------
def test_every_process_writes_its_data_dir_to_a_volume():
    for name, svc in _deepwatch_services().items():
        data = _env(svc)["DEEPWATCH_DATA_DIR"]
        targets = {str(v).split(":")[1] for v in svc["volumes"] if not str(v).endswith(":ro")}
        assert data in targets, f"compose/{name}: {data} is no writable volume"
    for dep in _deployments():
        for c in _containers(dep):
            env = {e["name"]: e.get("value") for e in c["env"]}
            mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
            data = env["DEEPWATCH_DATA_DIR"]
            assert data in mounts and not mounts[data].get("readOnly"), f"{dep['metadata']['name']}: {data}"
            # pipeline workers store every fetched picture in the blob store
            if "pipeline" in c["args"] or "analyze" in c["args"]:
                blobs = mounts.get(f"{data}/blobs")
                assert blobs and not blobs.get("readOnly"), f"{dep['metadata']['name']}: the blob store is not writable"


def _pvc(resources: list[dict], claim: str) -> dict:
    [pvc] = [d for d in resources if d.get("kind") == "PersistentVolumeClaim" and d["metadata"]["name"] == claim]
    return pvc


def test_k8s_sqlite_state_is_on_a_claim_one_pod_holds():
    """The cluster writer's engine state (cold tier: the only copy of evicted
    clusters) and the desk's database must outlive the pod, and SQLite must not
    be opened by two pods. `--role pipeline` replicas would each hold the writer
    in turn, each with its own pod-local engine-state.sqlite."""
    resources = _kustomize_resources(K8S / "base")
    roles = set()
    for dep in _deployments():
        name = dep["metadata"]["name"]
        for c in _containers(dep):
            argv = c["args"]
            role = _opt(argv, "--role") if argv[0] == "worker" else argv[0]
            roles.add(role)
            assert role != "pipeline", f"{name}: pipeline workers keep the cold tier on scratch; run analyze + cluster"
            if role not in ("cluster", "serve"):
                continue
            env = {e["name"]: e.get("value") for e in c["env"]}
            [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == env["DEEPWATCH_DATA_DIR"]]
            [vol] = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
            claim = vol.get("persistentVolumeClaim", {}).get("claimName")
            assert claim, f"{name}: {role} keeps SQLite state in {mount['mountPath']}, which is no claim"
            assert _pvc(resources, claim)["spec"]["accessModes"] == ["ReadWriteOnce"], claim
            assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate", name
    assert {"analyze", "cluster", "detect", "serve", "serve-ingest"} <= roles, roles


def test_compose_memory_limits_match_kubernetes():
    """The compose comments say "as k8s/...": keep the two in step (pipeline =
    both halves; its limit is the cluster writer's, which holds the index)."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}

    def size(v: str) -> int:
        m = re.fullmatch(r"(\d+)([a-zA-Z]*)", str(v))
        return int(m.group(1)) * units.get(m.group(2), 1)

    limits = {dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]:
              size(_containers(dep)[0]["resources"]["limits"]["memory"]) for dep in _deployments()}
    for job in (d for d in _kustomize_resources(K8S / "base") if d.get("kind") == "CronJob"):  # prune
        pod = job["spec"]["jobTemplate"]["spec"]["template"]
        limits[pod["metadata"]["labels"]["app.kubernetes.io/component"]] = size(
            pod["spec"]["containers"][0]["resources"]["limits"]["memory"])
    for name, svc in _deepwatch_services().items():
        component = {"pipeline": "cluster"}.get(name, name)
        assert size(svc["mem_limit"]) == limits[component], f"compose/{name} mem_limit vs k8s {component}"


# -- the image -----------------------------------------------------------------------
def _dockerfile() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines()  # type: ignore[misc]
            if line.strip() and not line.strip().startswith("#")]


def test_dockerfile_copies_what_the_package_needs():
    steps = _dockerfile()
    copied = []
    for op, rest in steps:
        if op == "COPY":
            *sources, _dest = rest.split()
            for src in (s for s in sources if not s.startswith("--")):
                assert list(REPO.glob(src)), f"COPY {src}: no such file in the build context (the repo root)"
                copied.append(src)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= set(copied), f"pip install . needs {packages - set(copied)} copied"
    assert project["project"]["readme"] in copied
    ignored = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    for src in copied:
        assert not any(Path(src).match(pat) or src == pat for pat in ignored), f"{src} is both copied and ignored"


def test_dockerfile_pins_cpu_torch_before_the_package_and_runs_non_root():
    steps = _dockerfile()
    args = dict(r.split("=", 1) for op, r in steps if op == "ARG" and "=" in r)
    assert args["TORCH_SPEC"].strip('"') == "torch==2.13.0"
    assert args["TORCH_INDEX_URL"].strip('"').endswith("/whl/cpu")
    runs = [r for op, r in steps if op == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "${TORCH_SPEC}" in r and "${TORCH_INDEX_URL}" in r)
    package_at = next(i for i, r in enumerate(runs) if re.search(r"pip install \.(\s|$)", r))
    assert torch_at < package_at, "torch must be installed (CPU build) before pip resolves the package's deps"
    [base] = [r for op, r in steps if op == "FROM"]
    assert ":" in base and not base.endswith(":latest")
    users = [r for op, r in steps if op == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", "numeric, non-root USER"
    assert [r for op, r in steps if op == "ENTRYPOINT"] == ['["deepwatch"]']


def test_dockerfile_environment_threads_and_model_cache():
    """A container sees its host's cores, not its CPU limit: thread pools are
    held to one as local workers hold them, and the ONNX cache is on the data
    volume (a restart does not export the backbone again)."""
    from streams.zygote import LOCAL_THREAD_ENV

    env = {}
    for op, rest in _dockerfile():
        if op == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", rest))
    assert {k: env.get(k) for k in LOCAL_THREAD_ENV} == LOCAL_THREAD_ENV
    assert env["XDG_CACHE_HOME"].startswith(env["DEEPWATCH_DATA_DIR"] + "/")


# -- monitoring ----------------------------------------------------------------------
def _rule_jobs() -> set[str]:
    rules = (REPO / "dashboards" / "generated" / "prometheus" / "deepwatch-rules.yaml").read_text()
    return set(re.findall(r'job="([\w-]+)"', rules))


def _relabel(cfg: list[dict], labels: dict[str, str]) -> dict[str, str] | None:
    """Prometheus' keep/drop/replace for the subset these files use."""
    labels = dict(labels)
    for r in cfg:
        value = r.get("separator", ";").join(labels.get(s, "") for s in r["source_labels"])
        hit = re.fullmatch(r.get("regex", "(.*)"), value)
        action = r.get("action", "replace")
        if action == "keep" and not hit or action == "drop" and hit:
            return None
        if action == "replace" and hit:
            labels[r["target_label"]] = hit.expand(r.get("replacement", "$1").replace("$1", r"\1"))
    return labels


def test_k8s_scrape_jobs_are_the_ones_the_rules_select():
    cfg = yaml.safe_load((K8S / "prometheus-scrape.yml").read_text())
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    assert _rule_jobs() <= set(jobs) | {"kafka"}, "rules select jobs the Kubernetes scrape config does not define"
    compose_jobs = {j["job_name"] for j in yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]}
    assert _rule_jobs() <= compose_jobs
    for dep in _deployments():
        component = dep["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        for c in _containers(dep):
            for port in c.get("ports", []):
                labels = {"__meta_kubernetes_pod_label_app_kubernetes_io_name": "deepwatch",
                          "__meta_kubernetes_pod_label_app_kubernetes_io_component": component,
                          "__meta_kubernetes_pod_container_port_name": port["name"],
                          "__meta_kubernetes_pod_name": f"{component}-0"}
                scraped = [name for name, j in jobs.items() if _relabel(j["relabel_configs"], labels) is not None]
                if component == "ingest":  # serve-ingest: /metrics on its metrics port, off the ingress's http one
                    want = ["deepwatch-ingest"] if port["name"] == "metrics" else []
                else:
                    want = [] if port["name"] != "metrics" else ["deepwatch-desk" if component == "desk" else "deepwatch"]
                assert scraped == want, (component, port["name"], scraped)



# -- the Kubernetes API's own schemas ---------------------------------------------------
# kubernetes-validate ships the API's JSON schemas inside its wheel (no network): strict
# validation refuses a misspelt or misplaced field, which the API server would drop or refuse
# at `kubectl apply`. The oldest version is the first whose schemas the wheel carries; the ECK
# operator's Elasticsearch kind is not in the core API (its CRD is ECK's), so it is left out.
K8S_VERSIONS = ("1.25.0", "1.37.0")
CORE_API = re.compile(r"^(v1|apps/v1|batch/v1|networking\.k8s\.io/v1|policy/v1|rbac\.authorization\.k8s\.io/v1)$")


def _manifests() -> list[tuple[str, dict]]:
    """Every resource a kustomization under deploy/k8s lists (patches are partial by design: their
    result is checked where kubectl can build it, ``test_kustomize_builds``)."""
    files = sorted({(k.parent / res).resolve() for k in K8S.rglob("kustomization.yaml")
                    for res in _docs(k)[0].get("resources", []) if (k.parent / res).is_file()}
                   | set(K8S.rglob("*.example.yaml")))  # applied by hand, filled in: valid as they stand
    assert len(files) >= 10, files
    return [(f"{path.relative_to(K8S)}[{i}]", doc) for path in files for i, doc in enumerate(_docs(path))]


def test_the_kubernetes_manifests_are_all_in_the_core_api_but_the_eck_cluster():
    kinds = {(doc["apiVersion"], doc["kind"]) for _, doc in _manifests() if not CORE_API.match(doc["apiVersion"])}
    assert kinds == {("elasticsearch.k8s.elastic.co/v1", "Elasticsearch")}


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_kubernetes_manifest_is_valid_against_the_api_schema(version):
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (make install)")
    checked, problems = 0, []
    for where, doc in _manifests():
        if not CORE_API.match(doc["apiVersion"]):
            continue
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            problems.append(f"{where} {doc['kind']}/{doc['metadata']['name']}: {e.message} at "
                            f"{'.'.join(str(p) for p in e.path)}")
        checked += 1
    assert checked >= 15 and not problems, problems


def test_schema_validation_catches_a_misplaced_field():
    """The check above can fail: a probe put on the pod instead of its container, as hand edits do."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed (make install)")
    [dep] = [d for d in _deployments() if d["metadata"]["name"] == "deepwatch-desk"]
    pod = dep["spec"]["template"]["spec"]
    pod["livenessProbe"] = pod["containers"][0]["livenessProbe"]
    with pytest.raises(kv.ValidationError, match="livenessProbe"):
        kv.validate(dep, K8S_VERSIONS[-1], strict=True)


# -- kustomize itself, where kubectl is installed -------------------------------------
@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
@pytest.mark.parametrize("overlay", ["base", "overlays/eck", "overlays/gpu"])
def test_kustomize_builds(overlay):
    from streams.settings_check import check_environment

    res = subprocess.run(["kubectl", "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    assert not [d for d in docs if d["kind"] == "Secret"]
    for d in (d for d in docs if d["kind"] == "Deployment"):
        assert d["metadata"]["namespace"] == "deepwatch"
        for c in _containers(d):
            check_environment({e["name"]: "x" for e in c.get("env", []) if e["name"].startswith("DEEPWATCH_")})
    if overlay.endswith("gpu"):
        [detect] = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "deepwatch-detect"]
        [c] = _containers(detect)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert {"name": "DEEPWATCH_DETECT__DEVICE", "value": "cuda"} in c["env"]
    try:  # last: the checks above stand without the schema wheel
        import kubernetes_validate as kv
    except ImportError:
        return
    for d in docs:  # patches applied: what the API server gets
        if CORE_API.match(d["apiVersion"]):
            kv.validate(d, K8S_VERSIONS[-1], strict=True)


def test_the_ingest_endpoint_creates_its_topics_where_it_may_start_before_any_worker():
    """Compose's Kafka does not auto-create topics: serve-ingest answered
    every request 503 until some worker had started and created them."""
    kafka_env = _env(_compose()["services"]["kafka"])
    assert kafka_env.get("KAFKA_AUTO_CREATE_TOPICS_ENABLE") == "false"
    found = [(where, argv) for where, argv in _invocations()  # the processes, not the docs' mentions
             if argv[0] == "serve-ingest" and where.startswith(("compose/", "k8s/"))]
    places = {where.split("/")[0] for where, _ in found}
    assert {"compose", "k8s"} <= places, found
    for where, argv in found:
        assert "--create-topics" in argv, f"{where}: `deepwatch {' '.join(argv)}` without --create-topics"


# -- the GPU overlay: the CUDA image for detect only ---------------------------------
GPU_IMAGE = "deepwatch:gpu"


def _pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    """(kind/name, pod spec) of every workload: Deployments, StatefulSets,
    DaemonSets, Jobs and the CronJobs' job templates."""
    out = []
    for d in docs:
        spec = d.get("spec") or {}
        if d.get("kind") == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        if "template" in spec:
            out.append((f"{d['kind']}/{d['metadata']['name']}", spec["template"]["spec"]))
    return out


def _images(docs: list[dict]) -> dict[str, set[str]]:
    """kind/name -> the images its containers (init containers too) run."""
    return {where: {c["image"] for c in pod.get("containers", []) + pod.get("initContainers", [])}
            for where, pod in _pod_templates(docs)}


def test_gpu_overlay_sets_the_cuda_image_on_detect_alone():
    """An `images:` transformer retags every workload of the overlay: the
    analyze, cluster, desk, ingest and prune pods pulled the CUDA build too.
    The detect patch names the image instead (as compose.gpu.yaml does)."""
    overlay = K8S / "overlays" / "gpu"
    [kust] = _docs(overlay / "kustomization.yaml")
    assert "images" not in kust, "an images: transformer retags every workload, not only detect"
    patched = {}
    for patch in kust["patches"]:
        for doc in _docs(overlay / patch["path"]):
            for c in _containers(doc):
                if "image" in c:
                    patched[(doc["kind"], doc["metadata"]["name"], c["name"])] = c["image"]
    assert patched == {("Deployment", "deepwatch-detect", "detect"): GPU_IMAGE}, patched
    [gpu_compose] = _docs(DEPLOY / "compose.gpu.yaml")
    assert {n: s.get("image") for n, s in gpu_compose["services"].items()} == {"detect": GPU_IMAGE}


@pytest.mark.skipif(shutil.which("kubectl") is None,
                    reason="kubectl is not installed: `kubectl kustomize` is what renders the overlay's images")
def test_gpu_overlay_renders_the_cuda_image_for_detect_only():
    def render(overlay: str) -> list[dict]:
        res = subprocess.run(["kubectl", "kustomize", str(K8S / overlay)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return [d for d in yaml.safe_load_all(res.stdout) if d]

    base, gpu = _images(render("base")), _images(render("overlays/gpu"))
    assert set(base) == set(gpu) and {"Deployment/deepwatch-detect", "CronJob/deepwatch-prune"} <= set(gpu), gpu
    assert len(gpu) >= 6, gpu  # analyze, cluster, desk, detect, ingest, prune
    on_gpu = sorted(w for w, images in gpu.items() if GPU_IMAGE in images)
    assert on_gpu == ["Deployment/deepwatch-detect"], f"the CUDA image runs in {on_gpu}"
    assert gpu["Deployment/deepwatch-detect"] == {GPU_IMAGE}
    for where, images in gpu.items():
        if where != "Deployment/deepwatch-detect":
            assert images == base[where], f"{where}: {images}, base {base[where]}"


# -- blob retention, in compose too --------------------------------------------------
def test_compose_has_the_blob_retention_job_kubernetes_has():
    """Kubernetes prunes the blob store daily (k8s/base/prune.yaml); compose
    had no such job, and its data volume grew without bound."""
    from streams.cli.prune import parse_period

    compose = _compose()
    prune = compose["services"]["prune"]
    [job] = [d for d in _kustomize_resources(K8S / "base") if d.get("kind") == "CronJob"]
    [c] = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert prune["command"] == c["args"], "the same retention as the CronJob"
    assert parse_period(_opt(prune["command"], "--older-than")) == 30 * 86400
    # a job run from cron, not a server `up` starts and restarts
    assert prune.get("profiles") and prune.get("restart") == "no"
    assert prune.get("healthcheck", {}).get("disable") is True, "it serves no /healthz for the anchor's healthcheck"
    # the blob store the workers write, and their settings (findings.url: the clusters' store)
    env = _env(prune)
    pipeline = compose["services"]["pipeline"]
    assert env["DEEPWATCH_DATA_DIR"] == _env(pipeline)["DEEPWATCH_DATA_DIR"]
    assert env["DEEPWATCH_CONFIG"] == _env(pipeline)["DEEPWATCH_CONFIG"]
    volumes = {str(v).split(":")[1]: str(v) for v in prune["volumes"]}
    assert volumes[env["DEEPWATCH_DATA_DIR"]] in {str(v) for v in pipeline["volumes"]}
    assert "elasticsearch" in prune["depends_on"] and "kafka" not in prune["depends_on"], "it needs the store only"
    # documented: the CronJob in the base table, and how compose schedules its job
    readme = (DEPLOY / "README.md").read_text()
    base_row = next(line for line in readme.splitlines() if line.startswith("| `k8s/base`"))
    assert "prune.yaml" in base_row and "CronJob" in base_row
    compose_row = next(line for line in readme.splitlines() if line.startswith("| `compose.yaml`"))
    assert "`prune`" in compose_row
    cron = re.findall(r"^(?:\S+\s+){5}cd \S+ && docker compose -f deploy/compose.yaml run --rm (?:-T )?prune(?:\s|$)", readme, re.M)
    assert cron, "deploy/README.md gives no crontab line for compose's prune job"
