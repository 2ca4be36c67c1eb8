"""Observability audit: what the operator rules and the panels tell an
operator to run or to set exists in this codebase (commands, flags, settings,
signals), so that a page at night does not end at "no such option"."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer.main

from dashboards import rules
from dashboards.dashboard import dashboard_json
from streams.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def _texts() -> dict[str, str]:
    out = {f"{r['alert']} {k}": v for g in rules.prometheus_rules()["groups"] for r in g["rules"]
           for k, v in r["annotations"].items() if k != "runbook_url"}
    out.update({f"panel {p['title']}": p.get("description", "") for p in dashboard_json()["panels"]})
    return out


@pytest.fixture(scope="module")
def cli():  # typer's own (vendored) click: duck-typed below
    from streams.cli import app

    return typer.main.get_command(app)


def _options(cmd) -> set[str]:
    return {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}


def _every_option(group) -> set[str]:
    opts = _options(group)
    for sub in getattr(group, "commands", {}).values():
        opts |= _every_option(sub)
    return opts


def _resolve(cli, words: list[str]):
    """The (sub)command ``words`` name and the words after it."""
    cmd = cli
    while words and hasattr(cmd, "commands"):
        name = words[0].split("|")[0]  # "bluesky|mastodon": either
        if name not in cmd.commands:
            break
        cmd, words = cmd.commands[name], words[1:]
    return cmd, words


def test_commands_the_rules_and_panels_name_exist_with_their_flags(cli):
    problems, checked = [], 0
    for where, text in _texts().items():
        for command in re.findall(r"`deepwatch ([^`]*)`", text):
            cmd, rest = _resolve(cli, command.split())
            if cmd is cli:
                problems.append(f"{where}: `deepwatch {command}`: no such command")
                continue
            for word in rest:
                if word.startswith("-") and word.split("=")[0] not in _options(cmd):
                    problems.append(f"{where}: `deepwatch {command}`: {cmd.name} has no option {word}")
            checked += 1
    assert checked >= 8
    assert not problems, "\n".join(problems)


def test_flags_the_rules_and_panels_name_exist(cli):
    every = _every_option(cli)
    found = {(where, f) for where, text in _texts().items() for f in re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", text)}
    assert found, "the rules name --create-topics, the panels --metrics-port"
    missing = sorted(f"{where}: {flag}" for where, flag in found if flag not in every)
    assert not missing, "\n".join(missing)


def test_settings_the_rules_and_panels_name_exist():
    sections = {name: f.annotation for name, f in Settings.model_fields.items()
                if isinstance(f.annotation, type) and hasattr(f.annotation, "model_fields")}
    checked = 0
    for where, text in _texts().items():
        for section, key in re.findall(r"\b([a-z_]+)\.([a-z_0-9]+)\b", text):
            if section not in sections:
                continue
            assert key in sections[section].model_fields, f"{where}: no setting {section}.{key}"
            checked += 1
    assert checked >= 4


def test_the_stack_dump_signal_a_rule_names_is_the_one_the_entry_point_registers():
    """DeepwatchWorkerLoopStalled pointed (deploy/README.md) at py-spy, which the
    image does not carry and whose ptrace the pods' dropped capabilities forbid;
    the description now names SIGUSR1, which the `deepwatch` entry point hands
    to faulthandler (every thread's stack to stderr, the process's log)."""
    r = next(x for g in rules.prometheus_rules()["groups"] for x in g["rules"] if x["alert"] == "DeepwatchWorkerLoopStalled")
    named = set(re.findall(r"SIG(USR[12]|QUIT|ABRT)", r["annotations"]["description"]))
    assert named == {"USR1"}, r["annotations"]["description"]
    scripts = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^deepwatch = "streams\.console:main"', scripts, re.M)
    console = (REPO / "streams" / "console.py").read_text()
    assert "faulthandler.register(signal.SIGUSR1" in console
