"""What the card may say about where the model came from: a Hub id, never a local path.

The base model's Hub id is read off names only (a Hugging Face cache snapshot, the offline default model's folder,
an ``org/name`` that is no local path), without the network; ``_Redactor`` cuts the local paths out of any text the
card shows.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any, Optional

from ..sanitise import PATH_PREFIX_RES

# Hub repo ids: "name" or "namespace/name"; "--" and ".." are not allowed in them.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}(/[A-Za-z0-9][A-Za-z0-9_.-]{0,95})?$")
_HF_CACHE_RE = re.compile(r"models--(.+?)--([^/\\]+)[/\\]snapshots")
_FILE_SUFFIXES = (".txt", ".json", ".jsonl", ".ndjson", ".csv", ".parquet", ".arrow", ".gz", ".md")
# Directory prefixes of absolute paths inside free text: the sanitiser's (one definition of them).
_PATH_PREFIX_RES = PATH_PREFIX_RES


def _looks_like_hub_id(name: Any) -> bool:
    if not isinstance(name, str) or not _HUB_ID_RE.match(name) or "--" in name or ".." in name:
        return False
    return not os.path.exists(name)


def _base_model_id(explicit: Optional[str], name_or_path: str, report_name: Any) -> Optional[str]:
    """A Hub id for the base model: the explicit one, else one read off ``_name_or_path``; never a local path.

    An inferred id must have a namespace ("org/name"): a bare name is as likely a vanished relative folder or a
    class name (the report's fallback model name) as a legacy Hub id. Pass ``base_model="gpt2"`` for those.
    """
    if explicit:
        if _looks_like_hub_id(explicit):
            return explicit
        warnings.warn(f"base_model={os.path.basename(str(explicit))!r} is not a Hub repo id; it is left out of the "
                      "model card", stacklevel=4)
    for candidate in (name_or_path, report_name):
        if not isinstance(candidate, str) or not candidate:
            continue
        match = _HF_CACHE_RE.search(candidate)  # a snapshot in the Hugging Face cache
        if match:
            return f"{match.group(1)}/{match.group(2)}"
        if _is_default_model_cache(candidate):
            from ..models import DEFAULT_BASE_MODEL_ID

            return DEFAULT_BASE_MODEL_ID
        if "/" in candidate and _looks_like_hub_id(candidate):
            return candidate
    return None


def _is_default_model_cache(path: str) -> bool:
    try:
        from ..models import default_cache_dir

        return os.path.isabs(path) and os.path.realpath(path) == os.path.realpath(default_cache_dir())
    except Exception:
        return False


class _Redactor:
    """Removes local filesystem paths from text shown in the card: absolute paths become their last component."""

    def __init__(self, paths: list[str]):
        home = os.path.expanduser("~")
        known = {os.path.abspath(p) for p in paths if p}
        if home not in ("", "/", "~") and len(home) > 1:
            known.add(home)
        self.paths = sorted(known, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        stripped = text.strip()
        if stripped and "\n" not in stripped and (os.path.isabs(stripped) or stripped.startswith("~")):
            return os.path.basename(stripped.rstrip("/\\")) or "<local path>"
        text = self.literal(text)
        for pattern in _PATH_PREFIX_RES:
            text = pattern.sub("", text)
        return text

    def literal(self, text: str) -> str:
        for path in self.paths:
            text = re.sub(re.escape(path) + r"[/\\]", "", text)
            text = re.sub(re.escape(path) + r"(?![\w.-])", "<local folder>", text)
        return text

    def value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {k: self.value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.value(v) for v in value]
        return value
