"""``deepwatch detect FILE...``: run the detectors on local files, no pipeline.

Output (``--format json``, the default) is a JSON array on stdout, one object
per file, in input order (directories expanded, sorted):

``path``, ``sha256``, ``format``, ``width``, ``height``, ``score`` (fused,
0..1), ``verdict`` (likely-ai | inconclusive | no-evidence), ``evidence``
(``detector``, ``kind``, ``score``, ``weight``, ``detail``, ``data``), ``warnings``
(detectors that could not finish on this file) and ``error``: null, or
``{"reason", "message"}`` for a file that could not be read or decoded; such
a file has null ``score``/``verdict`` and no evidence (``sha256``, ``format``
and the size are filled in when only its pixels failed to decode).

A file is decoded (as the pipeline's hashing decodes it) before any detector
runs: a truncated or corrupt image is an ``error`` here, as replay
dead-letters it, not a "no-evidence" verdict from the metadata alone.

Exit status: 0 when at least one file was analysed (undecodable files are
reported, not fatal), 1 when every file failed, 2 for usage errors (a path
that does not exist or is not a regular file or directory, no image files in
the given paths, a ``--data-dir`` that is a file, an unknown ``--device``,
``--model`` without model support, a ``--model`` that does not load, a
``detect.pixel_head`` set in the settings or environment that does not load).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any, Mapping, Optional

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from detectors.base import Detector, create_all
from detectors.fusion import fuse
from detectors.imagedata import DecodeLimits, ImageData, ImageRejected, ignore_pillow_warnings
from detectors.regular_file import FileRefused, special_kind
from streams.cli.app import app
from streams.cli.common import (
    Config, FirstLines, UserError, check_banks, err, fail, json_text, settings_from, shown,
)
from streams.settings import DEVICE_RE

# Directory walks pick these; files named explicitly are always tried.
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".tif", ".tiff", ".bmp", ".heic", ".heif", ".avif", ".dng"}
)
PROGRESS_MIN_FILES = 4


class OutputFormat(str, Enum):
    json = "json"
    table = "table"


def check_device(device: str) -> str:
    """``device`` if it is one --device accepts; a typo such as ``cdua`` is a
    usage error here, where the model loader would quietly fall back to the CPU."""
    if not DEVICE_RE.fullmatch(device.strip()):
        fail(f"--device {device!r} is not one of auto, cpu, cuda, cuda:N, mps")
    return device


def expand_inputs(paths: list[Path]) -> list[Path]:
    """Files as given, plus image files found recursively in directories.
    A path that does not exist is a usage error naming it (a typo or a glob
    that matched nothing), not a per-file result; so is one that is neither
    a regular file nor a directory (reading a FIFO would wait for a writer
    forever, a device such as /dev/zero never ends)."""
    missing = [str(p) for p in paths if not p.exists() and not p.is_symlink()]
    if missing:
        fail(f"no such file or directory: {', '.join(missing)}")
    special = [f"{p} is {kind}" for p, kind in ((p, special_kind(p)) for p in paths) if kind]
    if special:
        fail(f"{'; '.join(special)}: name image files or directories")
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            files.append(p)
    return files


# What loading a model can raise for a mistake in the setup rather than a bug: a missing or
# unreadable file (OSError, FileNotFoundError), a file that is not a model or does not fit its
# card (ValueError: PixelHead.load turns safetensors' own errors into it), an unknown name
# (KeyError), a missing wheel (RuntimeError, ImportError).
LOAD_ERRORS = (OSError, KeyError, ValueError, RuntimeError, ImportError)


def load_model_detectors(
    names: list[str], model_dir: Path | None, device: str, head: Path | None = None, configured: list[str] | None = None,
    amp: str = "auto", strict: bool = False, vendor_urls: Mapping[str, str] | None = None,
) -> list[Detector]:
    """``names`` (asked for with --model) plus ``configured`` (detect.models), loaded once each.
    Configured vendors whose API key is missing are skipped, as in the detect worker; a vendor
    calls ``vendor_urls[name]`` (detect.vendor_urls) where given.

    A --model that does not load raises UserError. So does a configured packaged pixel model when
    ``head`` (detect.pixel_head, set in the settings or the environment) was named and does not
    load: running on without the head the user asked for reads like its verdicts. Any other
    configured model that does not load is a warning (metadata checks still run), unless
    ``strict`` (``deepwatch eval``: a report without it would measure something else)."""
    try:
        from detectors.models import load_detector  # lazy: torch is heavy and optional for cheap runs
        from detectors.models.pixel_detector import packaged_name
        from detectors.models.vendors import VENDORS, enabled_vendors
    except ImportError as e:
        raise typer.BadParameter(
            f"learned model support is not available in this installation ({e}); run without --model "
            "(and with --no-models)",
            param_hint="--model",
        ) from e
    configured = configured or []
    asked = list(dict.fromkeys(names))
    loaded: list[Detector] = []
    for name in asked:
        try:
            loaded.append(load_detector(name, model_dir=model_dir, device=device, head=head, amp=amp,
                                        vendor_urls=vendor_urls))
        except LOAD_ERRORS as e:
            raise UserError(f"--model {name}: {e}") from None
    for name in [n for n in configured if n not in VENDORS] + enabled_vendors(configured):
        if name in asked:
            continue
        try:
            loaded.append(load_detector(name, model_dir=model_dir, device=device, head=head, amp=amp,
                                        vendor_urls=vendor_urls))
        except LOAD_ERRORS as e:
            if head is not None and packaged_name(name) is not None:
                raise UserError(
                    f"detect.pixel_head {head} (from the settings or DEEPWATCH_DETECT__PIXEL_HEAD) did not load: {e}; "
                    "fix or unset it to use the packaged head"
                ) from None
            if strict:
                raise UserError(f"model {name!r} from detect.models did not load: {e}; "
                                "--no-models measures without it") from None
            # A configured (default) model that cannot load must not stop metadata checks.
            # soft wrap: one line, in an 80-column log too (it was five)
            err.print(
                f"[yellow]warning:[/] model {escape(repr(name))} from detect.models not loaded ({escape(str(e))}); "
                "continuing without it (--no-models to skip models)", highlight=False,
            )
    return loaded


def analyze_file(path: Path, detectors: list[Detector], limits: DecodeLimits) -> dict[str, Any]:
    result: dict[str, Any] = {
        "path": str(path), "sha256": None, "format": None, "width": None, "height": None,
        "score": None, "verdict": None, "evidence": [], "warnings": [], "error": None,
    }
    try:
        image = ImageData.from_path(path, limits=limits)
    except (ImageRejected, FileRefused) as e:
        result["error"] = {"reason": e.reason, "message": str(e)}
        return result
    except OSError as e:
        result["error"] = {"reason": "unreadable", "message": str(e)}
        return result
    result.update(sha256=image.sha256, format=image.format, width=image.size[0], height=image.size[1])
    try:
        # Decoded up front, reduced as the pipeline's hashing decodes it (and
        # kept for the detectors that want that view): a file whose pixels
        # do not decode is an error, as replay dead-letters it, not a verdict
        # from its metadata alone.
        image.thumbnail()
    except ImageRejected as e:
        result["error"] = {"reason": e.reason, "message": str(e)}
        return result
    evidence = []
    for det in detectors:
        try:
            evidence += [ev.model_copy(update={"sha256": image.sha256}) for ev in det.analyze(image)]
        except ImageRejected as e:  # pixels undecodable: metadata findings still stand
            result["warnings"].append(f"{det.name}: {e.reason}: {e}")
        except Exception as e:  # one broken detector must not hide the others' findings
            result["warnings"].append(f"{det.name}: {type(e).__name__}: {e}")
    fused = fuse(evidence)
    result.update(
        score=round(fused.score, 6),
        verdict=fused.verdict,
        evidence=[
            {"detector": ev.detector, "kind": ev.kind.value, "score": ev.score, "weight": ev.weight,
             "detail": ev.detail, "data": ev.data}
            for ev in fused.evidence
        ],
    )
    return result


# Lines of evidence (or of an error) a table row shows, strongest finding
# first: a pixel model's paragraph made each row 25 lines tall on 80 columns.
# --format json (the default) has every finding whole.
EVIDENCE_LINES = 3
EVIDENCE_MIN_WIDTH = 20


def _render_table(results: list[dict[str, Any]], console: Console) -> None:
    # No outer edge or column rules (as `deepwatch clusters`): on 80 columns
    # they took 16 of them from the path and the evidence
    table = Table(title="deepwatch detect", show_lines=False, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  collapse_padding=True)
    table.add_column("file", overflow="fold")  # whole, as given: it names the row
    table.add_column("verdict", no_wrap=True)
    table.add_column("score", justify="right", no_wrap=True)
    table.add_column("size", no_wrap=True)
    table.add_column("evidence", overflow="fold", min_width=EVIDENCE_MIN_WIDTH)
    styles = {"likely-ai": "bold red", "inconclusive": "yellow", "no-evidence": "green"}
    for r in results:
        if r["error"]:
            error = f"{r['error']['reason']}: {r['error']['message']}"
            table.add_row(shown(r["path"]), "[red]error[/]", "", "", FirstLines(shown(error), EVIDENCE_LINES))
            continue
        # Paths and details (read from the image's metadata) are untrusted text: never markup, never
        # terminal control sequences (``shown``).
        detail = FirstLines(shown("\n".join(f"[{e['detector']}] {e['detail']}" for e in r["evidence"]) or "-"),
                            EVIDENCE_LINES)
        table.add_row(
            shown(r["path"]),
            f"[{styles[r['verdict']]}]{r['verdict']}[/]",
            f"{r['score']:.3f}",
            f"{r['format']} {r['width']}x{r['height']}",
            detail,
        )
    console.print(table)


@app.command("detect")
def detect(
    paths: list[Path] = typer.Argument(
        ..., metavar="PATHS", help="Image files or directories (searched recursively for image files).", show_default=False
    ),
    output_format: OutputFormat = typer.Option(
        OutputFormat.json, "--format", "-f", help="json: a JSON array on stdout, one object per file; table: a rich table."
    ),
    model: Optional[list[str]] = typer.Option(
        None, "--model", "-m", metavar="NAME", help="Also run this learned model detector (repeatable), e.g. --model clip-linear."
    ),
    models: bool = typer.Option(
        True, "--models/--no-models",
        help="Run the configured learned models (detect.models; default: the packaged pixel probe). "
             "--no-models: metadata/provenance detectors only, plus any --model asked for.",
    ),
    model_dir: Optional[Path] = typer.Option(
        None, "--model-dir", help="Directory holding model weights (default: the configured model directory)."
    ),
    device: Optional[str] = typer.Option(
        None, "--device", show_default="detect.device (auto)",
        help="Device for learned models: auto, cpu, cuda, cuda:N or mps (default: the detect.device setting, env "
             "DEEPWATCH_DETECT__DEVICE).",
    ),
    data_dir: Optional[Path] = typer.Option(
        None, "--data-dir", "-d",
        help="Also match against the banks of known fakes / authentic pictures kept here (`deepwatch bank add`); "
             "default: the configured data directory, when it has banks.",
    ),
    config: Optional[Path] = Config,
) -> None:
    """Score image files for AI generation/manipulation with the cheap detectors
    (C2PA, XMP, generator metadata, stealth metadata, invisible watermark) and
    the configured learned models (by default the packaged pixel probe). Undecodable files are reported with an `error`
    and skipped; the exit status is 1 only if every file failed."""
    # Pillow warns on stderr about a corrupt file ("Corrupt EXIF data") that
    # the JSON already reports as that file's error
    ignore_pillow_warnings()
    if device is not None:  # given: checked now; the setting was checked when the settings loaded
        check_device(device)
    files = expand_inputs(paths)
    if not files:
        fail(f"no image files in {', '.join(map(str, paths))} (looked for "
                          f"{', '.join(sorted(IMAGE_SUFFIXES))}); name other files explicitly")
    settings = settings_from(config, data_dir=data_dir)  # a --data-dir that is a file: one error line
    if device is None:
        device = settings.detect.device
    check_banks(settings)
    limits = settings.decode_limits()
    detectors = create_all(cost="cheap", names=settings.detect.cheap)
    configured = list(settings.detect.models) if models else []
    if model or configured:
        try:
            detectors += load_model_detectors(
                list(model or []), model_dir or settings.model_dir, device, settings.detect.pixel_head, configured,
                amp=settings.detect.amp, vendor_urls=settings.detect.vendor_urls,
            )
        except UserError as e:  # a --model or the named detect.pixel_head that does not load: one line, exit 2
            fail(str(e))
    if settings.banks_path.exists():
        from detectors.banks import BankMatcher

        detectors.append(BankMatcher(settings.bank_store()))

    results: list[dict[str, Any]] = []
    with Progress(
        TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        # off a terminal a transient bar left only a blank line on stderr
        console=err, transient=True, disable=len(files) < PROGRESS_MIN_FILES or not err.is_terminal,
    ) as progress:
        task = progress.add_task("detecting", total=len(files))
        for f in files:
            results.append(analyze_file(f, detectors, limits))
            progress.advance(task)

    if output_format is OutputFormat.json:
        typer.echo(json_text(results))  # no lone surrogates: a file name's undecodable bytes as \\xNN
    else:
        _render_table(results, Console())
    if all(r["error"] for r in results):
        raise typer.Exit(1)
