"""The calibration set of a pruning run, assembled from a PruningConfig.

Rows: ``num_samples`` real windows first, then ``num_self_samples`` self-generated ones. With
``calibration="self"`` there is no real text and all ``num_samples + num_self_samples`` rows are self-generated.

Real windows are cut from the documents joined into one stream, except for the presets whose reference code draws
each window inside one document (C4: ``windows.DOCUMENT_WINDOW_PRESETS``).

Held-out windows measure whether reconstruction overfits: ``ceil(heldout_fraction * num_samples)`` windows that neither
mask selection nor the reconstruction optimiser sees. They come from the calibration stream, placed so that they share
no token position with any calibration window (from other documents than the calibration windows', for C4); from
``heldout_source`` (its ``"heldout"`` split) when that is set; or, for ``calibration="self"``, from further
self-generated samples.

The description (the report's ``calibration``) fingerprints the token windows (``windows_sha256``,
``heldout_windows_sha256``), since a source's name does not pin its text down: the default corpus is the running
Python's ``pydoc_data`` (``source_version`` says which), and a Hub dataset can change.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..fingerprints import tensor_fingerprint
from .self_generation import SelfGenerationError, _derive_seed, generate_self_calibration
from .sources import describe_source, is_heldout_split, load_texts, source_version
from .windows import (
    DOCUMENT_WINDOW_PRESETS,
    gather_windows,
    sample_document_windows,
    sample_window_starts,
    tokenize_stream,
    window_ranges,
)

logger = logging.getLogger(__name__)

#: Huge sources (a C4 shard is ~800M characters) are cut to a seeded random subset of whole documents of about
#: this many characters per token the windows need, so tokenization takes seconds, not many minutes.
_CHARS_PER_NEEDED_TOKEN = 128
_MIN_SOURCE_CHARS = 8_000_000


@dataclass
class CalibrationSet:
    """Token windows for calibration (``input_ids``) and for measuring overfitting (``heldout_ids``)."""

    input_ids: torch.Tensor  # [N_total, L] long: real windows first, then self-generated ones
    is_self_generated: torch.Tensor  # [N_total] bool
    heldout_ids: torch.Tensor  # [H, L] long; [0, L] when there is no held-out data
    statistics_mask: torch.Tensor  # [N_total] bool: rows whose activations feed the mask statistics
    description: dict[str, Any] = field(default_factory=dict)  # JSON-able, for the report and model card

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_real(self) -> int:
        return int((~self.is_self_generated).sum())

    @property
    def num_self_generated(self) -> int:
        return int(self.is_self_generated.sum())

    def statistics_rows(self) -> torch.Tensor:
        """Row indices that feed the mask criteria (Wanda norms, SparseGPT Hessian).

        With ``self_samples_use="reconstruction"`` (the paper's setting) self-generated rows only enter the
        reconstruction loss; with ``"all"`` every row also feeds the statistics. Every row always feeds reconstruction.
        """
        return self.statistics_mask.nonzero().squeeze(1)

    def reconstruction_rows(self) -> torch.Tensor:
        return torch.arange(len(self.input_ids))


def build_calibration_set(config: Any, tokenizer: Any, model: Any = None, *, show_progress: bool = True) -> CalibrationSet:
    """Build the calibration and held-out windows a PruningConfig describes (see the module docstring).

    ``model`` is needed only when samples are self-generated (``num_self_samples > 0`` or ``calibration="self"``).
    """
    length = config.seq_len
    seed = config.seed
    num_real = config.num_samples
    num_heldout = heldout_count(config.heldout_fraction, config.num_samples)
    self_only = isinstance(config.calibration, str) and config.calibration == "self"
    split = config.calibration_split or "train"
    column = config.calibration_text_column
    description: dict[str, Any] = {
        "source": describe_source(config.calibration),
        "source_version": None if self_only else source_version(config.calibration),
        "split": None if self_only else split,
        "text_column": column,
        "seq_len": length,
        "seed": seed,
        "tokenizer": str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__),
        "statistics_rows": "all" if config.self_samples_use == "all" else "real",
    }

    real_ids = torch.empty(0, length, dtype=torch.long)
    heldout_ids: Optional[torch.Tensor] = None
    all_texts: list[str] = []
    in_documents = _windows_in_documents(config.calibration)
    if self_only:
        num_real = 0
    elif in_documents:  # the reference's rule for this preset: each window inside one document
        all_texts = load_texts(config.calibration, split, column)
        same_documents = num_heldout if config.heldout_source is None else 0
        (real_ids, document_heldout), drawn = sample_document_windows(
            all_texts, tokenizer, [num_real, same_documents], length, seed)
        description.update(source_documents=drawn)
    else:
        all_texts = load_texts(config.calibration, split, column)
        texts, used = _limit_documents(all_texts, (num_real + num_heldout) * length, seed)
        stream = tokenize_stream(texts, tokenizer)
        starts = sample_window_starts(len(stream), num_real, length, seed)
        real_ids = gather_windows(stream, starts, length)
        description.update(source_documents=used, source_tokens=len(stream))
    if num_heldout and config.heldout_source is not None:
        heldout_texts = load_texts(config.heldout_source, "heldout", column)
        if not self_only and heldout_texts == all_texts and in_documents:
            # the same documents: the held-out windows come from documents after the calibration ones in the draw
            (_, heldout_ids), _ = sample_document_windows(all_texts, tokenizer, [num_real, num_heldout], length, seed)
            description["heldout"] = _other_documents_description(config.calibration, split, num_heldout)
        elif not self_only and heldout_texts == all_texts:
            # The same text (e.g. the same list of strings, which has no held-out part): keep the windows apart.
            heldout_ids, description["heldout"] = _heldout_from_same_stream(
                config, tokenizer, stream, starts, num_heldout, split, allow_fallback=False
            )
        else:
            heldout_ids, description["heldout"] = _heldout_from_texts(
                heldout_texts, tokenizer, num_heldout, length, _derive_seed(seed, "heldout"), config.heldout_source
            )
    elif num_heldout and not self_only and in_documents:
        heldout_ids = document_heldout
        description["heldout"] = _other_documents_description(config.calibration, split, num_heldout)
    elif num_heldout and not self_only:
        heldout_ids, description["heldout"] = _heldout_from_same_stream(
            config, tokenizer, stream, starts, num_heldout, split,
            allow_fallback=not isinstance(config.calibration, list) and not is_heldout_split(split),
        )

    num_primary_self = config.num_samples if self_only else 0
    num_self_heldout = num_heldout if self_only and config.heldout_source is None else 0
    num_self = num_primary_self + config.num_self_samples
    self_ids = torch.empty(0, length, dtype=torch.long)
    if num_self + num_self_heldout:
        data = _self_generate(config, tokenizer, model, num_self + num_self_heldout, show_progress)
        self_ids = data.input_ids[:num_self]
        description["self_generation"] = _self_description(config, data)
        if num_self_heldout:
            heldout_ids = data.input_ids[num_self:]
            description["heldout"] = {
                "num": num_self_heldout, "source": "self", "split": None, "disjoint_from_calibration": True,
                "note": "further self-generated samples, none of them a calibration row",
            }
    if heldout_ids is None:
        heldout_ids = torch.empty(0, length, dtype=torch.long)
        description["heldout"] = {"num": 0}

    input_ids = torch.cat([real_ids, self_ids]).long()
    is_self = torch.cat([torch.zeros(num_real, dtype=torch.bool), torch.ones(num_self, dtype=torch.bool)])
    use_all = config.self_samples_use == "all"
    statistics_mask = torch.cat([
        torch.ones(num_real, dtype=torch.bool),
        # "self" replaces the real data: its first num_samples rows play the real rows' part.
        torch.ones(num_primary_self, dtype=torch.bool),
        torch.full((config.num_self_samples,), use_all, dtype=torch.bool),
    ])
    description.update(
        num_real=num_real, num_self_generated=num_self, num_total=len(input_ids), num_heldout=len(heldout_ids),
        num_statistics_rows=int(statistics_mask.sum()), windows_sha256=tensor_fingerprint(input_ids)[:16],
        heldout_windows_sha256=tensor_fingerprint(heldout_ids)[:16],
    )
    return CalibrationSet(input_ids, is_self, heldout_ids.long(), statistics_mask, description)


def heldout_count(fraction: float, num_samples: int) -> int:
    """``ceil(fraction * num_samples)``, immune to float noise such as 0.1 * 30 = 3.0000000000000004."""
    return math.ceil(round(fraction * num_samples, 9))


# ---------------------------------------------------------------------------------------------------------- held-out
def _heldout_from_same_stream(
    config: Any, tokenizer: Any, stream: torch.Tensor, starts: torch.Tensor, count: int, split: str, allow_fallback: bool
) -> tuple[torch.Tensor, dict[str, Any]]:
    length = config.seq_len
    heldout_seed = _derive_seed(config.seed, "heldout")
    try:
        heldout_starts = sample_window_starts(len(stream), count, length, heldout_seed, exclude=window_ranges(starts, length))
    except ValueError as err:
        if not allow_fallback:
            raise ValueError(
                f"no held-out window fits: {err} Set heldout_source to a separate text, or heldout_fraction=0."
            ) from None
        # The calibration windows cover the whole stream; the source's own held-out part is disjoint text too.
        warnings.warn(
            f"the {config.num_samples} calibration windows of {length} tokens cover the whole {split!r} split of "
            f"{describe_source(config.calibration)!r}; held-out windows are drawn from its 'heldout' split instead.",
            stacklevel=3,
        )
        texts = load_texts(config.calibration, "heldout", config.calibration_text_column)
        heldout_ids, description = _heldout_from_texts(texts, tokenizer, count, length, heldout_seed, config.calibration)
        description["note"] = "the calibration windows left no room in the calibration split"
        return heldout_ids, description
    return gather_windows(stream, heldout_starts, length), {
        "num": count, "source": describe_source(config.calibration), "split": split,
        "disjoint_from_calibration": True, "note": "same stream, no token position shared with a calibration window",
    }


def _windows_in_documents(source: Any) -> bool:
    return isinstance(source, str) and source in DOCUMENT_WINDOW_PRESETS


def _other_documents_description(source: Any, split: str, count: int) -> dict[str, Any]:
    return {"num": count, "source": describe_source(source), "split": split, "disjoint_from_calibration": True,
            "note": "one window inside each of other documents of the same split than the calibration windows"}


def _heldout_from_texts(
    texts: list[str], tokenizer: Any, count: int, length: int, seed: int, source: Any
) -> tuple[torch.Tensor, dict[str, Any]]:
    if _windows_in_documents(source):
        (windows,), _ = sample_document_windows(texts, tokenizer, [count], length, seed)
        return windows, {
            "num": count, "source": describe_source(source), "split": "heldout", "disjoint_from_calibration": None,
            "note": "one window inside each of some documents of a separate split; overlap with the calibration "
                    "text is not checked",
        }
    texts, _ = _limit_documents(texts, count * length, seed)
    stream = tokenize_stream(texts, tokenizer)
    starts = sample_window_starts(len(stream), count, length, seed)
    return gather_windows(stream, starts, length), {
        "num": count, "source": describe_source(source), "split": "heldout", "disjoint_from_calibration": None,
        "note": "a separate text; overlap with the calibration text is not checked",
    }


# ---------------------------------------------------------------------------------------------------------- helpers
def _limit_documents(texts: list[str], needed_tokens: int, seed: int) -> tuple[list[str], dict[str, int]]:
    """A seeded random subset of whole documents (kept in source order) when the source is far larger than needed."""
    budget = max(_MIN_SOURCE_CHARS, _CHARS_PER_NEEDED_TOKEN * needed_tokens)
    total = sum(map(len, texts))
    if total <= budget:
        return texts, {"documents": len(texts), "documents_used": len(texts)}
    generator = torch.Generator().manual_seed(_derive_seed(seed, "documents"))
    chosen = []
    size = 0
    for index in torch.randperm(len(texts), generator=generator).tolist():
        chosen.append(index)
        size += len(texts[index])
        if size >= budget:
            break
    chosen.sort()
    logger.info("calibration source has %d characters; using %d of %d documents (%d characters)", total, len(chosen), len(texts), size)
    return [texts[i] for i in chosen], {"documents": len(texts), "documents_used": len(chosen)}


def _self_generate(config: Any, tokenizer: Any, model: Any, count: int, show_progress: bool) -> Any:
    if model is None:
        raise ValueError(
            f"calibration={describe_source(config.calibration)!r} with num_self_samples={config.num_self_samples} needs "
            f"{count} self-generated samples, so build_calibration_set needs the model (model=...)."
        )
    try:
        return _generate(config, tokenizer, model, count, show_progress)
    except SelfGenerationError as error:  # its advice in PruningConfig's names (what cannot be set there left out)
        raise error.renamed(SELF_GENERATION_FIELDS) from None


#: The PruningConfig field that sets each argument of ``generate_self_calibration`` a failure may advise changing.
SELF_GENERATION_FIELDS = {"greedy_tokens": "self_gen_greedy_tokens", "language": "self_gen_language",
                          "stop_at_eos": "self_gen_stop_at_eos"}


def _generate(config: Any, tokenizer: Any, model: Any, count: int, show_progress: bool) -> Any:
    return generate_self_calibration(
        model, tokenizer, count, config.seq_len,
        seed=config.seed,
        greedy_tokens=config.self_gen_greedy_tokens,
        temperature=config.self_gen_temperature,
        top_k=config.self_gen_top_k,
        top_p=config.self_gen_top_p,
        language=config.self_gen_language,
        batch_size=config.self_gen_batch_size,
        max_length=config.self_gen_max_length,
        stop_at_eos=config.self_gen_stop_at_eos,
        static_cache=config.self_gen_static_cache,
        cache_dir=config.self_gen_cache_dir,
        show_progress=show_progress,
    )


def _self_description(config: Any, data: Any) -> dict[str, Any]:
    return {
        "num": len(data.input_ids),
        "seed": config.seed,
        "greedy_tokens": config.self_gen_greedy_tokens,
        "temperature": config.self_gen_temperature,
        "top_k": config.self_gen_top_k,
        "top_p": config.self_gen_top_p,
        "language": config.self_gen_language,
        "max_length": config.self_gen_max_length or config.seq_len,
        "stop_at_eos": config.self_gen_stop_at_eos,
        "batch_size": data.batch_size if data.batch_size is not None else config.self_gen_batch_size,
        "candidates_tried": data.num_candidates,
        "ended_before_seq_len": data.num_short,
        "from_cache": data.from_cache,
        "decoding": data.decoding,
    }
