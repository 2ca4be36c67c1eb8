"""What the README, deploy/README.md and docs/connectors.md tell a user to type
or to look for exists: every ``deepwatch`` command, sub-command and flag they
show (listed by its ``--help``; and the literal values shown for ``--role``,
``--format``, ``--sort`` and ``--verdict``), every ``python -m``/``bench``
script and its flags, every setting they name (with the default they quote),
every metric (with the labels they list), alert rule, Alertmanager inhibition,
dashboard and panel, every HTTP route of the desk, the ingest endpoint and the
metrics port, and the fields of the alert body and of replay's summary. The
docs are parsed, not copied here, so an edit to either side that breaks a
claim fails. No broker, no workers: imports and text only."""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]
DOCS = {name: REPO / name for name in ("README.md", "deploy/README.md", "docs/connectors.md")}


def _read(name: str) -> str:
    return DOCS[name].read_text()


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


@dataclass(frozen=True)
class Snippet:
    """Code the reader is shown: a fenced block (``fenced``: `|` is a shell pipe)
    or an inline code span (`|` separates alternatives, as in `a\\|b`)."""
    doc: str
    line: int
    text: str
    fenced: bool


FENCE = re.compile(r"^[ \t]*```([^\n]*)\n(.*?)^[ \t]*```", re.S | re.M)  # fences may be indented in a list
SPAN = re.compile(r"`([^`\n]+(?:\n[^`\n]+)?)`")  # a span may wrap once, as the README's long ones do


def _snippets(name: str) -> list[Snippet]:
    text = _read(name)
    out = [Snippet(name, _line(text, m.start(2)), m.group(2), True) for m in FENCE.finditer(text)]
    # blank the fences (keeping line numbers) so their backticks do not pair up as spans
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    out += [Snippet(name, _line(prose, m.start(1)), m.group(1), False) for m in SPAN.finditer(prose)]
    return out


# -- commands and flags ----------------------------------------------------------
def _cli() -> Any:
    import typer

    from streams.cli import app  # registers every command group

    return typer.main.get_command(app)


# The values a few options take are checked in the command's body, not by a
# click type: the tuples those checks read, or the pairs they compare with.
def _known_values() -> dict[tuple[str, str], tuple[str, ...]]:
    from streams.cli.query import SEARCH_SORTS
    from streams.findings import VERDICTS
    from streams.topics import ROLES

    return {("worker", "--role"): ROLES, ("search", "--sort"): SEARCH_SORTS, ("search", "--verdict"): VERDICTS,
            ("desk-user", "--role"): ("viewer", "editor"), ("settings", "--format"): ("markdown", "json")}


def _allowed_values(path: tuple[str, ...], param: Any) -> tuple[str, ...] | None:
    flag = next(o for o in param.opts if o.startswith("--"))
    known = _known_values().get((path[0], flag))
    if known is not None:
        return known
    annotation = param.type_descriptor.annotation
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return tuple(str(m.value) for m in annotation)
    if flag == "--format":  # every other command checks it with streams.cli.common.check_format's pair
        return ("table", "json")
    return None


# `deepwatch` as a word (also `.venv/bin/deepwatch`; not kubectl's namespace `-n deepwatch`)
INVOCATION = re.compile(r"(?:^|(?<=[\s(\"])|(?<=bin/))(?<!-n )deepwatch(?= |$)", re.M)
ALT = "\x00"  # stands for an alternative's `|` once pipes are cut off


def _invocations(snippet: Snippet) -> list[list[str]]:
    text = snippet.text.replace("\\\n", " ")  # shell line continuations
    text = text.replace("\\|", ALT)
    if not snippet.fenced:
        text = text.replace("|", ALT)
    found = []
    for m in INVOCATION.finditer(text):
        end = text.find("\n", m.end())
        rest = text[m.end(): end if end >= 0 else len(text)]
        # the command ends at a shell operator, a redirection or a comment
        rest = re.split(r"\s#|[|;&<>)`]|\$\(", rest)[0]
        words = [w.strip("[]") for w in rest.split()]
        found.append([w for w in words if w and w not in ("\\", "...", "…")])
    return found


def _is_placeholder(word: str) -> bool:
    """DIR, N, URL, FEED.jsonl, C: names the reader replaces."""
    return not re.fullmatch(r"[a-z0-9][a-z0-9_.:-]*", word)


def _expand(words: list[str]) -> list[list[str]]:
    """`clusters|alerts X` is two invocations, `clusters X` and `alerts X`."""
    if not words or ALT not in words[0]:
        return [words]
    return [[alt, *words[1:]] for alt in words[0].split(ALT)]


def _check_invocation(cli: Any, words: list[str], where: str, path: tuple[str, ...] = ()) -> list[str]:
    """What is wrong with `deepwatch *path *words` (``cli``: the command ``path`` names)."""
    problems: list[str] = []
    shown = "deepwatch " + " ".join((*path, *words)).replace(ALT, "|")
    top = path
    for argv in _expand(words):
        cmd, rest, path = cli, list(argv), top
        while hasattr(cmd, "commands") and rest and not rest[0].startswith("-"):
            for alt in rest[0].split(ALT):
                if alt not in cmd.commands:
                    return [f"{where}: `{shown}`: no command {' '.join((*path, alt))!r}"]
            options = _expand(rest)
            if len(options) > 1:  # `bank add|import|list`: each sub-command on its own
                for sub in options:
                    problems += _check_invocation(cmd.commands[sub[0]], sub[1:], where, (*path, sub[0]))
                return problems
            path, cmd, rest = (*path, rest[0]), cmd.commands[rest[0]], rest[1:]
        if hasattr(cmd, "commands") and not rest:
            continue  # a group named as a whole in prose, e.g. `deepwatch connect`
        params = {o: p for p in cmd.params if p.param_type_name == "option" for o in (*p.opts, *p.secondary_opts)}
        i = 0
        while i < len(rest):
            word = rest[i]
            i += 1
            if not word.startswith("-") or word in ("-", "--"):
                continue
            flag, _, inline = word.partition("=")
            param = params.get(flag)
            if param is None:
                problems.append(f"{where}: `{shown}`: {flag} is not an option of "
                                f"`deepwatch {' '.join(path) or '(root)'}`")
                continue
            if param.is_flag or flag in param.secondary_opts:
                continue
            value = inline or (rest[i] if i < len(rest) and not rest[i].startswith("-") else "")
            i += 0 if inline else 1
            allowed = _allowed_values(path, param) if path else None
            for v in value.split(ALT) if allowed is not None and value else []:
                if not _is_placeholder(v) and v not in allowed:
                    problems.append(f"{where}: `{shown}`: {flag} {v!r} is refused (it takes {', '.join(allowed)})")
    return problems


def test_every_deepwatch_command_flag_and_value_shown_in_the_docs_exists():
    cli = _cli()
    problems, checked = [], 0
    for name in DOCS:
        for snippet in _snippets(name):
            for words in _invocations(snippet):
                checked += 1
                problems += _check_invocation(cli, words, f"{name}:{snippet.line}")
    # the parser must keep seeing the README's command table and examples
    assert not problems, "\n".join(problems)
    assert checked >= 80, checked


def test_the_invocation_parser_catches_what_it_is_for():
    """The parser above reports a wrong flag, sub-command or value, also inside
    a table's `a\\|b` alternatives (a parser that saw nothing would pass)."""
    cli = _cli()
    cases = {
        "`deepwatch clusters\\|alerts --data-dir DIR --formt json`": "--formt is not an option",
        "`deepwatch bank add\\|imprt\\|list`": "no command 'bank imprt'",
        "`deepwatch worker --role pipeline\\|detector --broker URL`": "--role 'detector' is refused",
        "`deepwatch search QUERY --sort velocity|views`": "--sort 'views' is refused",
    }
    for span, expected in cases.items():
        (words,) = _invocations(Snippet("case", 1, span.strip("`"), fenced=False))
        problems = _check_invocation(cli, words, "case")
        assert any(expected in p for p in problems), (span, problems)
    fenced = Snippet("case", 1, "deepwatch connect bluesky --dry-run | head\ndeepwatch search x \\\n  --all", True)
    assert all(not _check_invocation(cli, w, "case") for w in _invocations(fenced))


def test_every_query_command_the_readme_says_takes_json_does():
    """"The query commands (`clusters`, ...) take `--json` for `--format json`"."""
    cli = _cli()
    text = _read("README.md")
    m = re.search(r"query commands \(([^)]*)\)\s+take `--json`", text)
    assert m, "README.md no longer lists the commands that take --json"
    named = re.findall(r"`([a-z -]+)`", m.group(1))
    assert len(named) >= 5, named
    for words in named:
        cmd = cli
        for word in words.split():
            cmd = cmd.commands[word]
        assert "--json" in {o for p in cmd.params for o in p.opts}, f"`deepwatch {words}` has no --json"


def test_every_flag_shown_is_listed_by_its_commands_help():
    """`deepwatch COMMAND --help` is where a reader checks a flag the docs show."""
    from typer.testing import CliRunner

    from streams.cli import app

    cli, shown = _cli(), {}
    for name in DOCS:
        for snippet in _snippets(name):
            for words in _invocations(snippet):
                for argv in _expand(words):
                    cmd, rest, path = cli, list(argv), ()
                    while hasattr(cmd, "commands") and rest and rest[0] in cmd.commands:
                        cmd, rest, path = cmd.commands[rest[0]], rest[1:], (*path, rest[0])
                    flags = {w.split("=")[0] for w in rest if w.startswith("--")}
                    shown.setdefault(path, set()).update(flags)
    assert len(shown) >= 15, sorted(shown)
    missing = []
    for path, flags in shown.items():
        result = CliRunner().invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        missing += [f"deepwatch {' '.join(path)} --help: no {flag}" for flag in sorted(flags)
                    if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", result.output)]
    assert not missing, "\n".join(missing)


# `python -m dashboards.build ...`, `python bench/replay.py ...`: the script and its flags
SCRIPT = re.compile(r"\bpython3?\s+(?:-m\s+([a-z_][a-z0-9_.]*)|((?:bench|dashboards|streams)/[a-z0-9_/]+\.py))([^\n]*)")


def test_every_script_and_flag_the_docs_run_exists():
    problems, seen = [], 0
    for name in DOCS:
        for snippet in _snippets(name):
            text = snippet.text.replace("\\\n", " ") if snippet.fenced else " ".join(snippet.text.split())
            for m in SCRIPT.finditer(text):
                path = REPO / (m.group(2) or m.group(1).replace(".", "/") + ".py")
                if not path.is_file() and m.group(1):
                    path = REPO / m.group(1).replace(".", "/") / "__main__.py"
                seen += 1
                if not path.is_file():
                    problems.append(f"{name}:{snippet.line}: no script {m.group(1) or m.group(2)}")
                    continue
                source = path.read_text()
                rest = re.split(r"\s#|[|;&<>)`]", m.group(3))[0]
                for flag in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", rest):
                    if f'"{flag}"' not in source:
                        problems.append(f"{name}:{snippet.line}: {path.relative_to(REPO)} takes no {flag}")
    assert not problems, "\n".join(problems)
    assert seen >= 10, seen


# -- settings ---------------------------------------------------------------------
def _settings_fields() -> dict[str, tuple[type[BaseModel], str]]:
    """``section.key`` (or a top-level ``key``) -> (the model that declares it, the field name)."""
    from streams.settings import Settings

    fields: dict[str, tuple[type[BaseModel], str]] = {}
    for name, field in Settings.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            fields.update({f"{name}.{key}": (ann, key) for key in ann.model_fields})
        else:
            fields[name] = (Settings, name)
    return fields


def _sections() -> set[str]:
    return {k.split(".")[0] for k in _settings_fields() if "." in k}


FILE_SUFFIXES = (".md", ".py", ".yaml", ".yml", ".sqlite", ".png", ".json", ".toml", ".jsonl", ".pem")
UNITS = {"s": 1.0, "ms": 1e-3, "h": 3600.0, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
NUMBER = r"[0-9]+(?:[ ,\u202f][0-9]{3})*(?:\.[0-9]+)?"
# What the docs write right after a setting's name when they quote its default:
# "(10 s)", ", 8", "(1 by default", ", default 200 000", "(`X` by default)", "= `deepwatch`"
STATED_NUMBER = re.compile(rf"\s*(?:\(|,)\s*(?:default\s+)?({NUMBER})(?:\s*(s|ms|h|KiB|MiB|GiB)\b)?(?!\s*[×x*/%])")
STATED_STRING = re.compile(r"\s*(?:\(\s*`([^`]+)`\s+by default|=\s*`([^`]+)`)")


def _to_number(text: str, unit: str | None, key: str) -> float:
    value = float(re.sub(r"[ ,\u202f]", "", text))
    if unit is None:
        return value
    scale = UNITS[unit]
    if key.endswith("_ms"):
        scale /= 1e-3
    elif key.endswith("_hours"):
        scale /= 3600.0
    return value * scale


@dataclass(frozen=True)
class SettingClaim:
    where: str
    key: str
    assigned: str | None  # `key = value` inside the span: an example, to be accepted
    stated: Any  # the default the prose quotes after the span, if any


def _setting_claims(name: str) -> list[SettingClaim]:
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), _read(name))
    fields, sections = _settings_fields(), _sections()
    # docs/connectors.md names the connectors section's keys bare
    bare = {k.split(".", 1)[1]: k for k in fields if k.startswith("connectors.")} if name.endswith("connectors.md") else {}
    claims = []
    for m in SPAN.finditer(text):
        span = m.group(1).strip()
        key, eq, value = (part.strip() for part in span.partition("="))
        if " " in key or key.endswith(FILE_SUFFIXES):
            continue
        after = text[m.end(): m.end() + 60]
        if key in bare:
            key = bare[key]
        elif "." not in key and key in fields and (eq or STATED_STRING.match(after)):
            pass  # a top-level setting shown with a value: `local_workers = "spawn"`, `topic_prefix` = `x`
        elif not ("." in key and key.split(".")[0] in sections and re.fullmatch(r"[a-z_]+\.[a-z0-9_]+", key)):
            continue
        stated: Any = None
        if not eq:
            num = STATED_NUMBER.match(after)
            # a size is stated with its unit ("2 MiB"): `ingest_max_body_bytes` (413) is a status code
            if num and (num.group(2) or not key.endswith("_bytes") or "default" in num.group(0)):
                stated = _to_number(num.group(1), num.group(2), key)
            elif s := STATED_STRING.match(after):
                stated = s.group(1) or s.group(2)
        claims.append(SettingClaim(f"{name}:{_line(text, m.start())}", key, value if eq else None, stated))
    return claims


def test_every_setting_the_docs_name_exists_with_the_default_they_state():
    fields = _settings_fields()
    problems, stated = [], 0
    for name in DOCS:
        for claim in _setting_claims(name):
            if claim.key not in fields:
                problems.append(f"{claim.where}: `{claim.key}` is not a setting")
                continue
            model, field = fields[claim.key]
            default = model.model_fields[field].get_default(call_default_factory=True)
            if claim.stated is not None:
                stated += 1
                same = (float(default) == claim.stated if isinstance(claim.stated, float) and
                        isinstance(default, (int, float)) else str(default) == str(claim.stated))
                if not same:
                    problems.append(f"{claim.where}: `{claim.key}` is stated as {claim.stated!r}; its default is "
                                    f"{default!r}")
            if claim.assigned is not None:
                try:
                    value = tomllib.loads(f"v = {claim.assigned}")["v"]
                except tomllib.TOMLDecodeError:
                    value = claim.assigned  # `detect.device = cuda`: a bare word is a string
                try:
                    model.model_validate({field: value})
                except Exception as e:  # noqa: BLE001  (pydantic's ValidationError, reported whole)
                    problems.append(f"{claim.where}: `{claim.key} = {claim.assigned}` is refused: {e}")
    assert not problems, "\n".join(problems)
    assert stated >= 12, stated  # the parser still reads the quoted defaults


def test_every_webhook_field_and_toml_example_the_docs_show_is_accepted():
    """"the hook's `timeout_s`" names a field of an `[[alerts.webhooks]]` table,
    and a TOML example is one a user pastes into the settings file."""
    from streams.settings import Settings, WebhookSettings

    problems, tables = [], 0
    for name in DOCS:
        text = _read(name)
        for m in re.finditer(r"hook's\s+`([a-z_]+)`", text):
            if m.group(1) not in WebhookSettings.model_fields:
                problems.append(f"{name}:{_line(text, m.start())}: a webhook has no field `{m.group(1)}`")
        for m in FENCE.finditer(text):
            if m.group(1).strip() == "toml":
                tables += 1
                try:
                    Settings.model_validate(tomllib.loads(re.sub(r"(?m)^[ \t]+", "", m.group(2))))
                except Exception as e:  # noqa: BLE001  (a TOML or validation error, reported whole)
                    problems.append(f"{name}:{_line(text, m.start())}: the TOML example is refused: {e}")
    assert tables >= 1
    assert not problems, "\n".join(problems)


def test_the_default_parser_reads_the_forms_the_docs_use():
    m = STATED_NUMBER.match(" (10 s) with a 503")
    assert m and _to_number(m.group(1), m.group(2), "findings.search_timeout_s") == 10.0
    m = STATED_NUMBER.match(" (default 2 MiB)")
    assert m and _to_number(m.group(1), m.group(2), "connectors.max_frame_bytes") == 2 * 1024 * 1024
    m = STATED_NUMBER.match(",\ndefault 200 000 posts")
    assert m and _to_number(m.group(1), m.group(2), "connectors.post_cache_max") == 200_000
    assert STATED_NUMBER.match(" pages (default 5 × 40 statuses)") is None
    s = STATED_STRING.match(" (`DEEPWATCH_KAFKA_PASSWORD` by default)")
    assert s and s.group(1) == "DEEPWATCH_KAFKA_PASSWORD"


# -- metrics -------------------------------------------------------------------------
def _metrics() -> dict[str, set[str]]:
    """Every metric family deepwatch processes export -> its label names."""
    from prometheus_client.metrics import MetricWrapperBase

    import streams.connectors.atproto_identity
    import streams.connectors.base
    import streams.desk.observe
    import streams.ingest_server
    import streams.metrics

    found: dict[str, set[str]] = {}
    for module in (streams.metrics, streams.desk.observe, streams.connectors.base, streams.connectors.atproto_identity,
                   streams.ingest_server):
        for obj in vars(module).values():
            if isinstance(obj, MetricWrapperBase):
                # prometheus_client keeps a counter's name without `_total`; the exposition adds it
                name = obj._name + ("_total" if obj._type == "counter" else "")  # noqa: SLF001
                found[name] = set(obj._labelnames)  # noqa: SLF001
    return found


METRIC = re.compile(r"\bdeepwatch_[a-z0-9_]+[a-z0-9](?:\{([^}\n]*)\})?")


def test_every_metric_the_docs_name_is_exported_with_the_labels_they_list():
    metrics = _metrics()
    problems, seen = [], 0
    for name in DOCS:
        text = _read(name)
        for m in METRIC.finditer(text):
            metric = m.group(0).split("{")[0]
            where = f"{name}:{_line(text, m.start())}"
            seen += 1
            if metric not in metrics:
                problems.append(f"{where}: {metric} is not exported")
                continue
            if m.group(1) is None:
                continue
            items = [i.strip() for i in m.group(1).split(",") if i.strip()]
            labels = {re.split(r"[=!~]", i)[0] for i in items}
            if not labels <= metrics[metric]:
                problems.append(f"{where}: {metric} has no label {sorted(labels - metrics[metric])}")
            elif any(not re.search(r"[=!~]", i) for i in items) and labels != metrics[metric]:
                # a bare list ({connector,outcome}) is read as the series' whole label set
                problems.append(f"{where}: {metric}{{{m.group(1)}}} lists labels {sorted(labels)}; it has "
                                f"{sorted(metrics[metric])}")
    assert not problems, "\n".join(problems)
    assert seen >= 20, seen


# -- alert rules and dashboard panels ---------------------------------------------
GENERATED = REPO / "dashboards" / "generated"


def _alert_names() -> set[str]:
    rules = yaml.safe_load((GENERATED / "prometheus" / "deepwatch-rules.yaml").read_text())
    return {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}


def test_every_alert_the_docs_name_is_a_rule():
    alerts = _alert_names()
    problems, seen = [], 0
    for name in DOCS:
        text = _read(name)
        for m in re.finditer(r"\bDeepwatch[A-Z][A-Za-z]*(\*?)", text):
            seen += 1
            word = m.group(0).rstrip("*")
            ok = any(a.startswith(word) for a in alerts) if m.group(1) else word in alerts
            if not ok:
                problems.append(f"{name}:{_line(text, m.start())}: no alert rule {m.group(0)}")
    assert not problems, "\n".join(problems)
    assert seen >= 30, seen


def _panel_titles() -> set[str]:
    titles: set[str] = set()

    def walk(panels: list[dict]) -> None:
        for p in panels:
            titles.add(p.get("title", ""))
            walk(p.get("panels", []))

    for path in (GENERATED / "grafana" / "dashboards").rglob("*.json"):
        board = json.loads(path.read_text())
        titles.add(board["title"].split(" — ", 1)[-1])  # "deepwatch — Pipeline health"
        walk(board.get("panels", []))
    return titles


# "X" panel / row / dashboard, the dashboard as "X"
PANEL = re.compile(r"\"([^\"]{3,80})\"(?=\s+(?:panels?|row|dashboard)\b)|(?:dashboard as|panels?)\s+\"([^\"]{3,80})\"")


def test_every_dashboard_panel_the_docs_name_exists():
    titles = _panel_titles()
    problems, seen = [], 0
    for name in DOCS:
        text = _read(name)
        for m in PANEL.finditer(text):
            title = " ".join((m.group(1) or m.group(2)).split())  # a title may wrap in the source
            seen += 1
            if title not in titles:
                problems.append(f"{name}:{_line(text, m.start())}: no panel, row or dashboard titled {title!r}")
    assert not problems, "\n".join(problems)
    assert seen >= 10, seen


def test_the_dashboards_the_readme_names_are_the_ones_generated():
    """The Grafana paragraph names each dashboard in quotes before its contents."""
    text = " ".join(_read("README.md").split())
    start = text.index("Grafana (`dashboards/`")
    named = set(re.findall(r'"([^"]+)"', text[start:text.index(", all with an annotation layer", start)]))
    boards = {json.loads(p.read_text())["title"].split(" — ", 1)[-1]
              for p in (GENERATED / "grafana" / "dashboards").rglob("*.json")}
    assert named == boards, (named, boards)


# -- HTTP routes -----------------------------------------------------------------------
def _declared_routes(*modules: Path) -> set[str]:
    return {path for module in modules
            for path in re.findall(r"\.(?:get|post|api_route|head)\(\s*\"(/[^\"]*)\"", module.read_text())}


def _served_routes() -> set[str]:
    from streams.desk.apidocs import DOCS_PATH

    desk = _declared_routes(*sorted((REPO / "streams" / "desk").glob("*.py")))
    ingest = _declared_routes(REPO / "streams" / "ingest_server.py")
    # streams.metrics.serve: prometheus_client's /metrics and what it answers itself
    metrics = {"/metrics", *re.findall(r'"PATH_INFO"\) == "([^"]+)"', (REPO / "streams" / "metrics.py").read_text())}
    return desk | ingest | metrics | {DOCS_PATH}


def _route_matches(claim: str, route: str) -> bool:
    pattern = re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(route))  # {cluster_id}, {account_id:path}
    return re.fullmatch(pattern, claim) is not None


# a span that is a route: `/healthz`, `POST /ingest`, `/api/clusters?limit=1000`, `<desk.public_url>/clusters/<cluster_id>`
ROUTE = re.compile(r"(?:(?:GET|POST|HEAD)\s+)?(?:<[^>]+>)?(/(?:api|healthz|metrics|docs|ingest|clusters|accounts)\b\S*)")


def test_every_route_the_readmes_name_is_served():
    routes = _served_routes()
    problems, seen = [], 0
    for name in (n for n in DOCS if n.endswith("README.md")):  # docs/connectors.md quotes Mastodon's routes too
        for snippet in _snippets(name):
            m = ROUTE.fullmatch(snippet.text.strip())
            if snippet.fenced or m is None or m.group(1) == "/api/...":  # "the REST API is at `/api/...`"
                continue
            claim = re.sub(r"<[^>]+>", "x", m.group(1)).split("?")[0]
            seen += 1
            if not any(_route_matches(claim, r) for r in routes):
                problems.append(f"{name}:{snippet.line}: nothing serves {m.group(1)}")
    assert not problems, "\n".join(problems)
    assert seen >= 10, seen


@pytest.mark.parametrize("claim,route,ok", [("/clusters/x", "/clusters/{cluster_id}", True),
                                            ("/accounts/x", "/accounts/{account_id:path}", True),
                                            ("/api/clusterz", "/api/clusters", False)])
def test_route_templates_match_as_a_client_would_call_them(claim, route, ok):
    assert _route_matches(claim, route) is ok


# -- the late-feed note in an alert's rule ---------------------------------------------
def test_the_late_feed_note_the_readme_quotes_is_what_alerts_carry():
    """The README quotes the suffix a replayed feed's alert `rule` gets; it read
    "N h" only, while a week-old feed (its own example) gets "N days"."""
    from datetime import datetime, timedelta, timezone

    from streams.clustering import ClusterState, _behind

    text = " ".join(_read("README.md").split())
    m = re.search(r"`(; replayed or late feed: [^`]+)`( \(`N days` from 48 hours on\))?", text)
    assert m, "README.md no longer quotes the late-feed note"
    template = re.escape(m.group(1)).replace(re.escape("<time>"), r"\d{4}-\d\d-\d\d \d\d:\d\d")
    units = "h|days" if m.group(2) else "h"
    pattern = template.replace(re.escape("N h"), rf"[0-9.]+ (?:{units})")
    now = datetime.now(timezone.utc)
    for age in (timedelta(hours=3), timedelta(days=7)):
        note = _behind(ClusterState(cluster_id="c", last_seen=now - age), None)
        assert re.fullmatch(pattern, note), (note, m.group(0))


# -- the alert webhook's body ------------------------------------------------------------
def test_every_alert_field_the_readme_names_is_in_the_alert_schema():
    """The webhook notes name the alert body's fields one by one; subscribers
    code against them, in the schema the README names (`deepwatch schema alert` prints it)."""
    schema = json.loads((REPO / "streams" / "schemas" / "alert-v1.schema.json").read_text())
    sample = schema["$defs"]["SamplePost"]["properties"]
    text = _read("README.md")
    start, end = text.index("The body is the alert's JSON"), text.index("Unset, nothing is")
    part = text[start:end]
    named = set(re.findall(r"`([a-z][a-z_]*)`", part))
    assert {"alert_id", "sample_posts", "merged_from", "desk_url"} <= named  # the paragraph is still this one
    assert not named - set(schema["properties"]) - set(sample), sorted(named - set(schema["properties"]) - set(sample))
    (listed,) = re.findall(r"each `\{([a-z_,\s]+)\}`", part)
    assert {f.strip() for f in listed.split(",")} == set(sample)
    maxed = re.search(r"`sample_posts`, at most (\d+) posts", part)
    assert maxed and int(maxed.group(1)) == schema["properties"]["sample_posts"]["maxItems"]


# -- deepwatch replay's summary -----------------------------------------------------------
def test_every_replay_summary_field_the_readme_names_is_in_the_summary():
    """"**Summary fields** (`--format json`)": each is a ReplaySummary field, a
    key runner.py gives `run_outcomes` (`sighting`, `duplicate`, `dead_letter`),
    or a delivery state `run_alert_deliveries` counts (``DeliveryState``)."""
    from dataclasses import fields

    from streams.findings import DeliveryState
    from streams.runner import ReplaySummary

    text = _read("README.md")
    start = text.index("**Summary fields**")
    part = text[start:text.index("**How it runs:**", start)]
    names = set(re.findall(r"`([a-z][a-z_]*)`", part))
    summary = {f.name for f in fields(ReplaySummary)} | {str(s) for s in DeliveryState}
    runner = (REPO / "streams" / "runner.py").read_text()
    assert {"run_outcomes", "ingest_seconds", "models_pending_at_start", "stage_seconds"} <= names
    assert not {n for n in names if n not in summary and f'"{n}"' not in runner}, sorted(names - summary)


# -- Alertmanager's inhibitions ------------------------------------------------------------
def test_every_inhibition_alertmanager_applies_is_the_one_deploy_readme_describes():
    """An operator reads why a page did not come in deploy/README.md: every
    inhibit rule's alerts are named there, and it is scoped by deployment."""
    config = yaml.safe_load((REPO / "deploy" / "alertmanager" / "alertmanager.yml").read_text())
    text = _read("deploy/README.md")
    start = text.index("Alertmanager inhibits")
    paragraph = text[start:text.index("\n\n", start)]
    rules = config["inhibit_rules"]
    assert rules
    for rule in rules:
        named = {a for m in (*rule["source_matchers"], *rule["target_matchers"])
                 for a in re.findall(r"Deepwatch[A-Za-z]+", m)}
        missing = sorted(a for a in named if f"`{a}`" not in paragraph)
        assert not missing, f"deploy/README.md does not say that {rule} inhibits: {missing}"
        assert rule["equal"] == ["deployment"] and "equal: [deployment]" in paragraph


# -- the checks above report what they are for ----------------------------------------------
WRONG = [
    (test_every_setting_the_docs_name_exists_with_the_default_they_state,
     "retried every `alerts.webhook_redeliver_s` (30 s)", "stated as 30.0; its default is 60.0"),
    (test_every_setting_the_docs_name_exists_with_the_default_they_state,
     "while `alerts.min_sightings_5mins` is reached", "`alerts.min_sightings_5mins` is not a setting"),
    (test_every_setting_the_docs_name_exists_with_the_default_they_state,
     "set `kafka.quirks = \"tansu-ish\"` to force", "is refused"),
    (test_every_metric_the_docs_name_is_exported_with_the_labels_they_list,
     "`deepwatch_stage_lag_second{stage}`", "deepwatch_stage_lag_second is not exported"),
    (test_every_metric_the_docs_name_is_exported_with_the_labels_they_list,
     "`deepwatch_connector_frames_total{connector,outcome}`", "lists labels ['connector', 'outcome']"),
    (test_every_alert_the_docs_name_is_a_rule, "`DeepwatchWorkersDown` fires", "no alert rule DeepwatchWorkersDown"),
    (test_every_dashboard_panel_the_docs_name_exists, 'on the overview dashboard as "Waiting before each stage".',
     "no panel, row or dashboard titled 'Waiting before each stage'"),
    (test_every_route_the_readmes_name_is_served, "the desk answers `GET /api/cluster`", "nothing serves /api/cluster"),
]


@pytest.mark.parametrize("check,line,expected", WRONG, ids=[w[2][:40] for w in WRONG])
def test_each_check_reports_a_doc_made_wrong(check, line, expected, tmp_path, monkeypatch):
    doc = tmp_path / "README.md"
    doc.write_text(f"# a doc\n\n{line}\n")
    monkeypatch.setitem(globals(), "DOCS", {"case/README.md": doc})
    with pytest.raises(AssertionError) as failed:
        check()
    assert expected in str(failed.value), str(failed.value)
