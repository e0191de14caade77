"""Token windows cut out of a tokenized text stream.

The stream is the documents joined with ``"\\n\\n"`` and tokenized once, exactly what ``tokenizer(joined_text)``
returns: the special tokens the tokenizer adds by default (a Llama BOS, say) appear once at the start (and end) of the
stream, never inside it, so windows are contiguous slices of one token sequence. Calibration windows start at seeded
random offsets (they may overlap each other, as in the reference code); held-out windows can be drawn so that they
overlap none of them. C4's calibration windows are drawn inside single documents instead, as its reference code does
(`DOCUMENT_WINDOW_PRESETS`, `sample_document_windows`). Perplexity windows (`stream_windows_for_eval`) are
consecutive windows of the stream the reference SparseGPT/Wanda perplexity code evaluates, which for the ptb and c4
presets is joined otherwise (`EVAL_PROTOCOLS`).

Very long sources (over `_CHUNK_CHARS` characters) are tokenized in chunks of whole documents so that the Rust
tokenizer can work on several chunks in parallel and no single multi-hundred-megabyte string is encoded (a longer
document, such as a whole .txt file, is cut at paragraph breaks); the only difference to a single pass is at the seams
between chunks, which sit on document or paragraph boundaries.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

import torch

logger = logging.getLogger(__name__)

SEPARATOR = "\n\n"
_CHUNK_CHARS = 4_000_000
_CHUNKS_PER_CALL = 16
_PROBE_TEXT = "calibration"

Range = tuple[int, int]
Exclude = Optional[Union[Iterable[Range], torch.Tensor]]


class WindowOverlapWarning(UserWarning):
    """More window tokens were requested than the source has: windows will share many tokens."""


@dataclass(frozen=True)
class EvalProtocol:
    """How a perplexity stream is built: the documents joined with ``separator``, only the first ``max_documents``
    of them, only the first ``max_windows`` windows (None: all)."""

    separator: str = SEPARATOR
    max_documents: Optional[int] = None
    max_windows: Optional[int] = None


#: The perplexity stream of each preset as SparseGPT's datautils.py (which Wanda's copies) builds it: wikitext2's
#: test rows joined with "\n\n", PTB's test sentences with " ", and the first 1100 documents of C4's validation shard
#: with " ", of which the first 256 * seq_len tokens count. Calibration joins every source with "\n\n".
EVAL_PROTOCOLS = {
    "wikitext2": EvalProtocol(),
    "ptb": EvalProtocol(separator=" "),
    "c4": EvalProtocol(separator=" ", max_documents=1100, max_windows=256),
}


#: Presets whose calibration windows are drawn as the reference code draws them (SparseGPT's datautils.py, which
#: Wanda's copies, for C4): each window lies inside one document of more than ``seq_len`` tokens, tokenized on its own
#: (with the special tokens the tokenizer adds by default), at a random offset. Every other source: windows of the
#: documents' joined stream (`tokenize_stream`).
DOCUMENT_WINDOW_PRESETS = frozenset({"c4"})
#: Documents tokenized per call while looking for long enough ones.
_DOCUMENTS_PER_CALL = 64


class Documents(list):
    """The documents of a preset (``load_texts`` returns them so): a list that knows its preset, so that
    `stream_windows_for_eval` follows the preset's `EVAL_PROTOCOLS` entry. A list made from it (a slice, a filter)
    is a plain list again, evaluated with the ``"\\n\\n"`` join."""

    def __init__(self, texts: Iterable[str], preset: str) -> None:
        super().__init__(texts)
        self.preset = preset


# ---------------------------------------------------------------------------------------------------------- stream
def tokenize_stream(texts: Sequence[str], tokenizer: Any, separator: str = SEPARATOR) -> torch.Tensor:
    """The documents joined with ``separator`` and tokenized: a 1-D LongTensor, see the module docstring."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of documents, not a single string; wrap it as [text].")
    texts = list(texts)
    if not texts or not any(t.strip() for t in texts):
        raise ValueError(f"the calibration text is empty ({len(texts)} documents, no non-whitespace characters); it needs text to tokenize.")
    prefix, suffix = _default_special_tokens(tokenizer)
    pieces = [torch.tensor(prefix, dtype=torch.long)]
    chunks = _chunk_documents(texts, separator)
    for start in range(0, len(chunks), _CHUNKS_PER_CALL):
        group = chunks[start:start + _CHUNKS_PER_CALL]
        encoded = tokenizer(group, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
        pieces.extend(torch.tensor(ids, dtype=torch.long) for ids in encoded)
    pieces.append(torch.tensor(suffix, dtype=torch.long))
    return torch.cat(pieces)


def _chunk_documents(texts: list[str], separator: str = SEPARATOR) -> list[str]:
    """Join documents into chunks of about `_CHUNK_CHARS` characters whose concatenation is the joined text. A longer
    document (a whole .txt file is one) is cut into pieces of it at paragraph breaks, else at line breaks, else at
    spaces: it is not encoded as one string."""
    chunks: list[str] = []
    current: list[str] = []
    size = 0
    for text in texts:
        if current and size + len(text) > _CHUNK_CHARS:
            chunks.append(separator.join(current) + separator)
            current, size = [], 0
        if len(text) > _CHUNK_CHARS:
            *whole, text = _pieces(text)
            chunks.extend(whole)
        current.append(text)
        size += len(text) + len(separator)
    chunks.append(separator.join(current))
    return chunks


def _pieces(text: str) -> list[str]:
    """``text`` cut after a paragraph break (else a line break, else a space) near every `_CHUNK_CHARS` characters;
    the pieces concatenate to ``text``. A stretch with none of these stays whole."""
    pieces, start = [], 0
    while len(text) - start > _CHUNK_CHARS:
        end = start + _CHUNK_CHARS
        cut = next((found + len(mark) for mark in ("\n\n", "\n", " ")
                    if (found := text.rfind(mark, start + _CHUNK_CHARS // 2, end)) >= 0), None)
        if cut is None:
            cut = next((found + len(mark) for mark in ("\n\n", "\n", " ") if (found := text.find(mark, end)) >= 0),
                       len(text))
        pieces.append(text[start:cut])
        start = cut
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _default_special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids ``tokenizer(text)`` puts before and after the text's own tokens (BOS / EOS when it adds them)."""
    with_special = list(tokenizer(_PROBE_TEXT, verbose=False)["input_ids"])
    plain = list(tokenizer(_PROBE_TEXT, add_special_tokens=False, verbose=False)["input_ids"])
    for offset in range(len(with_special) - len(plain) + 1):
        if with_special[offset:offset + len(plain)] == plain:
            return with_special[:offset], with_special[offset + len(plain):]
    logger.debug("tokenizer adds special tokens inside the text; the stream gets none")
    return [], []


# ---------------------------------------------------------------------------------------------------------- sampling
def sample_window_starts(
    num_tokens: int,
    num_samples: int,
    seq_len: int,
    seed: Union[int, torch.Generator],
    *,
    exclude: Exclude = None,
) -> torch.Tensor:
    """Seeded random start offsets of ``num_samples`` windows of ``seq_len`` tokens in a stream of ``num_tokens``.

    ``exclude`` is a list of half-open token ranges ``(start, end)`` (or a ``[K, 2]`` tensor) that no window may
    overlap; pass the calibration windows' ranges (`window_ranges`) to draw held-out windows disjoint from them.
    Windows may overlap each other. ``seed`` may be a ``torch.Generator`` to continue a stream of draws; the global
    RNG is never used.
    """
    _check_counts(num_samples, seq_len, allow_zero_samples=True)
    if num_tokens < seq_len:
        raise ValueError(
            f"the calibration source has {num_tokens} tokens after tokenization, but seq_len={seq_len} needs at least "
            f"{seq_len} tokens for one window; use a longer source or a smaller seq_len."
        )
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    num_starts = num_tokens - seq_len + 1
    ranges = _as_ranges(exclude)
    if not ranges:
        free_tokens = num_tokens
        starts = torch.randint(0, num_starts, (num_samples,), generator=generator)
    else:
        allowed = torch.ones(num_starts, dtype=torch.bool)
        for begin, end in ranges:
            # A window [s, s + seq_len) overlaps [begin, end) iff begin - seq_len < s < end.
            allowed[max(begin - seq_len + 1, 0):max(min(end, num_starts), 0)] = False
        valid = allowed.nonzero().squeeze(1)
        if len(valid) == 0 and num_samples > 0:
            covered = _covered_tokens(ranges, num_tokens)
            raise ValueError(
                f"no window of seq_len={seq_len} tokens fits outside the excluded ranges: they cover {covered} of the "
                f"source's {num_tokens} tokens and leave no gap of {seq_len} tokens. Use fewer or shorter windows, "
                "a longer source, or a separate held-out source."
            )
        free_tokens = num_tokens - _covered_tokens(ranges, num_tokens)
        starts = valid[torch.randint(0, max(len(valid), 1), (num_samples,), generator=generator)]
    if num_samples * seq_len > free_tokens:
        warnings.warn(
            f"{num_samples} windows of {seq_len} tokens ({num_samples * seq_len} tokens) were drawn from "
            f"{free_tokens} available tokens, so windows overlap heavily and calibration sees repeated text; "
            "use a larger source, fewer samples or a shorter seq_len.",
            WindowOverlapWarning,
            stacklevel=3,
        )
    return starts


def sample_document_windows(
    texts: Sequence[str], tokenizer: Any, counts: Sequence[int], seq_len: int, seed: int
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Windows inside single documents, as the reference code draws C4's calibration windows (see
    `DOCUMENT_WINDOW_PRESETS`): one group ``[count, seq_len]`` per entry of ``counts`` (calibration, then held-out).

    Documents are visited in a seeded random order and tokenized each on its own (``tokenizer(text)``); each with more
    than ``seq_len`` tokens gives one window at a seeded random offset in ``[0, len - seq_len)``, as in the reference.
    Unlike the reference, which draws documents with replacement, no document gives two windows, so the groups share
    no document (the held-out windows are text the calibration never saw). Returns the groups and a description of
    the draw; ValueError when too few documents are long enough.
    """
    needed = sum(counts)
    _check_counts(needed, seq_len, allow_zero_samples=False)
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(len(texts), generator=generator).tolist()
    windows: list[torch.Tensor] = []
    tokenized = 0
    for first in range(0, len(order), _DOCUMENTS_PER_CALL):
        batch = [texts[i] for i in order[first:first + _DOCUMENTS_PER_CALL]]
        encoded = tokenizer(batch, return_attention_mask=False, verbose=False)["input_ids"]
        for ids in encoded:
            tokenized += 1
            if len(ids) > seq_len:
                start = int(torch.randint(0, len(ids) - seq_len, (1,), generator=generator))
                windows.append(torch.tensor(ids[start:start + seq_len], dtype=torch.long))
                if len(windows) == needed:
                    break
        if len(windows) == needed:
            break
    if len(windows) < needed:
        raise ValueError(
            f"{needed} windows of seq_len={seq_len} tokens need {needed} documents of more than {seq_len} tokens "
            f"(each window lies inside one document, as in the reference code for this source), but only "
            f"{len(windows)} of its {len(texts)} documents are that long; use a smaller seq_len or fewer samples."
        )
    groups, offset = [], 0
    for count in counts:
        groups.append(torch.stack(windows[offset:offset + count]) if count else torch.empty(0, seq_len, dtype=torch.long))
        offset += count
    return groups, {"windows": "one per document, inside it", "documents": len(texts),
                    "documents_tokenized": tokenized}


def window_ranges(starts: torch.Tensor, seq_len: int) -> list[Range]:
    """The half-open token ranges ``(start, start + seq_len)`` covered by windows, for `exclude`."""
    return [(int(s), int(s) + seq_len) for s in starts.tolist()]


def gather_windows(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Rows ``stream[s:s + seq_len]`` for every start: a LongTensor ``[len(starts), seq_len]``."""
    if len(starts) == 0:
        return torch.empty(0, seq_len, dtype=torch.long)
    offsets = starts.view(-1, 1) + torch.arange(seq_len).view(1, -1)
    return stream[offsets].long()


def tokenize_windows(
    texts: Sequence[str],
    tokenizer: Any,
    num_samples: int,
    seq_len: int,
    seed: int,
    *,
    exclude: Exclude = None,
    return_starts: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``num_samples`` seeded random windows of exactly ``seq_len`` tokens: a LongTensor ``[num_samples, seq_len]``.

    The stream is `tokenize_stream(texts, tokenizer)`; see `sample_window_starts` for ``exclude`` (ranges of this same
    stream). With ``return_starts=True`` the windows' start offsets in the stream are returned too.
    """
    _check_counts(num_samples, seq_len, allow_zero_samples=False)
    stream = tokenize_stream(texts, tokenizer)
    starts = sample_window_starts(len(stream), num_samples, seq_len, seed, exclude=exclude)
    windows = gather_windows(stream, starts, seq_len)
    return (windows, starts) if return_starts else windows


def stream_windows_for_eval(
    texts: Sequence[str], tokenizer: Any, seq_len: int, max_windows: Optional[int] = None
) -> torch.Tensor:
    """Consecutive non-overlapping windows ``[W, seq_len]`` covering the stream, the incomplete tail dropped.

    This is the perplexity protocol of the pruning literature's reference code: the documents joined with
    ``"\\n\\n"``, or for a preset's `Documents` (``load_texts("ptb", "test")``, say) as its `EVAL_PROTOCOLS` entry
    says. ``max_windows`` keeps only the first windows.
    """
    _check_counts(1, seq_len, allow_zero_samples=False)
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows <= 0):
        raise ValueError(f"max_windows={max_windows!r} is not allowed; allowed: None (all windows) or an integer > 0.")
    protocol = EVAL_PROTOCOLS.get(getattr(texts, "preset", None), EvalProtocol())
    if protocol.max_documents is not None:
        texts = texts[: protocol.max_documents]
    if protocol.max_windows is not None:
        max_windows = min(max_windows or protocol.max_windows, protocol.max_windows)
    stream = tokenize_stream(texts, tokenizer, protocol.separator)
    count = len(stream) // seq_len
    if count == 0:
        raise ValueError(
            f"the evaluation text has {len(stream)} tokens after tokenization, but seq_len={seq_len} needs at least "
            f"{seq_len} tokens for one window; use a longer text or a smaller seq_len."
        )
    if max_windows is not None:
        count = min(count, max_windows)
    return stream[: count * seq_len].view(count, seq_len).clone()


# ---------------------------------------------------------------------------------------------------------- helpers
def _check_counts(num_samples: int, seq_len: int, allow_zero_samples: bool) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len={seq_len!r} is not allowed; allowed: an integer > 0.")
    lowest = 0 if allow_zero_samples else 1
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < lowest:
        raise ValueError(f"num_samples={num_samples!r} is not allowed; allowed: an integer >= {lowest}.")


def _as_ranges(exclude: Exclude) -> list[Range]:
    if exclude is None:
        return []
    if isinstance(exclude, torch.Tensor):
        if exclude.numel() == 0:
            return []
        if exclude.dim() != 2 or exclude.shape[1] != 2:
            raise ValueError(f"exclude has shape {tuple(exclude.shape)}; allowed: [K, 2] (start, end) token ranges.")
        exclude = exclude.tolist()
    ranges = []
    for item in exclude:
        try:
            begin, end = (int(v) for v in item)
        except (TypeError, ValueError):
            raise ValueError(f"exclude item {item!r} is not allowed; allowed: (start, end) token ranges with start < end.") from None
        if begin >= end:
            raise ValueError(f"exclude item {item!r} is not allowed; allowed: (start, end) token ranges with start < end.")
        ranges.append((begin, end))
    return ranges


def _covered_tokens(ranges: list[Range], num_tokens: int) -> int:
    covered = 0
    position = 0
    for begin, end in sorted(ranges):
        begin, end = max(begin, position, 0), min(end, num_tokens)
        if end > begin:
            covered += end - begin
            position = end
    return covered
