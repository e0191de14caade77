"""What may leave the machine: the one sanitiser of every file that is saved next to a model or pushed to the Hub.

``save_pruned_model`` passes the PruningConfig and the PruneReport through here before anything is written, so
``config.json`` (its ``pruning_config``), ``prune_report.json``, the model card (its config block, calibration rows
and warnings) and the plot are all made from the sanitised values; ``push_folder_to_hub`` refuses a folder whose
``config.json`` or ``prune_report.json`` still holds what this module removes (a folder saved by an older version).

The rules:

- a list of strings given as a text source (``calibration``, ``heldout_source``, a report's ``source``) becomes a
  marker with its count and sha256, ``"<user texts: 12, sha256 9f86d0...>"`` (see ``texts_marker``);
- fields that only said where a run kept things (``EXECUTION_ONLY_PATH_FIELDS``: checkpoints, streams, the
  self-generation cache) are dropped (``None``);
- every other absolute local path keeps only its last component (``/home/me/data/corpus.txt`` -> ``corpus.txt``),
  also inside free text such as a warning.

A sanitised config reads back with ``PruningConfig.from_pretrained``: the marker is a valid ``calibration`` string,
and building a calibration set from it raises ``ValueError`` saying that the texts were not saved (pass them again).
Sanitising is idempotent. This module imports nothing of the package, so every layer may use it.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any, Iterable, Optional, Sequence

#: PruningConfig fields that name a local folder only to say where a run kept things: dropped from saved files.
EXECUTION_ONLY_PATH_FIELDS = ("checkpoint_dir", "stream_folder", "self_gen_cache_dir")
#: PruningConfig fields that are a text source: a dataset name, a path, or a list of texts.
TEXT_SOURCE_FIELDS = ("calibration", "heldout_source")
#: Keys of a report's calibration description (and of user-built descriptions) whose list of strings is text.
_TEXT_KEYS = frozenset({"source", "texts", *TEXT_SOURCE_FIELDS})

_MARKER_RE = re.compile(r"^<user texts: (\d+), sha256 ([0-9a-f]{64})>$")
# Directory prefixes of absolute paths inside free text (POSIX, home-relative, Windows). The look-behind keeps URLs
# ("https://host/a/b") and ratios ("2/3") intact.
PATH_PREFIX_RES = (
    re.compile(r"(?<![\w.:/~-])~?/(?:[^\s/'\"`()<>,;|]+/)+"),
    re.compile(r"(?<![\w])[A-Za-z]:\\(?:[^\s\\'\"`()<>,;|]+\\)+"),
)
_WINDOWS_ABS_RE = re.compile(r"^[A-Za-z]:[\\/]")


def texts_digest(texts: Sequence[str]) -> str:
    """sha256 (hex) of a list of texts, joined by NUL characters."""
    return hashlib.sha256("\x00".join(map(str, texts)).encode("utf-8")).hexdigest()


def texts_marker(texts: Sequence[str]) -> str:
    """What a list of texts becomes in a saved file: ``"<user texts: N, sha256 HEX>"``."""
    return f"<user texts: {len(texts)}, sha256 {texts_digest(texts)}>"


def parse_texts_marker(value: Any) -> Optional[tuple[int, str]]:
    """``(count, sha256)`` of a marker made by ``texts_marker``, or None for anything else."""
    match = _MARKER_RE.match(value) if isinstance(value, str) else None
    return (int(match.group(1)), match.group(2)) if match else None


def is_absolute_path(text: str) -> bool:
    return os.path.isabs(text) or text.startswith("~") or bool(_WINDOWS_ABS_RE.match(text))


def last_component(path: str) -> str:
    """The last component of a path (``"<local path>"`` when there is none, e.g. ``"/"``)."""
    return re.split(r"[/\\]", path.rstrip("/\\"))[-1] or "<local path>"


def strip_paths(text: str, known: Iterable[str] = ()) -> str:
    """``text`` without local paths: a lone absolute path becomes its last component, paths inside text lose their
    folders; ``known`` paths (e.g. the folder being written) are cut wherever they appear."""
    stripped = text.strip()
    if stripped and not any(c.isspace() for c in stripped) and is_absolute_path(stripped):
        return last_component(stripped)
    home = os.path.expanduser("~")
    folders = {os.path.abspath(p) for p in known if p} | ({home} if len(home) > 1 else set())
    for path in sorted(folders, key=len, reverse=True):
        text = re.sub(re.escape(path) + r"[/\\]", "", text)
        text = re.sub(re.escape(path) + r"(?![\w.-])", "<local folder>", text)
    for pattern in PATH_PREFIX_RES:
        text = pattern.sub("", text)
    return text


def sanitise_value(value: Any, known: Iterable[str] = (), key: Optional[str] = None) -> Any:
    """A JSON-able value with every local path stripped and every list of texts (under a text key) summarised."""
    known = tuple(known)
    if isinstance(value, str):
        return value if parse_texts_marker(value) else strip_paths(value, known)
    if isinstance(value, dict):
        return {_key(k, known): sanitise_value(v, known, k if isinstance(k, str) else None) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if key in _TEXT_KEYS and value and all(isinstance(v, str) for v in value):
            return texts_marker(list(value))
        return [sanitise_value(v, known) for v in value]
    return value


def _key(key: Any, known: tuple) -> Any:
    """A dict key (e.g. a perplexity entry named by a local file) loses its folders like any string."""
    return strip_paths(key, known) if isinstance(key, str) and not parse_texts_marker(key) else key


def sanitise_config_dict(data: dict[str, Any], known: Iterable[str] = ()) -> dict[str, Any]:
    """A ``PruningConfig.to_dict()`` fit to publish (see the module docstring); the input is not modified."""
    clean = {}
    for name, value in data.items():
        if name in EXECUTION_ONLY_PATH_FIELDS:
            clean[name] = None
        elif name in TEXT_SOURCE_FIELDS and isinstance(value, (list, tuple)):
            clean[name] = texts_marker(list(value))
        elif name in TEXT_SOURCE_FIELDS and isinstance(value, str) and is_absolute_path(value.strip()):
            clean[name] = last_component(value.strip())
        else:
            clean[name] = sanitise_value(value, known, name)
    return clean


def sanitise_report_dict(data: dict[str, Any], known: Iterable[str] = ()) -> dict[str, Any]:
    """A ``PruneReport.to_dict()`` fit to publish: its config as ``sanitise_config_dict``, paths stripped elsewhere
    (model name, calibration description, warnings, dataset names)."""
    known = tuple(known)
    clean = sanitise_value({k: v for k, v in data.items() if k != "config"}, known)
    if "config" in data:
        config = data["config"]
        clean["config"] = sanitise_config_dict(config, known) if isinstance(config, dict) else config
    return clean


def unsanitised_fields(data: Any, clean: Any, prefix: str = "") -> list[str]:
    """The dotted names under which ``data`` differs from its sanitised ``clean`` (what sanitising would remove)."""
    if isinstance(data, dict) and isinstance(clean, dict):
        return [name for k in data for name in unsanitised_fields(data[k], clean.get(k), f"{prefix}{k}.")]
    if isinstance(data, list) and isinstance(clean, list) and len(data) == len(clean):
        return [name for i, (a, b) in enumerate(zip(data, clean)) for name in unsanitised_fields(a, b, f"{prefix}{i}.")]
    return [] if data == clean else [prefix.rstrip(".")]
