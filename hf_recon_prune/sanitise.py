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
- a field that names one source, tokenizer, model or dataset (``PATH_FIELDS``: ``calibration``, ``heldout_source``,
  a report's ``source``, ``tokenizer``, ``model_name``, a zero-shot dataset's ``path``; and the dataset names that
  key a report's ``perplexity``) keeps only the last component of its value, as a whole, spaces included, when the
  value names a local file or folder (``names_local_path``): an absolute path (``/``, ``~``, ``C:\\``), a relative
  one that exists from the working directory, or one shaped like a path, that is one with a separator (``/`` or
  ``\\``) that is no Hub id ``owner/name`` (``../data/x``, ``a/b/c``, ``./x``, ``a/corpus.jsonl`` with a data file's
  suffix). Presets, bare names and Hub ids (``c4``, ``wikitext``, ``allenai/c4``) stay as they are; so does a
  relative ``folder/name`` without a suffix that does not exist when saving, which cannot be told from a Hub id;
- every other absolute local path keeps only its last component (``/home/me/data/corpus.txt`` -> ``corpus.txt``),
  also inside free text such as a warning. A string that starts with an absolute path and has no space after its
  last separator is one path, spaces in its folders included. Inside free text a path ends at the first space,
  except where it can be told reliably: a quoted path (``'...'``, ``"..."``, backquotes), a path whose folders exist
  on disk, and the folders of the local paths named by the path fields of the same config or report (e.g. the
  calibration file named again in a warning) are cut whole, also when relative.

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
#: Keys whose string value names one source, tokenizer, model or dataset: a preset, a Hub id, or a local path.
PATH_FIELDS = frozenset({*TEXT_SOURCE_FIELDS, "source", "tokenizer", "model_name", "path"})
#: Keys of dicts whose own keys name sources (a report's perplexity per dataset).
_SOURCE_KEYED = frozenset({"perplexity"})
# Hub repo ids: "name" or "owner/name"; "--" and ".." are not allowed in them.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
# A name that ends like a data file is a file, even when it is shaped like "owner/name".
_FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".arrow", ".gz", ".zst", ".md")

_MARKER_RE = re.compile(r"^<user texts: (\d+), sha256 ([0-9a-f]{64})>$")
# Directory prefixes of absolute paths inside free text (POSIX, home-relative, Windows). The look-behind keeps URLs
# ("https://host/a/b") and ratios ("2/3") intact.
PATH_PREFIX_RES = (
    re.compile(r"(?<![\w.:/~-])~?/(?:[^\s/'\"`()<>,;|]+/)+"),
    re.compile(r"(?<![\w])[A-Za-z]:\\(?:[^\s\\'\"`()<>,;|]+\\)+"),
)
_WINDOWS_ABS_RE = re.compile(r"^[A-Za-z]:[\\/]")
# A string that starts like an absolute path (a lone one: see strip_paths).
_LONE_PATH_RE = re.compile(r"^(?:~[\w.-]*|[A-Za-z]:)?[/\\][^\s/\\]")
# A quoted absolute path with at least one folder: the quotes say where it ends, even past a space.
_QUOTED_PATH_RE = re.compile(r"""(['"`])((?:~|[A-Za-z]:)?[/\\][^'"`\n]*[/\\][^'"`\n]*)\1""")
# Where an absolute POSIX path starts inside free text (as in PATH_PREFIX_RES).
_POSIX_START_RE = re.compile(r"(?<![\w.:/~-])/")


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


def names_local_path(value: str) -> bool:
    """Whether the value of a path field (``PATH_FIELDS``) names a local file or folder rather than a preset or a
    Hub id: it is absolute, exists from the working directory, or has a separator and is no ``owner/name`` id."""
    text = value.strip()
    if not text or parse_texts_marker(text):
        return False
    if is_absolute_path(text) or os.path.exists(text):
        return True
    if not re.search(r"[/\\]", text):
        return False
    is_hub_id = _HUB_ID_RE.match(text) and "--" not in text and ".." not in text
    return not is_hub_id or text.lower().endswith(_FILE_SUFFIXES)


def strip_paths(text: str, known: Iterable[str] = ()) -> str:
    """``text`` without local paths: a lone absolute path becomes its last component, paths inside text lose their
    folders; ``known`` paths (e.g. the folder being written, relative ones too) are cut wherever they appear."""
    stripped = text.strip()
    if _LONE_PATH_RE.match(stripped) and "\n" not in stripped and \
            not any(c.isspace() for c in last_component(stripped)):
        return last_component(stripped)
    text = _QUOTED_PATH_RE.sub(lambda m: m.group(1) + last_component(m.group(2)) + m.group(1), text)
    known = [p for p in known if p]
    folders = {os.path.abspath(os.path.expanduser(p)) for p in known} | {p for p in known if is_absolute_path(p)}
    folders |= {os.path.expanduser("~"), *_existing_folders_with_spaces(text)}
    for path in sorted((f for f in folders if len(f.rstrip("/\\")) > 1), key=len, reverse=True):
        text = re.sub(re.escape(path) + r"[/\\]", "", text)
        text = re.sub(re.escape(path) + r"(?![\w.-])", "<local folder>", text)
    # A relative folder is cut where it starts a path only: "data" must not eat "metadata/" or a lone word.
    for path in sorted({p.rstrip("/\\") for p in known if not is_absolute_path(p)}, key=len, reverse=True):
        if path:
            text = re.sub(r"(?<![\w.~/\\-])" + re.escape(path) + r"[/\\]", "", text)
    for pattern in PATH_PREFIX_RES:
        text = pattern.sub("", text)
    return text


def _existing_folders_with_spaces(text: str) -> list[str]:
    """The longest existing folders that absolute paths inside ``text`` start with, where they hold a space (the
    patterns of PATH_PREFIX_RES would stop there)."""
    found = []
    for start in _POSIX_START_RE.finditer(text):
        folder, end = None, text.find("/", start.end())
        while end > 0 and os.path.isdir(text[start.start():end]):
            folder, end = text[start.start():end], text.find("/", end + 1)
        if folder and any(c.isspace() for c in folder):
            found.append(folder)
    return found


def _named_folders(value: Any, key: Optional[str] = None) -> list[str]:
    """The folders of the local paths that the path fields in ``value`` name (cut wherever they appear again)."""
    if isinstance(value, str):
        if key in PATH_FIELDS and names_local_path(value):
            folder = value.strip().rstrip("/\\")[: -len(last_component(value.strip()))].rstrip("/\\")
            return [folder] if folder else []
        return []
    if isinstance(value, dict):
        named = [n for k, v in value.items() for n in _named_folders(v, k if isinstance(k, str) else None)]
        if key in _SOURCE_KEYED:
            named += [n for k in value if isinstance(k, str) for n in _named_folders(k, "source")]
        return named
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _named_folders(v)]
    return []


def sanitise_value(value: Any, known: Iterable[str] = (), key: Optional[str] = None) -> Any:
    """A JSON-able value with every local path stripped and every list of texts (under a text key) summarised;
    ``key`` is the name ``value`` is stored under (a path field's value loses its folders as a whole)."""
    known = tuple(known)
    if isinstance(value, str):
        if parse_texts_marker(value):
            return value
        if key in PATH_FIELDS and names_local_path(value):
            return last_component(value.strip())
        return strip_paths(value, known)
    if isinstance(value, dict):
        key_field = "source" if key in _SOURCE_KEYED else None
        return {_key(k, known, key_field): sanitise_value(v, known, k if isinstance(k, str) else None)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        if key in _TEXT_KEYS and value and all(isinstance(v, str) for v in value):
            return texts_marker(list(value))
        return [sanitise_value(v, known) for v in value]
    return value


def _key(key: Any, known: tuple, field: Optional[str]) -> Any:
    """A dict key loses its folders like any string; one that names a source (``field``), e.g. a perplexity entry
    named by a local file, like a path field."""
    return sanitise_value(key, known, field) if isinstance(key, str) else key


def sanitise_config_dict(data: dict[str, Any], known: Iterable[str] = ()) -> dict[str, Any]:
    """A ``PruningConfig.to_dict()`` fit to publish (see the module docstring); the input is not modified."""
    known = (*known, *_named_folders({k: v for k, v in data.items() if k not in EXECUTION_ONLY_PATH_FIELDS}))
    clean = {}
    for name, value in data.items():
        if name in EXECUTION_ONLY_PATH_FIELDS:
            clean[name] = None
        elif name in TEXT_SOURCE_FIELDS and isinstance(value, (list, tuple)):
            clean[name] = texts_marker(list(value))
        else:
            clean[name] = sanitise_value(value, known, name)
    return clean


def sanitise_report_dict(data: dict[str, Any], known: Iterable[str] = ()) -> dict[str, Any]:
    """A ``PruneReport.to_dict()`` fit to publish: its config as ``sanitise_config_dict``, paths stripped elsewhere
    (model name, calibration description, warnings, dataset names)."""
    known = (*known, *_named_folders(data))
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
