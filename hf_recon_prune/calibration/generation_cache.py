"""The cache of self-generated calibration samples: what identifies a model and a tokenizer, and the JSONL files.

A cache file is ``self-calibration-<hash>.jsonl`` in the cache folder: a header line (the settings, their hash
``key`` and counters), then one ``{"input_ids": [...], "text": ...}`` line per sample. It is written to a temporary
name in the same folder and renamed, so a reader (another run sharing the folder) never sees half a file; a file
that does not match its name's settings or is damaged is ignored with a warning (and regenerated).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from typing import Any, Iterable, Optional

import torch

logger = logging.getLogger(__name__)

_FINGERPRINT_ELEMENTS = 4096
_FINGERPRINT_PARAMS = 8


def settings_key(settings: dict[str, Any]) -> str:
    """The sha256 of the settings (JSON with sorted keys): the cache file's identity."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()


def cache_file(cache_dir: str, key: str) -> str:
    return os.path.join(os.fspath(cache_dir), f"self-calibration-{key[:24]}.jsonl")


def model_fingerprint(model: Any) -> dict[str, Any]:
    """What identifies the model's outputs: its class, name, config and a strided sample of a few weight tensors."""
    config = getattr(model, "config", None)
    config_dict = config.to_dict() if hasattr(config, "to_dict") else {}
    # use_cache changes speed, not the generated tokens (the pruner switches it off while it runs).
    for volatile in ("transformers_version", "_name_or_path", "_commit_hash", "torch_dtype", "dtype", "use_cache"):
        config_dict.pop(volatile, None)
    digest = hashlib.sha256(json.dumps(config_dict, sort_keys=True, default=str).encode("utf-8"))
    parameters = [p for p in model.parameters() if p.device.type != "meta" and p.numel() > 0]
    if len(parameters) > _FINGERPRINT_PARAMS:
        step = (len(parameters) - 1) / (_FINGERPRINT_PARAMS - 1)
        parameters = [parameters[round(i * step)] for i in range(_FINGERPRINT_PARAMS)]
    with torch.no_grad():
        for parameter in parameters:
            flat = parameter.detach().reshape(-1)
            stride = max(flat.numel() // _FINGERPRINT_ELEMENTS, 1)
            sample = flat[::stride][:_FINGERPRINT_ELEMENTS].float().cpu().contiguous()
            digest.update(str(tuple(parameter.shape)).encode())
            digest.update(sample.numpy().tobytes())
    return {
        "class": type(model).__name__,
        "name_or_path": str(getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", "") or ""),
        "sha256": digest.hexdigest(),
    }


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any]:
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    digest = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8")).hexdigest()
    return {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""),
        "size": len(tokenizer),
        "vocab_sha256": digest,
    }


def sample_line(ids: torch.Tensor, text: str) -> str:
    return json.dumps({"input_ids": ids.tolist(), "text": text}, ensure_ascii=False)


def write_cache(path: str, header: dict[str, Any], input_ids: torch.Tensor, texts: list[str]) -> None:
    lines = [json.dumps({"header": header}, sort_keys=True, ensure_ascii=False)]
    lines.extend(sample_line(ids, text) for ids, text in zip(input_ids, texts))
    atomic_write_lines(path, lines)
    logger.info("self-generated calibration data written to %s", path)


def atomic_write_lines(path: str, lines: Iterable[str]) -> None:
    # A temp file in the target folder + os.replace: readers (another run sharing the cache) never see half a file.
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=directory, prefix=".tmp-", suffix=".jsonl", delete=False)
    try:
        with handle:
            for line in lines:
                handle.write(line + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
        raise


def read_cache(path: str, key: str, num_samples: int, seq_len: int
               ) -> Optional[tuple[dict[str, Any], torch.Tensor, list[str]]]:
    """(header, input_ids, texts) of a cache file, or None (with a warning when a file exists but is unusable)."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            header = json.loads(handle.readline())["header"]
            if header.get("key") != key:
                raise ValueError("its settings hash differs")
            records = [json.loads(line) for line in handle if line.strip()]
        if len(records) != num_samples:
            raise ValueError(f"it holds {len(records)} samples, not {num_samples}")
        input_ids = torch.tensor([r["input_ids"] for r in records], dtype=torch.long)
        if input_ids.shape != (num_samples, seq_len):
            raise ValueError(f"its input_ids have shape {tuple(input_ids.shape)}, not {(num_samples, seq_len)}")
        texts = [str(r["text"]) for r in records]
    except (OSError, ValueError, KeyError, TypeError) as err:
        logger.warning("ignoring the self-generation cache file %s (%s); generating again.", path, err)
        return None
    return header, input_ids, texts
