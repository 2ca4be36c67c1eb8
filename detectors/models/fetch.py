"""Put model weights into the model dir, explicitly and verifiably.

Nothing in deepwatch downloads weights on its own: this runs only from
``deepwatch models fetch``. Rules:

* https only; plain http is accepted only for loopback hosts (a local mirror
  or a test server); a local path or ``file://`` URL is copied.
* A size cap is enforced from Content-Length and again while streaming.
* With ``sha256`` given, a mismatch deletes the download and fails.
* Weights are stored as safetensors only. A pickled checkpoint (``.pt``/
  ``.pth``/``.bin``/``.ckpt``) can run arbitrary code when loaded and is refused
  unless ``allow_pickle``; then it is loaded with ``torch.load(weights_only=True)``
  and converted, so the model dir never holds a pickle.
* The JSON card is fetched from the same place with a ``.json`` suffix, or
  synthesised from ``arch`` (uncalibrated) when there is none.
* Everything is written to ``*.part`` files and renamed at the end; a failure
  leaves nothing behind.
"""

from __future__ import annotations

import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Callable
from urllib.parse import unquote, urlparse

import httpx
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from detectors.models.checkpoint import ModelCard, paths, sha256_file, validate_name, write_card
from detectors.models.nets import get_arch
from detectors.netaddr import is_loopback
from detectors.printable import escaped

DEFAULT_MAX_BYTES = 4 * 1024**3
_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl"}

Progress = Callable[[int, int | None], None]  # (bytes so far, total or None)


class FetchError(RuntimeError):
    pass


def _source_kind(source: str) -> str:
    u = urlparse(source)
    if u.scheme == "https":
        return "http"
    if u.scheme == "http":
        if not is_loopback(u.hostname):
            raise FetchError(f"refusing plain-http URL {source!r}: use https (http is allowed only for localhost)")
        return "http"
    if u.scheme == "file" or u.scheme == "" or (len(u.scheme) == 1 and source[1:3] in (":\\", ":/")):
        return "file"
    raise FetchError(f"unsupported URL scheme {u.scheme!r} (https, file:// or a local path)")


def _local_path(source: str) -> Path:
    u = urlparse(source)
    return Path(unquote(u.path)) if u.scheme == "file" else Path(source)


def _download(source: str, dest: Path, max_bytes: int, progress: Progress | None, timeout: float) -> None:
    """Stream ``source`` into ``dest``; raise FetchError on any problem."""
    if _source_kind(source) == "file":
        src = _local_path(source)
        if src.is_dir():
            raise FetchError(f"{src} is a directory: give --url the weights file (.safetensors) itself")
        if not src.is_file():
            raise FetchError(f"no such file: {src}")
        size = src.stat().st_size
        if size > max_bytes:
            raise FetchError(f"{src} is {size} bytes, over the {max_bytes}-byte cap")
        with src.open("rb") as fin, dest.open("wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)
        if progress:
            progress(size, size)
        return
    t = httpx.Timeout(timeout, connect=min(10.0, timeout))
    with httpx.Client(timeout=t, follow_redirects=True, max_redirects=5) as client:
        with client.stream("GET", source) as r:
            if r.url.scheme != "https" and not is_loopback(r.url.host):
                raise FetchError(f"redirected to non-https URL {r.url}")
            if r.status_code != 200:
                raise FetchError(f"GET {source} -> HTTP {r.status_code}")
            total = int(r.headers["content-length"]) if r.headers.get("content-length", "").isdigit() else None
            if total is not None and total > max_bytes:
                raise FetchError(f"{source} is {total} bytes, over the {max_bytes}-byte cap")
            got = 0
            with dest.open("wb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    got += len(chunk)
                    if got > max_bytes:
                        raise FetchError(f"{source} exceeded the {max_bytes}-byte cap while downloading")
                    f.write(chunk)
                    if progress:
                        progress(got, total)


def _looks_pickled(path: Path, source: str) -> bool:
    with path.open("rb") as f:
        head = f.read(8)
    # zip (torch >= 1.6 format) or a raw pickle stream (protocol 2+ starts 0x80)
    return head[:2] == b"PK" or head[:1] == b"\x80" or Path(urlparse(source).path).suffix.lower() in PICKLE_SUFFIXES


# What torch's weights-only unpickler refused, from its message: a global it would have
# imported and called ("Unsupported global: GLOBAL posix.system was not an allowed global
# ..."), the code a hostile pickle runs; anything else it could not read is no checkpoint.
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def _validate_safetensors(path: Path, source: str) -> None:
    try:
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
    except Exception as e:  # noqa: BLE001
        if _source_kind(source) == "file":  # copied, not downloaded: name the user's file
            raise FetchError(f"{_local_path(source)} is not a safetensors file ({e}); give --url the .safetensors "
                             "weights (a pickled .pt/.pth needs --allow-pickle)") from e
        raise FetchError(f"downloaded file is not valid safetensors: {e}") from e


def _convert_pickle(part: Path, out: Path) -> None:
    try:
        with warnings.catch_warnings():
            # torch warns of a pickle protocol it did not write; the refusal below says what matters
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(str(part), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own words advise weights_only=False or allowlisting the global: running what the file holds
        unsafe = _UNSAFE_GLOBAL.search(str(e))
        if unsafe:  # the name comes from the file: shown escaped, never as terminal control codes
            raise FetchError(f"refused: the pickled checkpoint calls {escaped(unsafe.group(1))} when loaded (code, "
                             "not weights); nothing was stored. Ask its publisher for safetensors weights") from None
        raise FetchError("not a weights-only checkpoint (corrupt, truncated, or pickled with instructions a "
                         "weights-only load does not read); nothing was stored. Check the file, or ask its "
                         "publisher for safetensors weights") from None
    except Exception as e:  # noqa: BLE001
        raise FetchError(f"could not load pickled checkpoint with weights_only=True: {str(e).splitlines()[0]}") from e
    # Common wrappers: {"model": sd}, {"state_dict": sd}; DataParallel's "module." prefix.
    for key in ("model", "state_dict", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise FetchError("pickled checkpoint is not a plain state dict of tensors")
    sd = {k.removeprefix("module."): v.contiguous() for k, v in obj.items()}
    save_file(sd, str(out))


def _card_source(source: str) -> str:
    u = urlparse(source)
    p = u.path
    stem = p.rsplit(".", 1)[0] if "." in p.rsplit("/", 1)[-1] else p
    return u._replace(path=stem + ".json").geturl()


def fetch_model(
    name: str,
    *,
    model_dir: Path,
    url: str | None = None,
    sha256: str | None = None,
    arch: str | None = None,
    allow_pickle: bool = False,
    max_bytes: int = DEFAULT_MAX_BYTES,
    timeout: float = 60.0,
    progress: Progress | None = None,
) -> ModelCard:
    validate_name(name)
    if sha256 is not None and not _SHA256_RE.fullmatch(sha256.strip()):
        # checked before the download: a typo'd hash would otherwise cost the whole transfer
        raise FetchError(f"--sha256 {sha256!r} is not a sha256 digest (64 hex digits); nothing downloaded")
    if url is None:
        # No name resolves to a download by itself: the project publishes no
        # weights with a pinned hash, and an unverified one must never be fetched.
        raise FetchError(f"no published weights are known for {name!r}; pass --url (https URL, file:// URL or local path)")
    model_dir.mkdir(parents=True, exist_ok=True)
    weights, sidecar = paths(model_dir, name)
    part = weights.with_name(weights.name + ".part")
    conv = weights.with_name(weights.name + ".conv.part")
    card_part = sidecar.with_name(sidecar.name + ".part")
    try:
        _download(url, part, max_bytes, progress, timeout)
        if sha256:
            actual = sha256_file(part)
            if actual.lower() != sha256.strip().lower():
                raise FetchError(f"sha256 mismatch for {url}: expected {sha256}, got {actual}; download discarded")
        if _looks_pickled(part, url):
            if not allow_pickle:
                raise FetchError(
                    "this is a pickled checkpoint, which can execute code when loaded; refusing. "
                    "Use a .safetensors file, or pass --allow-pickle to load it with "
                    "torch.load(weights_only=True) and convert it to safetensors"
                )
            _convert_pickle(part, conv)
            conv.replace(part)
        _validate_safetensors(part, url)

        card: ModelCard | None = None
        try:
            _download(_card_source(url), card_part, 1 << 20, None, timeout)
            card = ModelCard.model_validate_json(card_part.read_text())
        except (FetchError, OSError, ValueError):
            card = None
        if card is None:
            if not arch:
                raise FetchError(f"no model card (.json) next to {url}; pass --arch to describe the weights")
            spec = get_arch(arch)
            card = ModelCard(
                name=name,
                arch=arch,
                display_name=spec.display,
                arch_params=dict(spec.default_params),
                input=spec.default_input,
                training={"source": url, "note": "card synthesised at fetch time; not calibrated"},
            )
        card = card.model_copy(update={"name": name, "weights_sha256": sha256_file(part)})
        part.replace(weights)
        write_card(sidecar, card)
        return card
    finally:
        for p in (part, conv, card_part):
            p.unlink(missing_ok=True)
