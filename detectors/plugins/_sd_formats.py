"""Recognise generation metadata written by Stable Diffusion front-ends.

Each recogniser looks at one (key, value) text item, wherever it came from
(PNG text chunk, EXIF UserComment, JPEG comment), and returns a `Finding` only
when the *structure* matches the tool's format, not merely a keyword: a
``prompt`` chunk must be a ComfyUI node graph, ``parameters`` must carry
A1111's ``Steps: N, Sampler: ...`` line. Values are already size-capped by the
caller; JSON that fails to parse (truncated, too deep) falls back to a
structural search on its head.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from detectors.plugins._generators import find_generator

Strength = Literal["generator-chunk", "tool-name", "free-text"]

# Values are capped again here in case a caller forgot; JSON parsing of more
# than this is never attempted.
MAX_PARSE_CHARS = 1 << 20
_MODEL_EXT = re.compile(r"[^\"'\\/]{1,200}\.(safetensors|ckpt|gguf|sft|pt|pth|bin)\b", re.IGNORECASE)
_A1111_LINE = re.compile(r"(^|\n)Steps: \d+, Sampler: ", re.MULTILINE)
_A1111_MODEL = re.compile(r"\bModel: ([^,\n]{1,200})")
_DREAM_FLAGS = re.compile(r"\s-(s|S|W|H|C|A)\s*\S+")
_MJ_JOB = re.compile(r"Job ID:\s*[0-9a-f]{8}-[0-9a-f]{4}-", re.IGNORECASE)
_TOOL_KEYS = frozenset({"software", "source", "make", "model", "creatortool", "generator"})
# Human-written fields worth a look; arbitrary keys (file names, dates) are not.
_FREE_TEXT_KEYS = frozenset(
    {"description", "imagedescription", "comment", "usercomment", "xpcomment", "title", "artist", "author", "parameters"}
)


# A model name or fact as reported: a file's JSON can make either anything
# (a 1 MB string, a nested object), and the evidence travels in a broker
# message of at most 1 MB.
MAX_FACT_CHARS = 200


def _fact(value: Any) -> Any:
    """``value`` as evidence data: a number or flag as it is, anything else
    as text of at most ``MAX_FACT_CHARS``."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    return str(value)[:MAX_FACT_CHARS]


@dataclass
class Finding:
    generator: str
    where: str
    strength: Strength
    model: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Read from the file: an InvokeAI or Fooocus model name of 1 MB made the
        # picture's cluster op 2 MB, and the picture a dead letter (too_large).
        self.model = None if self.model is None else str(self.model)[:MAX_FACT_CHARS]
        self.facts = {k: _fact(v) for k, v in self.facts.items()}


def _json(value: str) -> Any:
    if len(value) > MAX_PARSE_CHARS:
        return None
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return None


def _first(values: list[str]) -> str | None:
    return values[0] if values else None


def _comfy_prompt_models(graph: dict[str, Any]) -> list[str]:
    models = []
    for node in graph.values():
        inputs = node.get("inputs") if isinstance(node, dict) else None
        if isinstance(inputs, dict):
            for key in ("ckpt_name", "unet_name", "model_name"):
                if isinstance(inputs.get(key), str):
                    models.append(inputs[key])
    return models


def _is_comfy_prompt(obj: Any) -> bool:
    nodes = [v for v in obj.values()] if isinstance(obj, dict) else []
    return bool(nodes) and all(isinstance(n, dict) and "class_type" in n for n in nodes)


def _is_comfy_workflow(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("nodes"), list) and any(
        isinstance(n, dict) and "type" in n for n in obj["nodes"]
    )


def comfyui(key: str, value: str, where: str) -> Finding | None:
    if key not in ("prompt", "workflow"):
        return None
    obj = _json(value)
    if obj is None:
        # Truncated or unparsable: accept only an unmistakable node-graph head.
        head = value[:65536]
        if '"class_type"' in head or ('"nodes"' in head and '"last_node_id"' in head):
            return Finding("ComfyUI", where, "generator-chunk", _first([m.group(0) for m in _MODEL_EXT.finditer(head)]))
        return None
    if key == "prompt" and _is_comfy_prompt(obj):
        return Finding("ComfyUI", where, "generator-chunk", _first(_comfy_prompt_models(obj)), {"nodes": len(obj)})
    if key == "workflow" and _is_comfy_workflow(obj):
        model = _first([m.group(0) for m in _MODEL_EXT.finditer(value[:65536])])
        return Finding("ComfyUI", where, "generator-chunk", model, {"nodes": len(obj["nodes"])})
    return None


def automatic1111(key: str, value: str, where: str) -> Finding | None:
    head = value[:65536]
    if "fooocus" in head.lower() and (key == "parameters" or _A1111_LINE.search(head)):
        return None  # Fooocus writes A1111-style text too; the Fooocus recogniser names it
    if _A1111_LINE.search(head) or (key == "parameters" and "\nNegative prompt:" in head):
        m = _A1111_MODEL.search(head)
        return Finding("AUTOMATIC1111-style (A1111/Forge/SD.Next)", where, "generator-chunk", m.group(1).strip() if m else None)
    return None


def fooocus(key: str, value: str, where: str) -> Finding | None:
    if key == "fooocus_scheme":
        return Finding("Fooocus", where, "generator-chunk")
    if key != "parameters" and not _A1111_LINE.search(value[:65536]):
        return None
    obj = _json(value) if value.lstrip().startswith("{") else None
    if isinstance(obj, dict) and ("fooocus" in str(obj.get("version", "")).lower() or "base_model" in obj):
        return Finding("Fooocus", where, "generator-chunk", obj.get("base_model"), {"version": obj.get("version")})
    if "Version: Fooocus" in value[:65536] or "fooocus" in value[:65536].lower():
        return Finding("Fooocus", where, "generator-chunk")
    return None


def invokeai(key: str, value: str, where: str) -> Finding | None:
    if key in ("invokeai_metadata", "invokeai_graph"):
        obj = _json(value)
        model = obj.get("model") if isinstance(obj, dict) else None
        name = (model.get("model_name") or model.get("name")) if isinstance(model, dict) else None
        return Finding("InvokeAI", where, "generator-chunk", name)
    if key == "sd-metadata":
        obj = _json(value)
        if isinstance(obj, dict) and ("invoke" in str(obj.get("app_id", "")).lower() or "model_weights" in obj):
            return Finding("InvokeAI", where, "generator-chunk", obj.get("model_weights"))
        return None
    if key == "Dream" and _DREAM_FLAGS.search(value[:65536]):
        return Finding("InvokeAI", where, "generator-chunk", facts={"format": "dream"})
    return None


def novelai(key: str, value: str, where: str) -> Finding | None:
    if key == "Software" and value.strip().lower().startswith("novelai"):
        return Finding("NovelAI", where, "generator-chunk")
    if key == "Source" and re.match(r"\s*(novelai diffusion|stable diffusion [0-9a-f]{8})", value, re.IGNORECASE):
        return Finding("NovelAI", where, "generator-chunk", value.strip()[:100])
    if key == "Comment":
        obj = _json(value)
        if isinstance(obj, dict) and {"steps", "sampler", "uc"} <= obj.keys():
            return Finding("NovelAI", where, "generator-chunk")
    return None


def midjourney(key: str, value: str, where: str) -> Finding | None:
    if _MJ_JOB.search(value[:65536]):
        return Finding("Midjourney", where, "generator-chunk")
    return None


def other_frontends(key: str, value: str, where: str) -> Finding | None:
    if key == "sui_image_params":
        return Finding("SwarmUI", where, "generator-chunk")
    if key in ("use_stable_diffusion_model", "use_stable_diffusion_config"):
        return Finding("Easy Diffusion", where, "generator-chunk", value.strip()[:200] or None)
    return None


def named_generator(key: str, value: str, where: str) -> Finding | None:
    tool_field = key.lower() in _TOOL_KEYS
    if not tool_field and key.lower() not in _FREE_TEXT_KEYS:
        return None
    name = find_generator(value, free_text=not tool_field)
    if name is None:
        return None
    return Finding(name, where, "tool-name" if tool_field else "free-text")


RECOGNISERS = (comfyui, fooocus, automatic1111, invokeai, novelai, midjourney, other_frontends, named_generator)


def recognise(key: str, value: str, where: str) -> Finding | None:
    """The first recogniser that matches (most specific first), or None."""
    value = value[:MAX_PARSE_CHARS]
    for rec in RECOGNISERS:
        found = rec(key, value, where)
        if found is not None:
            return found
    return None
