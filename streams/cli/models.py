"""``deepwatch models fetch|list``, ``deepwatch train`` and ``deepwatch eval``:
managing, training and measuring the learned detectors in ``detectors.models``."""

from __future__ import annotations

import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from detectors.model_names import DEFAULT_PIXEL_MODEL
from streams.cli.app import app
from streams.cli.common import (
    Config, DataDir, FormatOpt, JsonAlias, check_format, check_writable_dir, err, fail, print_error, settings_from,
)
from streams.cli.tables import fit, keyed_table

models_app = typer.Typer(
    help="Manage learned detector weights in the model dir (<data-dir>/models unless detect.model_dir is set).",
    no_args_is_help=True,
)
# short_help: `deepwatch --help` cut the group's line at 45 characters ("... in the model dir...")
app.add_typer(models_app, name="models", short_help="Fetch and list learned detector weights in the model dir.")

ModelDirOpt = Annotated[
    Optional[Path], typer.Option("--model-dir", help="Model directory (default: settings detect.model_dir or <data-dir>/models).")
]


def _above_zero(example: str) -> Callable[[float], float]:
    """Callback for a number that must be finite and above 0 (typer bounds are
    inclusive): --probe-c = 0 failed only in sklearn, after minutes of feature
    extraction; --lr -1 only in PyTorch, with its own words and no fix."""
    import math

    def check(value: float) -> float:
        if value is not None and not (math.isfinite(value) and value > 0):
            raise typer.BadParameter(f"{value:g} is not a number above 0; give e.g. {example}")
        return value

    return check


def _drop_bar(bar: Progress) -> None:
    """Stop a progress display, leaving nothing of it on screen, before an
    error line is printed: it was drawn after the error (a terminal), or a
    blank line was (Progress.stop's newline off a terminal)."""
    bar.live.transient = True
    bar.live.stop()
    bar.disable = True  # the context manager's stop() is then a no-op


def _check_regex(pattern: str | None, option: str) -> None:
    """A --generators style pattern that does not compile is a usage error, not an re.error traceback."""
    import re

    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as e:
            fail(f"{option} {pattern!r} is not a valid regular expression: {e}")


def _load_samples(load: Callable[[], list]) -> list:
    """``load()`` (a manifest reader); a manifest with missing columns, bad
    labels or bad bytes becomes one error line naming the file and line."""
    from detectors.models.dataset import ManifestError

    try:
        return load()
    except (ManifestError, FileNotFoundError) as e:
        fail(str(e))


@contextmanager
def _fits_quietly() -> Iterator[None]:
    """sklearn's ConvergenceWarning from the probe's fits, as one plain
    line at the end instead of a warning block per fold on the terminal:
    a fold of a few dozen pictures often stops at the iteration cap, which
    is expected and changes nothing a user can act on. Other warnings pass
    through as before."""
    import warnings

    try:
        from sklearn.exceptions import ConvergenceWarning
    except ImportError:  # no sklearn: nothing of it to quiet
        yield
        return
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            yield
    finally:
        # outside catch_warnings: shown inside it, each would be recorded again
        unconverged = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
        for w in caught:
            if not issubclass(w.category, ConvergenceWarning):
                warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
    if unconverged:  # not after a failure (it propagates above): its one error line stays the only line
        err.print(f"note: {len(unconverged)} of the probe's fits stopped at their iteration limit before "
                  "converging (expected on small folds)", markup=False, highlight=False)


def _model_dir(config: Path | None, data_dir: Path | None, model_dir: Path | None) -> Path:
    if model_dir is not None:
        return model_dir

    return settings_from(config, data_dir=data_dir).model_dir


@models_app.command("fetch")
def fetch_cmd(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Name to store the model under (used by --model / detect.models).")],
    url: Annotated[
        Optional[str], typer.Option("--url", help="https URL, file:// URL or local path of the .safetensors weights.")
    ] = None,
    sha256: Annotated[Optional[str], typer.Option("--sha256", help="Expected sha256 of the weights file; mismatch = refused.")] = None,
    arch: Annotated[
        Optional[str], typer.Option("--arch", metavar="npr-r50|small-cnn|clip-probe", help="Architecture (npr-r50|small-cnn|clip-probe) when no .json card sits next to the weights.")
    ] = None,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Accept a pickled .pt/.pth (loaded weights-only, converted to safetensors).")
    ] = False,
    max_mb: Annotated[int, typer.Option("--max-mb", min=1, help="Refuse downloads larger than this.")] = 4096,
    data_dir: Optional[Path] = DataDir,
    model_dir: ModelDirOpt = None,
    config: Optional[Path] = Config,
) -> None:
    """Download (or copy) model weights into the model dir, verifying sha256.

    Nothing in deepwatch downloads weights on its own; this is the only way in.
    Example: deepwatch models fetch npr --url https://host/npr.safetensors --sha256 ab12...
    """
    from detectors.models.fetch import FetchError, fetch_model

    target = _model_dir(config, data_dir, model_dir)
    # before anything is fetched: a model dir that cannot be made or written in
    # ended the download on a bare "[Errno 13] Permission denied: '.../models'"
    check_writable_dir(target, "--model-dir" if model_dir is not None else "model dir")
    if sha256 is None and url is not None:
        err.print("[yellow]warning:[/] no --sha256 given: the download cannot be verified")
    failed: str | None = None
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task(f"fetching {name}", total=None)

        def progress(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        try:
            card = fetch_model(name, model_dir=target, url=url, sha256=sha256, arch=arch,
                               allow_pickle=allow_pickle, max_bytes=max_mb * 1024 * 1024, progress=progress)
        except (FetchError, KeyError, ValueError) as e:
            _drop_bar(bar)
            failed = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    if failed is not None:
        # a bad URL, path, name or hash: the user's to fix, as a network error is (exit 2); said once the
        # bar is gone (failing inside it left a blank line after the error)
        fail(failed)
    err.print(f"stored {name} ({card.arch} v{card.version}) in {target}  sha256 {card.weights_sha256}")


@models_app.command("list")
def list_cmd(
    data_dir: Optional[Path] = DataDir,
    model_dir: ModelDirOpt = None,
    config: Optional[Path] = Config,
    fmt: str = FormatOpt,
    as_json: bool = JsonAlias,
) -> None:
    """List the models in the model dir with their architecture, calibration and training summary:
    checkpoints (<name>.safetensors + <name>.json), pixel heads written by `deepwatch train --recipe
    pixel-probe` (one <name>.safetensors) and the packaged pixel probe. NAME is what --model and
    detect.models take."""
    from detectors.models.checkpoint import list_models, list_pixel_heads
    from detectors.models.pixel_detector import BUILTIN
    from detectors.models.pixel_probe import PixelHead

    as_json = as_json or check_format(fmt) == "json"
    target = _model_dir(config, data_dir, model_dir)
    if target.exists() and not target.is_dir():
        fail(f"{target} is a file, not a model directory; give --model-dir a folder")
    cards = list_models(target)
    heads = list_pixel_heads(target)
    trained = bool(cards or heads)
    for name, path in BUILTIN.items():
        try:
            heads.insert(0, (name, path, PixelHead.load(path).card))
        except (OSError, ValueError):  # a broken install: the trained ones are still worth listing
            continue
    if as_json:
        print(json.dumps([c.model_dump(mode="json", exclude={"training": {"files_sha256"}}) for c in cards]
                         + [_pixel_entry(name, path, card) for name, path, card in heads], indent=2))
        return
    if not trained:
        err.print(f"no models in {target}; use `deepwatch models fetch` or `deepwatch train`"
                  + (" (the packaged ones are listed below)" if heads else ""))
    if not cards and not heads:
        return
    t = keyed_table("name", "arch", "version", "input", "calibration", "threshold", "trained on", "held-out AUC",
                    compact=True)
    for c in cards:
        tr = c.training
        t.add_row(c.name, c.arch, c.version, f"{c.input.size} {c.input.mode}", c.calibration.method,
                  f"{c.threshold:g}", str(tr.get("n_train", "?")),
                  str((tr.get("calibration_split") or {}).get("auc", "-")))
    for name, path, card in heads:
        e = _pixel_entry(name, path, card)
        tr = card.trained_on
        # "(packaged)" on a line of its own: the name above it is what --model takes, whole
        t.add_row(name + ("\n(packaged)" if e["packaged"] else ""), e["arch"], card.version,
                  f"{card.spec.crops} x 224 crop", card.calibration.method, f"{card.threshold:.3g}",
                  str(tr.get("n_ai", 0) + tr.get("n_real", 0)) if "n_ai" in tr else "?",
                  _fmt(e["held_out_auc"]) + " (leave-generator-out)" if e["held_out_auc"] is not None else "-")
    Console().print(fit(t))


def _pixel_entry(name: str, path: Path, card) -> dict:
    """``models list --format json`` row of a pixel head: the checkpoint rows' main keys, plus where it is."""
    from detectors.models.pixel_probe import HEADS_DIR

    auc = (((card.metrics.get("reposted") or {}).get("overall")) or {}).get("auc")
    return {"name": name, "kind": "pixel-head", "arch": f"{card.spec.backbone}+{card.head}-probe",
            "version": card.version, "path": str(path), "packaged": path.parent.resolve() == HEADS_DIR.resolve(),
            "card_name": card.name, "calibration": card.calibration.model_dump(mode="json"), "threshold": card.threshold,
            "held_out_auc": auc, "training": {k: v for k, v in card.trained_on.items() if k != "files_sha256"}}


@app.command("train")
def train_cmd(
    ctx: typer.Context,
    real: Annotated[list[Path], typer.Option("--real", metavar="DIR", help="Folder of real photos (repeatable).")] = [],  # noqa: B006
    fake: Annotated[list[Path], typer.Option("--fake", metavar="DIR", help="Folder of AI-generated images (repeatable).")] = [],  # noqa: B006
    manifest: Annotated[
        Optional[Path], typer.Option("--manifest", help="manifest.csv (file,label,generator,...) instead of / besides folders.")
    ] = None,
    generators: Annotated[
        Optional[str], typer.Option("--generators", help="Regex: with --manifest, train only on AI images whose generator matches.")
    ] = None,
    real_fraction: Annotated[
        float, typer.Option("--real-fraction", help="With --manifest, use this deterministic fraction of the real images (rest held out).")
    ] = 1.0,
    arch: Annotated[str, typer.Option("--arch", metavar="npr-r50|small-cnn|clip-probe", help="npr-r50 | small-cnn | clip-probe (needs open_clip).")] = "npr-r50",
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="cnn: passes over the training data.")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="cnn: pictures per training step.")] = 16,
    lr: Annotated[float, typer.Option("--lr", callback=_above_zero("0.001"), help="cnn: learning rate (> 0).")] = 1e-3,
    input_size: Annotated[Optional[int], typer.Option("--input-size", min=32, max=2048, help="Square input side (default per arch; 32-2048).")] = None,
    calibration: Annotated[str, typer.Option("--calibration", metavar="platt|temperature|none", help="platt | temperature | none")] = "platt",
    init_from: Annotated[Optional[str], typer.Option("--init-from", help="Fine-tune this model from the model dir.")] = None,
    out: Annotated[str, typer.Option("--out", help="Name to save the checkpoint as.")] = "detector",
    seed: Annotated[int, typer.Option("--seed", help="Random seed, for runs that can be repeated exactly.")] = 0,
    recipe: Annotated[
        str, typer.Option("--recipe", metavar="cnn|pixel-probe", help="cnn: train a network end to end (--arch); pixel-probe: a small head on the "
                          "wheel-shipped EfficientNet-Lite2, judged by leave-generator-out CV (--data).")
    ] = "cnn",
    data: Annotated[
        list[Path], typer.Option("--data", metavar="PATH", help="pixel-probe: manifest.csv or a folder holding one (repeatable).")
    ] = [],  # noqa: B006
    head_out: Annotated[
        Optional[Path], typer.Option("--head-out", help="pixel-probe: where to write the head (default <model-dir>/<out>.safetensors).")
    ] = None,
    cache_dir: Annotated[
        Optional[Path], typer.Option("--cache-dir", help="pixel-probe: backbone feature cache (default <data-dir>/cache/pixel-features).")
    ] = None,
    probe_c: Annotated[float, typer.Option("--probe-c", callback=_above_zero("0.01"), help="pixel-probe: inverse L2 strength of the logistic head (> 0).")] = 0.01,
    crops: Annotated[int, typer.Option("--crops", min=1, max=5, help="pixel-probe: 224-px crops per picture (1-5; speed vs accuracy; the shipped head uses 3).")] = 3,
    group_by: Annotated[str, typer.Option("--group-by", metavar="generator|family", help="pixel-probe CV groups: generator | family.")] = "generator",
    hidden: Annotated[
        int, typer.Option("--hidden", min=0, help="pixel-probe: hidden ReLU units of the head (0 = linear logistic regression).")
    ] = 64,
    alpha: Annotated[float, typer.Option("--alpha", min=0, help="pixel-probe: L2 strength of the MLP head (>= 0).")] = 1.0,
    augment: Annotated[
        int, typer.Option("--augment", min=0, help="pixel-probe: extra randomly re-encoded copies per picture (JPEG q60-95, "
                          "resize 0.5-1, crop, blur), both classes alike; 0 = re-posted copies only.")
    ] = 0,
    data_dir: Optional[Path] = DataDir,
    model_dir: ModelDirOpt = None,
    config: Optional[Path] = Config,
) -> None:
    """Train a detector: a network end to end (--recipe cnn) or a small head
    on packaged image features (--recipe pixel-probe).

    --recipe cnn (default): train or fine-tune a network end to end (--arch) on
    --real/--fake folders or --manifest; writes <model-dir>/<out>.safetensors +
    <out>.json. Both classes are re-encoded to JPEG at random quality, randomly
    downscaled, cropped and blurred so the network cannot learn "PNG = AI"; a
    stratified quarter is held out to fit the calibration.

    --recipe pixel-probe: a small head on the wheel-shipped EfficientNet-Lite2
    features of --data manifests, judged by leave-generator-out CV, calibrated
    and thresholded on out-of-fold scores; writes ONE file,
    <model-dir>/<out>.safetensors (or --head-out), the card in its metadata,
    plus <out>.md, a readable model card. Use it with detect.pixel_head or
    --model <out>.
    """
    _check_recipe_options(ctx, recipe)
    if recipe == "pixel-probe":
        _train_pixel_probe(data, out=out, head_out=head_out, cache_dir=cache_dir, probe_c=probe_c, crops=crops,
                           group_by=group_by, seed=seed, augment=augment, hidden=hidden, alpha=alpha,
                           config=config, data_dir=data_dir,
                           model_dir=model_dir)
        return
    if recipe != "cnn":
        fail(f"unknown --recipe {recipe!r}; use cnn or pixel-probe")
    # said before the imports below (torch: about a second), as eval says a missing set
    _check_cnn_folders(real, fake)
    if manifest is not None:
        manifest = _manifest_file(manifest)
    from detectors.models.dataset import Sample, filter_generators, image_files, load_manifest, stable_fraction
    from detectors.models.train import TrainConfig, train_model

    _check_cnn_options(generators, real_fraction, arch, calibration, out)
    samples: list[Sample] = []
    for d in real:
        samples += [Sample(p, 0) for p in image_files(d)]
    for d in fake:
        samples += [Sample(p, 1) for p in image_files(d)]
    if manifest is not None:
        m = filter_generators(_load_samples(lambda: load_manifest(manifest)), include=generators)
        samples += [s for s in m if s.label == 1 or stable_fraction(s.path, real_fraction)]
    if not samples:
        given = [f"--real {d}" for d in real] + [f"--fake {d}" for d in fake] + \
                ([f"--manifest {manifest}"] if manifest is not None else [])
        if given:  # the folders were given, and the old line told the user to give them
            fail(f"no images in {', '.join(given)} (looked for image files, searching folders recursively); "
                 "point them at folders holding pictures, or at a manifest listing some")
        fail("no images: give --real/--fake folders or --manifest")
    _check_both_classes(samples, real, fake, manifest, generators, real_fraction)
    target = _model_dir(config, data_dir, model_dir)
    cfg = TrainConfig(arch=arch, name=out, epochs=epochs, batch_size=batch_size, lr=lr, input_size=input_size,
                      calibration=calibration, seed=seed, init_from=init_from)  # type: ignore[arg-type]
    failed: Exception | None = None
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=err) as bar:
        task = bar.add_task("training", total=None, info="")

        def progress(phase: str, done: int, total: int, stats: dict[str, float]) -> None:
            info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items())
            bar.update(task, description=phase, completed=done, total=total, info=info)

        try:
            card = train_model(samples, target, cfg, progress)
        except (ValueError, KeyError, RuntimeError, FileNotFoundError) as e:
            # The bar goes before the error line: it was left drawn after it ("training ━━━ 0/None").
            _drop_bar(bar)
            failed = e
    if failed is not None:
        print_error(str(failed))
        raise typer.Exit(1)
    tr = card.training
    err.print(
        f"saved {out} ({card.arch}) to {target}: trained on {tr['n_train_pos']} AI + {tr['n_train_neg']} real, "
        f"calibration {card.calibration.method} on {card.calibration.n}, "
        f"held-out AUC {tr['calibration_split'].get('auc', 'n/a')}"
    )


_CNN_ONLY = ("real", "fake", "manifest", "generators", "real_fraction", "arch", "epochs", "batch_size", "lr",
             "input_size", "calibration", "init_from")
_PROBE_ONLY = ("data", "head_out", "cache_dir", "probe_c", "crops", "group_by", "hidden", "alpha", "augment")


def _check_recipe_options(ctx: typer.Context, recipe: str) -> None:
    """Options of the other recipe, typed on the command line, are a mistake
    to say: each recipe ignored the other's (``--recipe pixel-probe --real
    DIR`` trained on the shared manifests alone)."""
    other = _CNN_ONLY if recipe == "pixel-probe" else _PROBE_ONLY if recipe == "cnn" else ()
    given = [f"--{n.replace('_', '-')}" for n in other if getattr(ctx.get_parameter_source(n), "name", "") == "COMMANDLINE"]
    if given:
        fail(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to --recipe {recipe}; "
             f"see `deepwatch train --help` for which options each recipe takes")


def _check_both_classes(samples: list, real: list[Path], fake: list[Path], manifest: Path | None,
                        generators: str | None, real_fraction: float) -> None:
    """Both classes have images before training starts: a class with none
    ended after the progress bar began, on train_model's "training needs both
    classes", exit 1, with the bar left drawn below the error."""
    n_ai = sum(1 for s in samples if s.label == 1)
    n_real = len(samples) - n_ai
    for label, n, option, folders in (("AI", n_ai, "--fake", fake), ("real", n_real, "--real", real)):
        if n:
            continue
        where = []
        if folders:
            where.append(f"{option} {' '.join(str(d) for d in folders)} holds no images")
        if manifest is not None:
            narrowed = (f" matching --generators {generators!r}" if label == "AI" and generators is not None
                        else f" kept by --real-fraction {real_fraction:g}" if label == "real" and real_fraction < 1 else "")
            where.append(f"--manifest {manifest} has no {label} rows{narrowed}")
        found = "; ".join(where) or f"no {option} folder given"
        fail(f"training needs both classes, and there are no {label} images ({found}); "
             f"give {option} a folder of {label} images (.jpg, .png, ...)")


def _manifest_file(manifest: Path) -> Path:
    """--manifest as a file: a folder holding manifest.csv is taken, as eval
    and --data take it; a missing path is named (both were bare OS errors)."""
    if manifest.is_dir():
        if (manifest / "manifest.csv").is_file():
            return manifest / "manifest.csv"
        fail(f"--manifest {manifest}: no manifest.csv in this folder; give a manifest file or a folder holding one")
    if not manifest.is_file():
        fail(f"--manifest {manifest}: no such file; give a manifest.csv or a folder holding one")
    return manifest


def _check_cnn_folders(real: list[Path], fake: list[Path]) -> None:
    """--real and --fake are folders: a typo'd one was read as empty."""
    for option, folders in (("--real", real), ("--fake", fake)):
        for d in folders:
            if d.is_file():
                fail(f"{option} {d} is a file, not a folder: give the folder holding the images, e.g. {option} {d.parent}")
            if not d.is_dir():
                fail(f"{option} {d}: no such folder")


def _check_cnn_options(generators: str | None, real_fraction: float, arch: str, calibration: str, out: str) -> None:
    """Mistakes the cnn recipe used to take quietly (``--calibration bogus``
    trained as platt, ``--real-fraction 5`` as 1) or only after loading
    everything (an unknown --arch, a bad --out name)."""
    from detectors.models.checkpoint import validate_name
    from detectors.models.nets import ARCHITECTURES

    _check_regex(generators, "--generators")
    if not 0.0 <= real_fraction <= 1.0:
        fail(f"--real-fraction {real_fraction:g} is not between 0 and 1")
    if arch not in ARCHITECTURES:
        fail(f"--arch {arch!r} is not one of {', '.join(sorted(ARCHITECTURES))}")
    if calibration not in ("platt", "temperature", "none"):
        fail(f"--calibration {calibration!r} is not one of platt, temperature, none")
    try:
        validate_name(out)
    except ValueError as e:
        fail(f"--out: {e}")


def _check_head_target(target: Path, what: str) -> None:
    """The head's file can be written, checked before the minutes of feature extraction: a
    directory there ended the whole run on a safetensors traceback at the save."""
    import os

    if target.is_dir():
        fail(f"{what} {target} is a directory; give a file path, e.g. {target / 'my-probe.safetensors'}")
    if os.path.lexists(target) and not target.is_file():
        fail(f"{what} {target} exists and is not a regular file; give a file path ending in .safetensors")
    if target.is_file() and not os.access(target, os.W_OK):
        fail(f"{what} {target} exists and cannot be overwritten; give another path")
    check_writable_dir(target.parent, f"{what} {target}: its folder")


def _train_pixel_probe(data: list[Path], *, out: str, head_out: Path | None, cache_dir: Path | None, probe_c: float,
                       crops: int, group_by: str, seed: int, augment: int, hidden: int, alpha: float,
                       config, data_dir, model_dir) -> None:

    if not data:
        fail("--recipe pixel-probe needs --data MANIFEST_OR_DIR (repeatable)")
    missing = [d for d in data if not (d.is_file() or (d / "manifest.csv").is_file())]
    if missing:
        fail(f"no manifest.csv at {missing[0]} (give a manifest file or a folder holding one)")
    if group_by not in ("generator", "family"):
        fail(f"--group-by {group_by!r}: give generator or family")
    from detectors.models.pixel_data import read_manifest

    for d in data:  # a bad manifest is named now, not after minutes of feature extraction
        _load_samples(lambda: read_manifest(d))
    from detectors.models.pixel_backbone import FeatureSpec
    from detectors.models.pixel_probe import render_model_card
    from detectors.models.pixel_train import ProbeParams, train_pixel_probe

    if cache_dir is not None:  # checked now, not after the manifests load
        check_writable_dir(cache_dir, "--cache-dir")
    settings = settings_from(config, data_dir=data_dir)
    name = DEFAULT_PIXEL_MODEL if out == "detector" else out
    target = head_out or (_model_dir(config, data_dir, model_dir) / f"{name}.safetensors")
    _check_head_target(target, "--head-out" if head_out else "the head's path in the model dir")
    cache = cache_dir or Path(settings.data_dir) / "cache" / "pixel-features"
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    failed: Exception | None = None
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=err) as bar:
        task = bar.add_task("backbone features (cached)", total=None)
        try:
            with _fits_quietly():
                head, _, _ = train_pixel_probe(
                    data, target, cache_dir=cache, spec=FeatureSpec(crops=crops), name=name,
                    params=ProbeParams(C=probe_c, seed=seed, hidden=hidden, alpha=alpha,
                                       train_variants=("reposted", *(f"aug{k}" for k in range(augment)))),
                    group_by=group_by,
                    progress=lambda done, total: bar.update(task, completed=done, total=total),
                )
        except (ValueError, RuntimeError, OSError, KeyError) as e:  # OSError: a cache or target gone bad meanwhile
            _drop_bar(bar)  # no bar left drawn below the error line
            failed = e
    if failed is not None:
        print_error(str(failed))
        raise typer.Exit(1)
    from detectors.models.pixel_probe import HEADS_DIR

    # The packaged head's card has a fixed name; a user's head gets <name>.md beside it.
    packaged = target.parent.resolve() == HEADS_DIR.resolve()
    card_path = target.with_name("MODEL_CARD.md" if packaged else f"{target.stem}.md")
    try:
        card_path.write_text(render_model_card(head.card), encoding="utf-8")
    except OSError as e:
        print_error(f"saved the head {target}, but not its model card {card_path}: {e}")
        raise typer.Exit(1) from None
    o = head.card.metrics["reposted"]["overall"]
    err.print(
        f"saved {target} and {card_path}: leave-generator-out re-posted AUC {o['auc']:.3f}, "
        f"TPR@1%FPR {o['tpr_at_1pct_fpr']:.2f}, threshold {head.card.threshold:.3f}\n"
        f"use it: set detect.pixel_head = \"{target}\" (DEEPWATCH_DETECT__PIXEL_HEAD={target})"
    )


@app.command("eval")
def eval_cmd(
    sources: Annotated[
        list[Path], typer.Argument(metavar="SOURCES", help="Labelled set(s): manifest.csv, a folder holding one, or a folder with real/ and ai/ (or fake/).")
    ],
    model: Annotated[list[str], typer.Option("--model", metavar="NAME", help="Model (or vendor:NAME) to evaluate, repeatable.")] = [],  # noqa: B006
    models: Annotated[bool, typer.Option(
        "--models/--no-models", help="Also evaluate the configured learned models (detect.models; default: the packaged "
        "pixel probe), as `deepwatch detect` runs them. --no-models: only --model and the cheap detectors.")] = True,
    cheap: Annotated[bool, typer.Option("--cheap/--no-cheap", help="Also run the cheap provenance detectors.")] = True,
    format: Annotated[str, typer.Option("--format", metavar="table|json", help="json | table")] = "table",
    exclude_generators: Annotated[Optional[str], typer.Option("--exclude-generators", help="Regex: drop AI images of these generators.")] = None,
    generators: Annotated[Optional[str], typer.Option("--generators", help="Regex: keep only AI images of these generators.")] = None,
    exclude_trained: Annotated[
        bool, typer.Option("--exclude-trained", help="Drop files the evaluated models were trained or calibrated on.")
    ] = False,
    variant: Annotated[list[str], typer.Option("--variant", metavar="original|reposted", help="original and/or reposted (default both).")] = [],  # noqa: B006
    device: Annotated[str, typer.Option("--device", help="Device for learned models: auto, cpu, cuda, cuda:N or mps.")] = "auto",
    batch: Annotated[int, typer.Option("--batch", min=1, help="Pictures per learned-model batch.")] = 16,
    leave_generator_out: Annotated[
        bool, typer.Option("--leave-generator-out", help="Instead: cross-validate the pixel-probe recipe on these manifests, "
                           "holding out whole generators (and real-photo sources) per fold; per generator and category metrics.")
    ] = False,
    group_by: Annotated[str, typer.Option("--group-by", metavar="generator|family", help="With --leave-generator-out: generator | family.")] = "generator",
    crops: Annotated[int, typer.Option("--crops", min=1, max=5, help="With --leave-generator-out: crops per picture (1-5; the shipped head uses 3).")] = 3,
    cache_dir: Annotated[Optional[Path], typer.Option("--cache-dir", help="With --leave-generator-out: backbone feature cache.")] = None,
    train_variant: Annotated[list[str], typer.Option(
        "--train-variant", metavar="VARIANT", help="With --leave-generator-out: extra training copies besides the re-post: published, "
        "aug<k> (crop, resize 0.5-1.0, blur, JPEG q60-95) or jpeg<k> (JPEG q60-95 + crop at native scale); held-out "
        "folds are always scored re-posted and as published.")] = [],  # noqa: B006
    seed: Annotated[int, typer.Option("--seed", help="With --leave-generator-out: fold shuffle and head seed.")] = 0,
    data_dir: Optional[Path] = DataDir,
    model_dir: ModelDirOpt = None,
    config: Optional[Path] = Config,
) -> None:
    """Measure detectors (AUC, AP, accuracy/recall at the operating threshold) per
    detector, fused and per generator, on the files as given and re-posted
    (metadata stripped, JPEG q80, long side <= 1600 px). JSON shape: see
    detectors/models/evaluate.py."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    missing = [p for p in sources if not p.exists()]
    if missing:  # said before the imports below (torch: about a second)
        fail(f"{missing[0]} does not exist (give a manifest.csv or a folder)")
    from detectors.base import create_all
    from detectors.models.dataset import filter_generators, load_labelled
    from detectors.models.evaluate import VARIANTS, evaluate

    unknown = [v for v in variant if v not in VARIANTS]
    if unknown:
        fail(f"--variant {unknown[0]!r} is not one of {', '.join(VARIANTS)}")
    if format not in ("json", "table"):
        fail(f"--format is json or table, not {format!r}")
    if group_by not in ("generator", "family"):
        fail(f"--group-by is generator or family, not {group_by!r}")
    _check_regex(generators, "--generators")
    _check_regex(exclude_generators, "--exclude-generators")
    from streams.cli.detect import check_device

    check_device(device)
    if leave_generator_out:
        _eval_leave_generator_out(sources, group_by=group_by, crops=crops, cache_dir=cache_dir, config=config,
                                  data_dir=data_dir, as_json=format == "json", train_variants=train_variant, seed=seed)
        return
    source = Path(",".join(str(p) for p in sources))
    samples = filter_generators(_load_samples(lambda: [s for p in sources for s in load_labelled(p)]),
                                include=generators, exclude=exclude_generators)
    if not (models or cheap or model):
        # ran with no detector and printed a lone "fused" row, AUC 0.500, exit 0
        fail("--no-models --no-cheap leaves nothing to evaluate: drop --no-models or --no-cheap, or add --model NAME")
    from streams.cli.common import UserError
    from streams.cli.detect import load_model_detectors

    settings = settings_from(config, data_dir=data_dir)
    target = model_dir or settings.model_dir
    dets = []
    if cheap:
        try:
            dets += create_all(cost="cheap", names=settings.detect.cheap)  # the ones `deepwatch detect` runs
        except Exception as e:  # noqa: BLE001  a broken cheap plugin should not block model eval
            err.print(f"[yellow]warning:[/] cheap detectors unavailable: {e}")
    try:
        # The same learned detectors `deepwatch detect` runs: --model ones, then the configured ones.
        # strict: a configured model that does not load is an error here, not a warning; the report
        # would otherwise measure the cheap detectors alone under the name of what detect runs
        dets += load_model_detectors(list(model), target, device, settings.detect.pixel_head,
                                     list(settings.detect.models) if models else [], amp=settings.detect.amp,
                                     strict=True, vendor_urls=settings.detect.vendor_urls)
    except UserError as e:  # a model that does not load: a user mistake, exit 2 as in `deepwatch detect`
        fail(str(e))
    if not dets:
        fail("no detector to evaluate: the configured cheap detectors (detect.cheap) and models (detect.models) gave "
             "none; pass --model NAME, or drop --no-cheap / --no-models")
    exclude: set[str] = set()
    if exclude_trained:
        for d in dets:
            exclude |= getattr(d, "trained_files", frozenset())  # cheap detectors learned nothing
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  console=err, transient=True) as bar:
        task = bar.add_task("eval", total=len(samples))

        def progress(phase: str, done: int, total: int) -> None:
            bar.update(task, description=phase, completed=done, total=total)

        try:
            report = evaluate(samples, dets, dataset=str(source), batch=batch, variants=variant or VARIANTS,
                              exclude_sha256=exclude or None, progress=progress)
        except ValueError as e:
            print_error(str(e))
            raise typer.Exit(1) from None
    if report.get("trained_overlap"):
        # on its own training pictures a head scores far better than on news (AUC 1.0 for the shipped one)
        err.print(f"[yellow]warning:[/] {report['trained_overlap']} of {report['n']} file(s) are training pictures of a "
                  "model evaluated here: its numbers are optimistic; --exclude-trained leaves them out",
                  highlight=False, soft_wrap=True)
    if format == "json":
        print(json.dumps(report, indent=2))
        return
    _print_table(report)


def _eval_leave_generator_out(sources: list[Path], *, group_by: str, crops: int, cache_dir: Path | None, config, data_dir,
                              as_json: bool, train_variants: list[str] = (), seed: int = 0) -> None:
    import re


    bad = [v for v in train_variants if not re.fullmatch(r"published|aug\d+|jpeg\d+", v)]
    if bad:
        fail(f"--train-variant {bad[0]!r} is not one of published, aug<k>, jpeg<k> (e.g. jpeg0)")
    manifests = [p if p.is_file() else p / "manifest.csv" for p in sources]
    if not all(m.is_file() for m in manifests):
        fail("--leave-generator-out needs manifests with a generator column (manifest.csv or its folder)")
    if cache_dir is not None:
        check_writable_dir(cache_dir, "--cache-dir")
    from detectors.models.pixel_backbone import Backbone, FeatureSpec
    from detectors.models.pixel_data import FeatureCache, read_manifest
    from detectors.models.pixel_features import extract
    from detectors.models.pixel_train import (
        EVAL_VARIANTS, ProbeParams, calibrate_and_threshold, cross_validate, cv_report, people_fp_rates, skipped_rows,
        unique_samples,
    )

    settings = settings_from(config, data_dir=data_dir)
    spec = FeatureSpec(crops=crops)
    params = ProbeParams(train_variants=tuple(dict.fromkeys(("reposted", *train_variants))), seed=seed)
    samples, repeats = unique_samples(_load_samples(lambda: [s for m in manifests for s in read_manifest(m, group_by)]))
    cache = FeatureCache(cache_dir or Path(settings.data_dir) / "cache" / "pixel-features", spec.backbone, spec.draft_min_side)
    with Progress(TextColumn("backbone features (cached)"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  console=err, transient=True) as bar:
        task = bar.add_task("features", total=None)
        skipped = extract(samples, sorted(set(params.train_variants) | set(EVAL_VARIANTS)), cache, Backbone(spec.backbone),
                          spec, progress=lambda d, t: bar.update(task, completed=d, total=t))
    try:
        with _fits_quietly():
            cv = cross_validate(samples, cache, spec, params)
            cal, thr = calibrate_and_threshold(samples, cv)
    except ValueError as e:  # a fold with one class: no honest number to give
        print_error(str(e))
        raise typer.Exit(1) from None
    # the folds run, as cross_validate made them: no more than there are groups (6 groups said "folds": 10)
    folds = int(cv.fold_of.max()) + 1
    report = {"schema": 1, "mode": "leave-generator-out", "group_by": group_by, "folds": folds,
              "dataset": [str(m) for m in manifests], "threshold": thr, "crops": crops,
              "train_variants": list(params.train_variants), "seed": seed,
              # pictures in no metric below: not decodable in a variant (training rows included), or listed again
              "skipped": skipped_rows(skipped or []), "duplicates": repeats,
              "variants": cv_report(samples, cv, cal, thr),
              "real_categories_reposted": people_fp_rates(samples, cal.apply(cv.oof["reposted"]), thr)}
    if as_json:
        print(json.dumps(report, indent=2))
        return
    con = Console()
    _print_left_out(con, report)
    for v, r in report["variants"].items():
        t = keyed_table("generator", "n AI", "AUC", "AP", "TPR@1%", "TPR@5%", title=f"{v} (leave-{group_by}-out)",
                        compact=True)
        o = r["overall"]
        t.add_row("ALL", str(o["n_ai"]), *(_fmt(o[k]) for k in ("auc", "ap", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr")))
        for g, m in r["generators"].items():
            t.add_row(g, str(m["n_ai"]), *(_fmt(m[k]) for k in ("auc", "ap", "tpr_at_1pct_fpr", "tpr_at_5pct_fpr")))
        con.print(fit(t))


def _fmt(v: object) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _print_left_out(con: Console, report: dict) -> None:
    """One line each for the pictures the numbers leave out or score without a detector: the
    table said "25 images" while a variant measured 23, and never named the rest."""
    for key, what in (("skipped", "left out of the metrics (unreadable, or not decodable in a variant)"),
                      ("duplicates", "the same bytes listed again (scored once) or under both labels (left out)"),
                      ("detector_errors", "a detector failed on (no opinion there)")):
        rows = report.get(key) or []
        if rows:
            shown = ", ".join(f"{r['file']}" + (f" ({r['variant']})" if r.get("variant") else "") for r in rows[:3])
            con.print(f"{len(rows)} {key.replace('_', ' ')}: {what}: {shown}" + (", ..." if len(rows) > 3 else "")
                      + " (--format json lists them)", markup=False, highlight=False, soft_wrap=True)


def _print_table(report: dict) -> None:
    con = Console()
    con.print(f"{report['dataset']}: {report['n']} images ({report['n_pos']} AI, {report['n_neg']} real)"
              + (f", {report['excluded_trained']} excluded as training data" if report["excluded_trained"] else ""))
    _print_left_out(con, report)
    for vname, v in report["variants"].items():
        t = keyed_table("detector", "AUC", "AP", "acc", "recall", "FPR", "real >= 0.5", "thr", "coverage",
                        title=f"{vname} (n={v['n']})", compact=True)
        rows = dict(v["detectors"])
        if v.get("fused"):
            rows["fused"] = v["fused"]
        for name, m in rows.items():
            t.add_row(name, *(_fmt(m.get(k)) for k in ("auc", "average_precision", "accuracy", "recall", "fpr", "real_above_0.5",
                                                       "threshold", "coverage")))
        con.print(fit(t))
