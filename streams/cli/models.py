"""``deepwatch models fetch|list``, ``deepwatch train`` and ``deepwatch eval``:
managing, training and measuring the learned detectors in ``detectors.models``."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from streams.cli.app import app

models_app = typer.Typer(
    help="Manage learned detector weights in the model dir (<data-dir>/models unless detect.model_dir is set).",
    no_args_is_help=True,
)
app.add_typer(models_app, name="models")

err = Console(stderr=True)

DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", help="deepwatch data directory (default from settings).")]
ModelDirOpt = Annotated[
    Optional[Path], typer.Option("--model-dir", help="Model directory (default: settings detect.model_dir or <data-dir>/models).")
]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="TOML settings file.")]


def _model_dir(config: Path | None, data_dir: Path | None, model_dir: Path | None) -> Path:
    if model_dir is not None:
        return model_dir
    from streams.settings import load_settings

    return load_settings(config, data_dir=data_dir).model_dir


@models_app.command("fetch")
def fetch_cmd(
    name: Annotated[str, typer.Argument(help="Name to store the model under (used by --model / detect.models).")],
    url: Annotated[
        Optional[str], typer.Option("--url", help="https URL, file:// URL or local path of the .safetensors weights.")
    ] = None,
    sha256: Annotated[Optional[str], typer.Option("--sha256", help="Expected sha256 of the weights file; mismatch = refused.")] = None,
    arch: Annotated[
        Optional[str], typer.Option("--arch", help="Architecture (npr-r50|small-cnn|clip-probe) when no .json card sits next to the weights.")
    ] = None,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Accept a pickled .pt/.pth (loaded weights-only, converted to safetensors).")
    ] = False,
    max_mb: Annotated[int, typer.Option("--max-mb", help="Refuse downloads larger than this.")] = 4096,
    data_dir: DataDirOpt = None,
    model_dir: ModelDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Download (or copy) model weights into the model dir, verifying sha256.

    Nothing in deepwatch downloads weights on its own; this is the only way in.
    Example: deepwatch models fetch npr --url https://host/npr.safetensors --sha256 ab12...
    """
    from detectors.models.fetch import FetchError, fetch_model

    target = _model_dir(config, data_dir, model_dir)
    if sha256 is None and url is not None:
        err.print("[yellow]warning:[/] no --sha256 given: the download cannot be verified")
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=err, transient=True) as bar:
        task = bar.add_task(f"fetching {name}", total=None)

        def progress(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        try:
            card = fetch_model(name, model_dir=target, url=url, sha256=sha256, arch=arch,
                               allow_pickle=allow_pickle, max_bytes=max_mb * 1024 * 1024, progress=progress)
        except (FetchError, KeyError, ValueError) as e:
            err.print(f"[red]error:[/] {e}")
            raise typer.Exit(1) from None
    err.print(f"stored {name} ({card.arch} v{card.version}) in {target}  sha256 {card.weights_sha256}")


@models_app.command("list")
def list_cmd(
    data_dir: DataDirOpt = None,
    model_dir: ModelDirOpt = None,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the models in the model dir with their architecture, calibration and training summary."""
    from detectors.models.checkpoint import list_models

    target = _model_dir(config, data_dir, model_dir)
    cards = list_models(target)
    if as_json:
        print(json.dumps([c.model_dump(mode="json", exclude={"training": {"files_sha256"}}) for c in cards], indent=2))
        return
    if not cards:
        err.print(f"no models in {target}; use `deepwatch models fetch` or `deepwatch train`")
        return
    t = Table("name", "arch", "version", "input", "calibration", "threshold", "trained on", "held-out AUC")
    for c in cards:
        tr = c.training
        t.add_row(c.name, c.arch, c.version, f"{c.input.size} {c.input.mode}", c.calibration.method,
                  f"{c.threshold:g}", str(tr.get("n_train", "?")),
                  str((tr.get("calibration_split") or {}).get("auc", "-")))
    Console().print(t)


@app.command("train")
def train_cmd(
    real: Annotated[list[Path], typer.Option("--real", help="Folder of real photos (repeatable).")] = [],  # noqa: B006
    fake: Annotated[list[Path], typer.Option("--fake", help="Folder of AI-generated images (repeatable).")] = [],  # noqa: B006
    manifest: Annotated[
        Optional[Path], typer.Option("--manifest", help="manifest.csv (file,label,generator,...) instead of / besides folders.")
    ] = None,
    generators: Annotated[
        Optional[str], typer.Option("--generators", help="Regex: with --manifest, train only on AI images whose generator matches.")
    ] = None,
    real_fraction: Annotated[
        float, typer.Option("--real-fraction", help="With --manifest, use this deterministic fraction of the real images (rest held out).")
    ] = 1.0,
    arch: Annotated[str, typer.Option("--arch", help="npr-r50 | small-cnn | clip-probe (needs open_clip).")] = "npr-r50",
    epochs: Annotated[int, typer.Option("--epochs")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 16,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    input_size: Annotated[Optional[int], typer.Option("--input-size", help="Square input side (default per arch).")] = None,
    calibration: Annotated[str, typer.Option("--calibration", help="platt | temperature | none")] = "platt",
    init_from: Annotated[Optional[str], typer.Option("--init-from", help="Fine-tune this model from the model dir.")] = None,
    out: Annotated[str, typer.Option("--out", help="Name to save the checkpoint as.")] = "detector",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    data_dir: DataDirOpt = None,
    model_dir: ModelDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Train or fine-tune a detector and write <out>.safetensors + <out>.json.

    Both classes are re-encoded to JPEG at random quality, randomly downscaled,
    cropped and blurred during training so the network cannot learn "PNG = AI".
    A stratified quarter of the data is held out to fit the calibration.
    """
    from detectors.models.dataset import Sample, filter_generators, image_files, load_manifest, stable_fraction
    from detectors.models.train import TrainConfig, train_model

    samples: list[Sample] = []
    for d in real:
        samples += [Sample(p, 0) for p in image_files(d)]
    for d in fake:
        samples += [Sample(p, 1) for p in image_files(d)]
    if manifest is not None:
        m = filter_generators(load_manifest(manifest), include=generators)
        samples += [s for s in m if s.label == 1 or stable_fraction(s.path, real_fraction)]
    if not samples:
        err.print("[red]error:[/] no images: give --real/--fake folders or --manifest")
        raise typer.Exit(2)
    target = _model_dir(config, data_dir, model_dir)
    cfg = TrainConfig(arch=arch, name=out, epochs=epochs, batch_size=batch_size, lr=lr, input_size=input_size,
                      calibration=calibration, seed=seed, init_from=init_from)  # type: ignore[arg-type]
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), console=err) as bar:
        task = bar.add_task("training", total=None, info="")

        def progress(phase: str, done: int, total: int, stats: dict[str, float]) -> None:
            info = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items())
            bar.update(task, description=phase, completed=done, total=total, info=info)

        try:
            card = train_model(samples, target, cfg, progress)
        except (ValueError, KeyError, RuntimeError, FileNotFoundError) as e:
            err.print(f"[red]error:[/] {e}")
            raise typer.Exit(1) from None
    tr = card.training
    err.print(
        f"saved {out} ({card.arch}) to {target}: trained on {tr['n_train_pos']} AI + {tr['n_train_neg']} real, "
        f"calibration {card.calibration.method} on {card.calibration.n}, "
        f"held-out AUC {tr['calibration_split'].get('auc', 'n/a')}"
    )


@app.command("eval")
def eval_cmd(
    source: Annotated[Path, typer.Argument(help="Labelled set: manifest.csv, a folder holding one, or a folder with real/ and ai/ (or fake/).")],
    model: Annotated[list[str], typer.Option("--model", help="Model (or vendor:NAME) to evaluate, repeatable.")] = [],  # noqa: B006
    cheap: Annotated[bool, typer.Option("--cheap/--no-cheap", help="Also run the cheap provenance detectors.")] = True,
    format: Annotated[str, typer.Option("--format", help="json | table")] = "table",
    exclude_generators: Annotated[Optional[str], typer.Option("--exclude-generators", help="Regex: drop AI images of these generators.")] = None,
    generators: Annotated[Optional[str], typer.Option("--generators", help="Regex: keep only AI images of these generators.")] = None,
    exclude_trained: Annotated[
        bool, typer.Option("--exclude-trained", help="Drop files the evaluated models were trained or calibrated on.")
    ] = False,
    variant: Annotated[list[str], typer.Option("--variant", help="original and/or reposted (default both).")] = [],  # noqa: B006
    device: Annotated[str, typer.Option("--device")] = "auto",
    batch: Annotated[int, typer.Option("--batch")] = 16,
    data_dir: DataDirOpt = None,
    model_dir: ModelDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Measure detectors (AUC, AP, accuracy/recall at the operating threshold) per
    detector, fused and per generator, on the files as given and re-posted
    (metadata stripped, JPEG q80, long side <= 1600 px). JSON shape: see
    detectors/models/evaluate.py."""
    from detectors.base import create_all
    from detectors.models.dataset import filter_generators, load_labelled
    from detectors.models.detector import load_detector
    from detectors.models.evaluate import VARIANTS, evaluate

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    samples = filter_generators(load_labelled(source), include=generators, exclude=exclude_generators)
    target = _model_dir(config, data_dir, model_dir)
    dets = []
    if cheap:
        try:
            dets += create_all(cost="cheap")
        except Exception as e:  # noqa: BLE001  a broken cheap plugin should not block model eval
            err.print(f"[yellow]warning:[/] cheap detectors unavailable: {e}")
    for name in model:
        try:
            dets.append(load_detector(name, model_dir=target, device=device))
        except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
            err.print(f"[red]error:[/] {e}")
            raise typer.Exit(1) from None
    exclude: set[str] = set()
    if exclude_trained:
        for d in dets:
            card = getattr(d, "card", None)
            if card is not None:
                exclude |= set(card.training.get("files_sha256", []))
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  console=err, transient=True) as bar:
        task = bar.add_task("eval", total=len(samples))

        def progress(phase: str, done: int, total: int) -> None:
            bar.update(task, description=phase, completed=done, total=total)

        report = evaluate(samples, dets, dataset=str(source), batch=batch, variants=variant or VARIANTS,
                          exclude_sha256=exclude or None, progress=progress)
    if format == "json":
        print(json.dumps(report, indent=2))
        return
    _print_table(report)


def _fmt(v: object) -> str:
    return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _print_table(report: dict) -> None:
    con = Console()
    con.print(f"{report['dataset']}: {report['n']} images ({report['n_pos']} AI, {report['n_neg']} real)"
              + (f", {report['excluded_trained']} excluded as training data" if report["excluded_trained"] else ""))
    for vname, v in report["variants"].items():
        t = Table("detector", "AUC", "AP", "acc", "recall", "FPR", "thr", "coverage", title=f"{vname} (n={v['n']})")
        rows = dict(v["detectors"])
        if v.get("fused"):
            rows["fused"] = v["fused"]
        for name, m in rows.items():
            t.add_row(name, *(_fmt(m[k]) for k in ("auc", "average_precision", "accuracy", "recall", "fpr", "threshold", "coverage")))
        con.print(t)
