"""Refuse settings deepwatch would silently ignore, and describe the valid ones.

An unknown ``DEEPWATCH_*`` variable or TOML key is a startup error naming the
closest valid key: ``DEEPWATCH_FETCH__IMAGE_ROOTS`` (a real mistake: the
setting lives under ``ingest``) used to be dropped without a word. The same
walk over the settings models generates the reference (``deepwatch settings``).
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import re
import stat
import typing
from pathlib import Path
from typing import Any, Iterator, Mapping

from pydantic import BaseModel, ValidationError

# Environment variables read that are not settings: name -> (who reads it, what it holds).
# ``deepwatch settings`` lists them (docs/settings.md); unknown-variable hints compare with
# them too. Secrets are read under the name a setting gives (``secret_env``,
# ``previous_secret_env``, ``sasl_password_env``, ``ingest_tokens_env``, ``tokens_env``): the defaults are listed.
_ES = "Elasticsearch findings store (`findings.url`, `--store`)"
_GRAFANA = "Grafana (expanded in the provisioning files, dashboards/generated)"
_VENDOR = "vendor detectors in `detect.models`"
ENVIRONMENT_ONLY: dict[str, tuple[str, str]] = {
    "DEEPWATCH_CONFIG": ("every command", "path of the TOML settings file, as `--config`; the variables override it"),
    "DEEPWATCH_ES_API_KEY": (_ES, "secret: an API key; used before a user name and password"),
    "DEEPWATCH_ES_USERNAME": (_ES, "user name for basic authentication, when no API key is set"),
    "DEEPWATCH_ES_PASSWORD": (_ES, "secret: that user's password"),
    "DEEPWATCH_WEBHOOK_SECRET": ("processes that send alert webhooks (pipeline and cluster workers, the desk)",
                                 "secret: HMAC key signing alert webhooks, under the default "
                                 "`alerts.webhooks[].secret_env`; each hook reads the variable its `secret_env` names"),
    "DEEPWATCH_KAFKA_PASSWORD": ("every process that reaches Kafka with SASL",
                                 "secret: the SASL password, under the default `kafka.sasl_password_env`"),
    "DEEPWATCH_INGEST_TOKENS": ("`deepwatch serve-ingest`", "secret: bearer tokens `NAME:TOKEN[,NAME:TOKEN...]`, "
                                "under the default `connectors.ingest_tokens_env`"),
    "DEEPWATCH_DESK_TOKENS": ("`deepwatch serve` (the desk)", "secret: API tokens `role:name:token[,...]`, "
                              "under the default `desk.tokens_env`"),
    "DEEPWATCH_METRICS_PORT_FILE": ("`deepwatch worker`", "a file the worker writes its metrics port to "
                                    "(`metrics_port` 0 takes any free one): for tests and supervisors"),
    "HIVE_API_KEY": (_VENDOR, "secret: Hive's API key; without it `vendor:hive` is skipped"),
    "SENSITY_API_TOKEN": (_VENDOR, "secret: Sensity's API token; without it `vendor:sensity` is skipped"),
    "REALITY_DEFENDER_API_KEY": (_VENDOR, "secret: Reality Defender's API key; without it `vendor:reality-defender` "
                                 "is skipped"),
    "GRAFANA_URL": ("`deepwatch grafana provision`, `python -m dashboards.publish`", "Grafana's address, as `--url`"),
    "GRAFANA_TOKEN": ("`deepwatch grafana provision`, `python -m dashboards.publish`",
                      "secret: a service-account token, as `--token`"),
    "RUNBOOK_BASE_URL": ("`python -m dashboards.build`", "the address of deploy/README.md the operator rules' "
                         "`runbook_url` links point at, as `--runbook-base-url`"),
    "OMP_NUM_THREADS": ("the detect role's CPU pixel model", "threads of its onnxruntime session (unset or 0: one "
                        "per physical core); local workers get 1"),
    "XDG_CACHE_HOME": ("the detect role's pixel model", "its ONNX exports are cached in `$XDG_CACHE_HOME/deepwatch` "
                       "(default `~/.cache/deepwatch`)"),
    "DEEPWATCH_GRAFANA_ES_API_KEY": (_GRAFANA, "secret: a read-only API key for the findings datasources"),
    "DEEPWATCH_GRAFANA_ES_CA_CERT": (_GRAFANA, "the PEM of the CA that signed Elasticsearch's certificate, where the "
                                     "files were generated so (`python -m dashboards.build --kubernetes`)"),
    "DEEPWATCH_DESK_WEBHOOK_URL": (_GRAFANA, "the desk contact point's webhook receiver"),
    "DEEPWATCH_DESK_WEBHOOK_TOKEN": (_GRAFANA, "secret: its bearer token (optional)"),
    "DEEPWATCH_DESK_SLACK_WEBHOOK_URL": (_GRAFANA, "the desk contact point's Slack webhook"),
    "DEEPWATCH_DESK_EMAILS": (_GRAFANA, "the desk contact point's email addresses"),
    "DEEPWATCH_ES_URL": ("the test suite (tests/test_es_live.py)", "a live Elasticsearch to test against"),
}
# Environment variables that are not settings fields but are read by deepwatch (or by
# Grafana, whose provisioning files may share the environment), accepted as they are.
NON_SETTING_ENV = {name for name in ENVIRONMENT_ONLY if name.startswith("DEEPWATCH_")} | {
    "DEEPWATCH_DESK_URL",  # once read by Grafana's provisioning files; accepted still
}


def _vendor_url(vendor: str) -> tuple[str, str]:
    """``RENAMED_ENV``'s entry for a vendor's old endpoint variable."""
    return ("detect.vendor_urls", f"DEEPWATCH_DETECT__VENDOR_URLS='{{\"{vendor}\": \"URL\"}}', "
                                  f"or \"{vendor}\" = \"URL\" under [detect.vendor_urls] in the settings file")


# Variables once read outside the settings, now settings. Each is refused at
# start naming the setting that replaced it: ignored, the CA bundle or a
# vendor's endpoint would silently be the default, and TLS or the vendor call
# would fail far from the cause. Old name -> (the setting, how to set it).
RENAMED_ENV: dict[str, tuple[str, str]] = {
    "DEEPWATCH_ES_CA_CERTS": ("findings.ca_certs", "DEEPWATCH_FINDINGS__CA_CERTS=PATH, or ca_certs = \"PATH\" "
                              "under [findings] in the settings file"),
    "DEEPWATCH_ES_VERIFY_CERTS": ("findings.verify_certs", "DEEPWATCH_FINDINGS__VERIFY_CERTS=false, or "
                                  "verify_certs = false under [findings] in the settings file"),
    "DEEPWATCH_HIVE_URL": _vendor_url("vendor:hive"),
    "DEEPWATCH_SENSITY_URL": _vendor_url("vendor:sensity"),
    "DEEPWATCH_REALITY_DEFENDER_URL": _vendor_url("vendor:reality-defender"),
}
# Secrets live only in the environment under names the settings point at
# (``secret_env``, ``previous_secret_env``, ``sasl_password_env``, ``ingest_tokens_env``, ``tokens_env``);
# their names are the user's choice. A token list is plural, as in the default
# DEEPWATCH_INGEST_TOKENS.
SECRET_SUFFIXES = ("_SECRET", "_TOKEN", "_TOKENS", "_KEY", "_PASSWORD")
# Settings files are a few KB. A bound keeps a device such as /dev/zero, or a
# huge file named by mistake, from being read until memory runs out.
MAX_SETTINGS_FILE_BYTES = 1 << 20
# A refusal lists every mistake, so that three outdated keys take one run to
# fix, not three; a garbage file (a log named by mistake) must not flood the
# terminal, though: past this many, a count of the rest.
MAX_LISTED_MISTAKES = 20


class SettingsError(ValueError):
    """A settings mistake, with the fix in the message: one line, or for
    several (``refusal``) a heading line and a line per mistake."""


def refusal(messages: list[str]) -> SettingsError:
    """One ``SettingsError`` for every mistake found: a single one as its own
    line, as ever (scripts and tests compare it), several under a heading,
    one line each, at most ``MAX_LISTED_MISTAKES`` of them."""
    unique = list(dict.fromkeys(messages))  # one cause can surface twice (a key, then its value)
    if len(unique) == 1:
        return SettingsError(unique[0])
    shown = unique[:MAX_LISTED_MISTAKES]
    lines = [f"{len(unique)} settings mistakes, each with its fix:", *(f"  {m}" for m in shown)]
    if len(unique) > len(shown):
        lines.append(f"  and {len(unique) - len(shown)} more")
    return SettingsError("\n".join(lines))


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if inspect.isclass(arg) and issubclass(arg, BaseModel):
            return arg
    return None


def setting_paths(model: type[BaseModel] | None = None, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf setting as (dotted path, pydantic FieldInfo)."""
    if model is None:
        from streams.settings import Settings

        model = Settings
    for name, field in model.model_fields.items():
        sub = _model_of(field.annotation)
        origin = typing.get_origin(field.annotation)
        if sub is not None and origin not in (list, dict):
            yield from setting_paths(sub, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def closest(path: str) -> str | None:
    valid = [p for p, _ in setting_paths()]
    found = difflib.get_close_matches(path, valid, n=1, cutoff=0.5)
    if found:
        return found[0]
    leaf = path.rsplit(".", 1)[-1]
    same_leaf = [p for p in valid if p.rsplit(".", 1)[-1] == leaf]
    return same_leaf[0] if same_leaf else None


def _env_name(path: str) -> str:
    return "DEEPWATCH_" + path.upper().replace(".", "__")


def closest_env(name: str) -> str | None:
    """The variable closest to ``name``, an unknown ``DEEPWATCH_*`` one: a
    setting's (``DEEPWATCH_PARTITIONS``) or one read outside the settings
    (``DEEPWATCH_ES_API_KEY``, ``ENVIRONMENT_ONLY``). Setting paths alone
    answered DEEPWATCH_ES_USER with DEEPWATCH_DESK__USERS_FILE. A name close
    to a variable no longer read (``RENAMED_ENV``) gets its setting's variable."""
    path = name.upper()[len("DEEPWATCH_"):].lower().replace("__", ".")
    settings = {p: _env_name(p) for p, _ in setting_paths()}
    others = {n[len("DEEPWATCH_"):].lower(): n for n in ENVIRONMENT_ONLY if n.startswith("DEEPWATCH_")}
    others |= {old[len("DEEPWATCH_"):].lower(): _env_name(setting) for old, (setting, _) in RENAMED_ENV.items()}
    found = difflib.get_close_matches(path, [*settings, *others], n=1, cutoff=0.5)
    if found:
        return settings.get(found[0]) or others[found[0]]
    near = closest(path)  # the same leaf under another section (DEEPWATCH_FETCH__IMAGE_ROOTS)
    return _env_name(near) if near else None


def _tables() -> dict[str, str]:
    """TOML tables the settings take, as written: ``alerts`` -> ``[alerts]``,
    ``alerts.webhooks`` -> ``[[alerts.webhooks]]`` (a list of tables)."""
    from streams.settings import Settings

    out = {}
    for name, field in Settings.model_fields.items():
        section = _model_of(field.annotation)
        if section is None or typing.get_origin(field.annotation) in (list, dict):
            continue
        out[name] = f"[{name}]"
        for sub, f in section.model_fields.items():
            if typing.get_origin(f.annotation) is list and _model_of(f.annotation) is not None:
                out[f"{name}.{sub}"] = f"[[{name}.{sub}]]"
    return out


def _is_table(value: Any) -> bool:
    """A TOML table (``[name]``) or array of tables (``[[name]]``), as parsed."""
    return isinstance(value, dict) or (isinstance(value, list) and bool(value)
                                       and all(isinstance(v, dict) for v in value))


def _toml_hint(key: str, value: Any) -> str:
    """What an unknown top-level key of the settings file most likely meant:
    a table (``[alert]``) is compared with the tables, a value (``brokr =``)
    with the settings. A table was compared with every setting's path
    (``[alert]``: "did you mean 'alerts.console'?")."""
    if _is_table(value):
        tables = _tables()
        found = (difflib.get_close_matches(key, list(tables), n=1, cutoff=0.5)
                 or [t for t in tables if t.rsplit(".", 1)[-1] == key])  # [webhooks]: [[alerts.webhooks]]
        return f"; did you mean {tables[found[0]]}?" if found else "; see `deepwatch settings` for the tables"
    near = closest(key)
    return f"; did you mean {near!r}?" if near else "; see `deepwatch settings`"


def check_environment(environ: Mapping[str, str]) -> None:
    """Refuse every unknown, renamed or empty ``DEEPWATCH_*`` setting variable
    (``load_settings`` gathers ``environment_mistakes`` with the rest; this is
    the check alone, for an environment checked on its own: the compose and
    Kubernetes files' in tests/test_deploy.py and tests/test_dashboards.py)."""
    mistakes = environment_mistakes(environ)
    if mistakes:
        raise refusal([message for _, message in mistakes])


def environment_mistakes(environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """Each unknown, renamed or empty ``DEEPWATCH_*`` setting variable, as
    (its name, the message saying what to do), in the environment's order."""
    from streams.settings import Settings

    top = {name.upper() for name in Settings.model_fields}
    sections = {name.upper() for name, f in Settings.model_fields.items() if _model_of(f.annotation)}
    fields = {_env_name(p): f for p, f in setting_paths()}
    out: list[tuple[str, str]] = []
    for name, value in environ.items():
        upper = name.upper()
        if not upper.startswith("DEEPWATCH_") or upper in NON_SETTING_ENV or upper.endswith(SECRET_SUFFIXES):
            continue
        if upper in RENAMED_ENV:
            setting, how = RENAMED_ENV[upper]
            out.append((name, f"{name} is no longer read: it is the setting {setting} now; set {how}, "
                              f"and unset {name}"))
            continue
        rest = upper[len("DEEPWATCH_"):]
        field = None
        if "__" not in rest:
            if rest in top:
                # a whole section may be given as JSON (DEEPWATCH_FETCH='{...}')
                field = Settings.model_fields[rest.lower()]
        elif rest.split("__", 1)[0] in sections and upper in fields:
            field = fields[upper]
        if field is not None:
            empty = _empty_mistake(name, value, field)
            if empty:
                out.append((name, empty))
            continue
        near = closest_env(name)
        hint = f"; did you mean {near}?" if near else "; see `deepwatch settings`"
        out.append((name, f"unknown setting in the environment: {name}{hint}"))
    return out


def _empty_mistake(name: str, value: str, field: Any) -> str | None:
    """One rule for a variable set to nothing (``DEEPWATCH_DATA_DIR=``): it
    unsets a setting that may be unset (its default is None, e.g.
    desk.public_url), and is an error naming the variable for any other
    (data_dir became ".", broker an error that did not say where it came from)."""
    if value.strip() or type(None) in typing.get_args(field.annotation):
        return None
    return f"{name} is set but empty: give it a value, or unset it (`unset {name}`) for the default"


def toml_mistakes(path: Path) -> list[str]:
    """Each unknown top-level key of the settings file; a file that cannot
    be read as TOML at all raises ``SettingsError`` (nothing more to check).
    The settings file must exist, be a regular file of at most
    ``MAX_SETTINGS_FILE_BYTES``, parse and name only known top-level
    settings (sections reject unknown keys themselves; the top level cannot,
    since it also receives ``DEEPWATCH_*`` variables that are not settings).
    The settings source would skip a missing file, for a broken one raise a
    parser traceback, and read a device or a FIFO without end."""
    import tomllib

    try:
        # stat before open: opening a FIFO blocks until a writer comes
        mode = os.stat(path).st_mode
        if stat.S_ISDIR(mode):
            raise SettingsError(f"settings file {str(path)!r} is a directory; give the path of a TOML file")
        if not stat.S_ISREG(mode):
            raise SettingsError(f"settings file {str(path)!r} is not a regular file (a device, pipe or socket); "
                                "give the path of a TOML file")
        with open(path, "rb") as f:
            data = f.read(MAX_SETTINGS_FILE_BYTES + 1)  # one byte over tells a file too large
        if len(data) > MAX_SETTINGS_FILE_BYTES:
            raise SettingsError(f"settings file {str(path)!r} is larger than {MAX_SETTINGS_FILE_BYTES >> 20} MiB; "
                                "give the path of a TOML settings file (they are a few KB)")
        doc = tomllib.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise SettingsError(f"settings file {str(path)!r} (--config or DEEPWATCH_CONFIG) does not exist; "
                            "give the path of a TOML file, or unset DEEPWATCH_CONFIG") from None
    except OSError as e:
        raise SettingsError(f"cannot read settings file {str(path)!r}: {e.strerror or e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        if data.startswith(b"\xef\xbb\xbf"):  # TOML allows none; some Windows editors save one
            raise SettingsError(f"settings file {str(path)!r} starts with a UTF-8 byte-order mark, which TOML does "
                                "not allow; save it as UTF-8 without BOM") from None
        raise SettingsError(f"settings file {str(path)!r} is not valid TOML: {e}; "
                            "see `deepwatch settings` for the keys and deploy/deepwatch.toml for an example") from None
    from streams.settings import Settings

    out = []
    for key, value in doc.items():
        if key not in Settings.model_fields:
            what = f"table [{key}]" if _is_table(value) else f"setting {key!r}"
            out.append(f"unknown {what} in {str(path)!r}{_toml_hint(key, value)}")
    return out


def redact_userinfo(text: str) -> str:
    """``text`` with any user:password of a URL in it (several hosts too) as ``***``."""
    return re.sub(r"(://|,)[^/@?#,\s]*@", r"\1***@", text)


class Origin(typing.NamedTuple):
    """Where a value the settings refused came from."""

    text: str  # "in PATH: [section] key" or "in the environment: DEEPWATCH_X__Y"
    variable: str | None  # the environment variable, as set, when it is one


def explain_lines(e: ValidationError, overrides: Mapping[str, Any] | None = None,
                  reported: frozenset[str] = frozenset()) -> list[str]:
    """A line per error of ``Settings``' validation, unknown keys first (the
    likeliest cause of the rest: an outdated file). ``overrides``: the values
    given as arguments (CLI flags), whose errors come from no file or variable;
    ``reported``: variables already refused by name (``environment_mistakes``),
    whose value's error would say the same again."""
    from streams.settings import source_values

    sources = source_values()
    errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")  # stable: pydantic's order
    out = []
    for err in errors:
        where = origin(err["loc"], sources, overrides or {})
        if where is not None and where.variable is not None and where.variable.upper() in reported:
            continue
        out.append(_explain_one(err, where))
    return out


def _explain_one(err: Any, where: Origin | None) -> str:
    if err["type"] == "extra_forbidden":
        entry = _list_entry(err["loc"], where)
        if entry is not None:
            return entry
        path = ".".join(str(p) for p in err["loc"] if not isinstance(p, int))
        near = closest(path)
        hint = f"; did you mean {near!r} (env {_env_name(near)})?" if near else "; see `deepwatch settings`"
        return f"unknown setting {path!r} ({where.text if where else _EITHER}){hint}"
    path = ".".join(str(p) for p in err["loc"])
    set_in = f"; set {where.text}" if where else ""
    if "webhooks" in err["loc"]:
        # a webhook URL often holds the subscriber's token in its path or query: never echoed,
        # not even a part of it; the message names hosts (scheme://host:port) at most
        from streams.webhooks import hide_urls  # webhooks imports the settings

        return f"invalid setting {path!r}: {hide_urls(err['msg'])}{set_in}"
    return f"invalid setting {path!r}: {err['msg']} (got {redact_userinfo(str(err.get('input')))[:80]!r}){set_in}"


# An unknown key's source, where no source is found to hold it
_EITHER = "in the TOML file or DEEPWATCH_* environment"


def origin(loc: tuple[Any, ...], sources: list[tuple[str, dict[str, Any]]],
           overrides: Mapping[str, Any]) -> Origin | None:
    """Where the value at pydantic's ``loc`` came from: the first of
    ``sources`` (``settings.source_values``: highest precedence first) that
    holds it, named as the settings file's path and key or the variable. None
    for an argument (``overrides``), a default, or an error of the whole model."""
    if not loc or (loc[0] in overrides and overrides[loc[0]] is not None):
        return None
    for kind, values in sources:
        if not _holds(values, loc):
            continue
        if kind == "toml":
            return Origin(f"in {os.environ.get('DEEPWATCH_CONFIG', 'the settings file')}: {_toml_place(loc, values)}",
                          None)
        variable = _variable_of(loc)
        return Origin(f"in the environment: {variable}" if variable else "in the environment", variable)
    return None


def _holds(values: Any, loc: tuple[Any, ...]) -> bool:
    """Whether a source's values (nested dicts and lists) hold ``loc``: a
    table both sources add keys to holds only the keys each gave."""
    node = values
    for part in loc:
        if isinstance(node, dict):
            if part not in node:
                return False
            node = node[part]
        elif isinstance(node, list):
            if not isinstance(part, int) or not 0 <= part < len(node):
                return False
            node = node[part]
        else:
            return True  # inside a value the source gave whole (an item of its list)
    return True


def _toml_place(loc: tuple[Any, ...], doc: dict[str, Any]) -> str:
    """``loc`` as written in the settings file: ``log_level``, ``[alerts]
    min_fake_score``, ``[[alerts.webhooks]] (entry 1) url``, ``[alerts]``."""
    tables: list[str] = []
    entry: int | None = None
    key: str | None = None
    node: Any = doc
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(part, int):
            if not (isinstance(node, list) and node and all(isinstance(v, dict) for v in node)):
                break  # an item of a value (detect.cheap[1]): its key says where
            entry, node = part, node[part] if 0 <= part < len(node) else {}
            continue
        child = node.get(part) if isinstance(node, dict) else None
        if isinstance(child, dict) or (_is_table(child) and not last):
            tables.append(str(part))
            entry, node = None, child
            continue
        if _is_table(child):  # a whole list of tables
            return f"[[{'.'.join([*tables, str(part)])}]]"
        key = str(part)
        break
    if key is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", key):
        key = json.dumps(key)
    if not tables:
        return key or ""
    header = f"[[{'.'.join(tables)}]] (entry {entry + 1})" if entry is not None else f"[{'.'.join(tables)}]"
    return f"{header} {key}" if key else header


def _variable_of(loc: tuple[Any, ...]) -> str | None:
    """The ``DEEPWATCH_*`` variable, as set, that gave the value at ``loc``:
    the closest one over it (``DEEPWATCH_DETECT__DEVICE``, else a whole
    ``DEEPWATCH_DETECT`` in JSON), or for a table those that set its keys."""
    names = [str(p) for p in loc[:next((i for i, p in enumerate(loc) if isinstance(p, int)), len(loc))]]
    given = {name.upper(): name for name in os.environ if name.upper().startswith("DEEPWATCH_")}
    for n in range(len(names), 0, -1):
        found = given.get("DEEPWATCH_" + "__".join(names[:n]).upper())
        if found:
            return found
    under = sorted(name for upper, name in given.items()
                   if names and upper.startswith("DEEPWATCH_" + "__".join(names).upper() + "__"))
    return ", ".join(under[:3]) + (", ..." if len(under) > 3 else "") if under else None


def _list_entry(loc: tuple[Any, ...], where: Origin | None = None) -> str | None:
    """The message for an unknown key inside one entry of a list of tables
    (``[[alerts.webhooks]] secret = ...``): the entry's own fields are what
    it may hold; the list's path ("did you mean 'alerts.webhooks'") was no
    hint. None when ``loc`` is not inside such an entry."""
    from streams.settings import Settings

    owner: type[BaseModel] = Settings
    parts: list[str] = []
    in_entry = False
    for part in loc[:-1]:
        if isinstance(part, int):
            if not parts:
                return None
            parts[-1] += f"[{part}]"
            in_entry = True
            continue
        field = owner.model_fields.get(str(part))
        model = _model_of(field.annotation) if field is not None else None
        if model is None:
            return None
        owner, in_entry = model, False
        parts.append(str(part))
    if not in_entry or not parts:
        return None
    key = str(loc[-1])
    fields = list(owner.model_fields)
    near = difflib.get_close_matches(key, fields, n=1, cutoff=0.5)
    list_path = re.sub(r"\[\d+\]", "", ".".join(parts))
    hint = "."
    if near:
        why = (f" (it names the environment variable that holds the {key}: secrets are never settings)"
               if near[0].endswith("_env") else "")
        hint = f"; did you mean {near[0]!r}{why}?"
    return (f"unknown setting {key!r} in {'.'.join(parts)} ({where.text if where else _EITHER}){hint} "
            f"Each {list_path} entry takes: {', '.join(fields)}")


def explain_source_error(e: Exception, environ: Mapping[str, str]) -> SettingsError:
    """pydantic-settings' "error parsing value for field ..." (a list or table
    setting whose environment value is not JSON) as one line naming the
    variable and the form it needs; it names only the top-level field."""
    m = re.search(r'field "(\w+)"', str(e))
    field = m.group(1).upper() if m else ""
    for name, value in environ.items():
        upper = name.upper()
        if not field or not (upper == f"DEEPWATCH_{field}" or upper.startswith(f"DEEPWATCH_{field}__")):
            continue
        try:
            json.loads(value)
        except ValueError as bad:
            path = upper[len("DEEPWATCH_"):].lower().replace("__", ".")
            info = dict(setting_paths()).get(path)
            kinds = {typing.get_origin(a) for a in (info.annotation, *typing.get_args(info.annotation))} if info else set()
            if list not in kinds:
                example = '\'{"key": "value"}\''
            elif _model_of(info.annotation) is not None:
                example = '\'[{"key": "value"}]\''
            else:
                example = '\'["a", "b"]\''
            got = "" if _may_hold_secrets(path, value) else f" (got {value[:80]!r})"
            return SettingsError(f"invalid setting in the environment: {name} must be JSON, e.g. {name}={example}; "
                                 f"{_json_mistake(bad, value)}{got}")
    return SettingsError(f"invalid setting in the environment: {e}; list and table settings take JSON values")


def _may_hold_secrets(path: str, value: str) -> bool:
    """Whether an environment value may hold a secret, so that an error never
    quotes it: the webhooks' (a URL's path or query often holds the
    subscriber's token, which ``explain_lines`` never echoes either), whether as
    ``alerts.webhooks`` or inside the whole ``alerts`` table, and any value
    with a URL in it (a user:password, a token in a query)."""
    return path == "alerts" or path.startswith("alerts.webhooks") or "://" in value


def _json_mistake(bad: ValueError, value: str) -> str:
    """Where a value is not JSON, from the parser's own message and place
    (never the text there): "Expecting ',' delimiter at character 12 of 63"."""
    if not isinstance(bad, json.JSONDecodeError):
        return "it is not JSON"
    if bad.pos >= len(value):
        where = f"at the end of the value, after its {len(value)} characters"
    elif "\n" in value:
        where = f"at line {bad.lineno} column {bad.colno}"
    else:
        where = f"at character {bad.pos + 1} of {len(value)}"
    return f"{bad.msg} {where}"


def _comments(model: type[BaseModel]) -> dict[str, str]:
    """Trailing ``# why`` comments of field lines: the settings module's
    comments are the documentation, so the reference cannot drift from them."""
    try:
        src = inspect.getsource(model)
    except (OSError, TypeError):
        return {}
    out = {}
    for m in re.finditer(r"^\s+(\w+):[^\n#]*#\s*(.+)$", src, re.M):
        out.setdefault(m.group(1), m.group(2).strip())
    return out


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    text = text or str(annotation).replace("typing.", "").replace("pathlib.", "")
    return text.replace("|", "or").replace("NoneType", "None")


def _entry_rows(path: str, entry: type[BaseModel]) -> list[str]:
    """Rows for the fields of one entry of a list setting (``alerts.webhooks``):
    set in its TOML table, or as keys of an object in the variable's JSON list."""
    docs = _comments(entry)
    rows = []
    for name, field in entry.model_fields.items():
        if field.is_required():
            default = "required"
        else:
            default = f"`{(field.default_factory() if field.default_factory is not None else field.default)!r}`"
        rows.append(f"| `{path}[].{name}` | (in the list) | {_type_name(field.annotation)} | {default} | "
                    f"{docs.get(name, '').replace('|', '/')} |")
    return rows


def reference_markdown() -> str:
    from streams.settings import Settings

    lines = [
        "# deepwatch settings reference",
        "",
        "Generated by `deepwatch settings --format markdown` from `streams/settings.py`; do not edit by hand.",
        "",
        "Precedence (highest first): command-line flags, environment variables, the TOML file",
        "(`--config` or `DEEPWATCH_CONFIG`), defaults. Nested keys use `__` in the environment",
        "(`DEEPWATCH_ALERTS__MIN_FAKE_SCORE=0.8`) and a table in TOML (`[alerts] min_fake_score = 0.8`).",
        "An unknown `DEEPWATCH_*` variable or TOML key is a startup error naming the closest valid key.",
        f"Every mistake is reported at once (one line each, the first {MAX_LISTED_MISTAKES} of them), each naming",
        "where its value came from: the settings file's path and `[section] key`, or the environment variable.",
        "Secrets are never settings: a setting names the environment variable that holds them.",
        "",
        "| setting | environment | type | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for path, field in setting_paths(Settings):
        parts = path.split(".")
        owner: type[BaseModel] = Settings
        for part in parts[:-1]:
            owner = _model_of(owner.model_fields[part].annotation)  # type: ignore[assignment]
        doc = _comments(owner).get(parts[-1], "")
        default = field.default_factory() if field.default_factory is not None else field.default
        if isinstance(default, Path):
            default = str(default)
        lines.append(f"| `{path}` | `{_env_name(path)}` | {_type_name(field.annotation)} | `{default!r}` | {doc.replace('|', '/')} |")
        entry = _model_of(field.annotation) if typing.get_origin(field.annotation) is list else None
        if entry is not None:  # a list of tables: each entry's fields, set inside the entry
            lines.extend(_entry_rows(path, entry))
    lines += [
        "",
        "## Secrets and other environment variables",
        "",
        "Read from the environment only, never from the TOML file, and not settings. A secret is read under the",
        "name a setting gives (`alerts.webhooks[].secret_env` and, during a key rotation, `previous_secret_env`,",
        "`kafka.sasl_password_env`, `connectors.ingest_tokens_env`, `desk.tokens_env`); the defaults are listed. A `DEEPWATCH_*` name you give",
        f"one must end in {', '.join(f'`{x}`' for x in SECRET_SUFFIXES)}: any other is taken for a mistyped setting.",
        "",
        "| variable | read by | meaning |",
        "|---|---|---|",
    ]
    for name, (reader, meaning) in ENVIRONMENT_ONLY.items():
        lines.append(f"| `{name}` | {reader.replace('|', '/')} | {meaning.replace('|', '/')} |")
    lines += [
        "",
        "## Variables no longer read",
        "",
        "Each is refused at start, naming the setting that replaced it.",
        "",
        "| variable | now |",
        "|---|---|",
    ]
    for name, (setting, _) in RENAMED_ENV.items():
        lines.append(f"| `{name}` | `{setting}` |")
    lines.append("")
    return "\n".join(lines)
