"""``deepwatch redeliver``: what waits per webhook target, and sending
rejected deliveries again once their cause is fixed."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from streams.cli.app import app
from streams.cli.common import (
    Config, DataDir, FormatOpt, JsonAlias, check_format, err, fail, note_empty, print_json, settings_from,
)
from streams.cli.query import StoreOpt, _findings
from streams.cli.tables import fit, keyed_table
from streams.findings import UNDELIVERED


def _resolve(given: str, known: list[str], hooks: dict) -> str:
    """The target key ``given`` names: a key as listed, a configured hook's
    URL or ``name``, the key a URL had before hooks were keyed by identity,
    or ``scheme://host[:port]`` when one target has it. ``hooks``:
    ``streams.webhooks.hooks_by_key``."""
    from streams.webhooks import legacy_keys, target_key

    for key, target in hooks.items():
        if given in (target.hook.url, target.hook.name, *legacy_keys(target.hook)):
            return key
    key = target_key(given)
    if key in known:
        return key
    same_host = [k for k in known if k.rsplit("#", 1)[0] == given.rstrip("/")]
    if len(same_host) == 1:
        return same_host[0]
    listed = ", ".join(known) or "none"
    if len(same_host) > 1:
        fail(f"{given} names {len(same_host)} targets ({', '.join(same_host)}): give one of them as listed")
    fail(f"no deliveries to {given} on record (targets: {listed}); `deepwatch redeliver` lists them")


@app.command(rich_help_panel="Findings")
def redeliver(
    target: Optional[str] = typer.Argument(
        None, metavar="TARGET", help="Webhook target as `deepwatch redeliver` lists it (scheme://host:port#hash or hook:NAME), a "
                   "configured hook's URL or name, or scheme://host:port when only one target has it. Without it: list what waits per target."),
    alert: Optional[list[str]] = typer.Option(None, "--alert", metavar="ID", help="Only this alert id (repeatable)."),
    data_dir: Optional[Path] = DataDir, config: Optional[Path] = Config, store_url: Optional[str] = StoreOpt,
    fmt: str = FormatOpt, as_json: bool = JsonAlias,
) -> None:
    """Webhook deliveries still waiting, and rejected ones queued again.

    Without TARGET: per target, how many deliveries are queued (being sent),
    failed (the leader worker tries them again every
    alerts.webhook_redeliver_s) and rejected (the receiver refused them for
    good: 401/403/404/410, a redirect; never retried on their own). JSON:
    an array of {target, queued, failed, rejected}. A hook's deliveries
    are kept under its identity (its name, else scheme://host:port), so a
    changed path or token in its URL keeps them; a key no configured hook
    serves is listed on its own (add it to a hook's previous_keys to hand
    its deliveries to that hook).

    With TARGET: its rejected deliveries (all, or those of --alert) become
    failed again, so the next redelivery round sends them, oldest first. Fix
    the cause first (the receiver's secret, its URL).
    """
    fmt = "json" if as_json else check_format(fmt)
    if alert and target is None:  # listing ignored it, so the user's requeue silently did not happen
        fail("--alert needs TARGET: deepwatch redeliver TARGET --alert ID (`deepwatch redeliver` lists the targets)")
    settings = settings_from(config, data_dir=data_dir)
    with _findings(data_dir, config, store_url) as store:
        counts = store.undelivered_counts()
        from streams.webhooks import hooks_by_key, legacy_keys, target_key

        hooks = hooks_by_key(settings)
        # a configured hook's earlier keys (``legacy_keys``: before a rename, or from an older
        # version) are counted and requeued as the hook's own
        owner = {name: key for key, target in hooks.items() for name in legacy_keys(target.hook)}
        recorded = store.delivery_targets()

        def shown(t: str) -> str:
            # an Elasticsearch document from before targets were keyed names its whole URL
            # (a token in it, often): listed, counted and named by that URL's key
            return owner.get(t) or target_key(t)

        known = sorted({*(shown(t) for t in recorded), *hooks})
        if target is None:
            rows = [{"target": k, **{s.value: sum(c.get(s, 0) for t, c in counts.items() if shown(t) == k)
                                     for s in UNDELIVERED}} for k in known]
            if fmt == "json":
                print_json(rows)
                return
            # the target is what `deepwatch redeliver TARGET` takes: kept whole on one line, to copy
            t = keyed_table("target", *(s.value for s in UNDELIVERED), title="Webhook deliveries waiting")
            for col in t.columns[1:]:
                col.justify = "right"
            for r in rows:
                t.add_row(r["target"], *(str(r[s.value]) for s in UNDELIVERED))
            Console().print(fit(t))
            if not rows:
                note_empty("no webhook deliveries waiting, and no webhooks configured (alerts.webhooks)")
            return
        key = _resolve(target, known, hooks)
        # a configured hook's deliveries kept under its earlier keys (``legacy_keys``) are its own too
        names = tuple(dict.fromkeys((key, *(legacy_keys(hooks[key].hook) if key in hooks else ()),
                                     *(t for t in recorded if shown(t) == key))))
        if alert:
            # a mistyped id (or one never sent to this target) requeued nothing and said "0 rejected
            # deliveries ... queued again", exit 0
            delivered = store.delivery_status(list(alert))
            unknown = [a for a in alert if not any(d.target in names for d in delivered.get(a, ()))]
            if unknown:
                fail(f"--alert {', '.join(unknown)}: no delivery of {'that alert' if len(unknown) == 1 else 'those alerts'} "
                     f"to {key} on record; `deepwatch alerts --format json` lists alert ids with their deliveries")
        n = sum(store.requeue_deliveries(name, list(alert) if alert else None) for name in names)
    if fmt == "json":
        print_json({"target": key, "requeued": n})
    else:
        err.print(f"{n} rejected deliver{'y' if n == 1 else 'ies'} to {key} queued again; the leader worker's next "
                  f"redelivery round (every {settings.alerts.webhook_redeliver_s:g} s) sends "
                  f"{'it' if n == 1 else 'them'}, oldest first")
