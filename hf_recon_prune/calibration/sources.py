"""Where calibration text comes from: an offline default corpus, the reference benchmark datasets, any Hugging Face
dataset, local files, or a list of strings.

Every source is returned as a list of documents (strings). Calibration (`windows.tokenize_windows`) joins them with
``"\\n\\n"``; perplexity (`windows.stream_windows_for_eval`) joins a preset's documents, which carry its name
(`windows.Documents`), as the SparseGPT/Wanda reference code does for that dataset (`windows.EVAL_PROTOCOLS`).

Split names. ``"train"`` is the calibration split. ``"test"``, ``"validation"`` and ``"heldout"`` name the part that
calibration does not see; for sources without real splits (the default corpus, local files, folders whose files all
fall in one split) all three are the same deterministic, disjoint remainder: the last tenth of a ``.txt`` file, every
tenth record of other files, one topic in eight of the default corpus less the paragraphs it repeats from the train
topics. Folders with several splits (``train.jsonl`` and ``test.jsonl``, or a saved ``DatasetDict``) and Hugging Face
datasets are read by split name (for the Hub, any split ``load_dataset`` accepts, such as ``"train[:10%]"``), with
``"heldout"`` taking ``"validation"``, else ``"test"``, so that measuring overfitting never touches a test set that is
not needed for it.

Nothing named by a source string is imported or evaluated: strings are matched against the preset names, then against
existing paths, and anything else is handed to ``datasets.load_dataset`` as a dataset id, always with
``trust_remote_code=False``: datasets 3.x would otherwise run a dataset's loading script when the environment sets
``HF_DATASETS_TRUST_REMOTE_CODE=1`` (datasets 4 runs no scripts at all).

The marker a saved model's config carries in place of calibration texts (``hf_recon_prune.sanitise``) is refused
with a ValueError that says so: the texts were never saved.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import platform
import re
from typing import Any, Optional, Sequence, Union

from ..sanitise import parse_texts_marker
from .windows import Documents

logger = logging.getLogger(__name__)

Source = Union[str, "os.PathLike[str]", Sequence[str]]

#: Preset names; they take precedence over a local file or folder of the same name.
PRESETS = ("default", "docstrings", "wikitext2", "ptb", "c4")
#: Split names understood by the sources that have no splits of their own (default corpus, local files).
LOCAL_SPLITS = ("train", "test", "validation", "heldout")
_HELDOUT_SPLITS = ("test", "validation", "heldout")

#: Files of one JSON object per line that are read here, so that errors can name the line.
_JSONL_SUFFIXES = (".jsonl", ".ndjson")
#: Other single files handed to a `datasets` builder; they have no splits, so rows are split like JSONL lines.
_BUILDER_SUFFIXES = {".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
#: Text files of a data folder that `datasets` decodes as UTF-8: where a decoding error is looked for.
_TEXT_DATA_SUFFIXES = (".txt", ".csv", ".tsv", ".json", ".jsonl", ".ndjson")
#: One row in every `_ROW_SPLIT_MODULUS` (the last of each group) belongs to the held-out part of a split-less file.
_ROW_SPLIT_MODULUS = 10
#: Topics of the default corpus: one in every `_TOPIC_SPLIT_MODULUS` (sorted by name) is held out.
_TOPIC_SPLIT_MODULUS = 8
#: Fraction of a .txt file's characters used for the "train" split.
_TXT_TRAIN_FRACTION = 0.9
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")

_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}


class SourceLoadError(RuntimeError):
    """A dataset could not be loaded (no network, a Hub id that does not exist, a local file `datasets` cannot read)."""


# ---------------------------------------------------------------------------------------------------------- public
def load_texts(source: Source, split: Optional[str] = "train", text_column: Optional[str] = None) -> list[str]:
    """Return the documents of a calibration source as a list of strings (for a preset, a `windows.Documents`: a
    list that names the preset, so that `stream_windows_for_eval` builds its reference perplexity stream).

    Args:
        source: ``"default"`` (the Python reference documentation shipped with CPython, offline), ``"docstrings"``
            (the standard library's module docstrings, offline: another source, see ``stdlib_docstrings``), ``"wikitext2"``,
            ``"ptb"``, ``"c4"`` (the reference repositories' datasets and files), any other Hugging Face dataset id,
            a local path (``.txt``, ``.jsonl``, ``.json``/``.csv``/``.parquet``, a folder written by
            ``Dataset.save_to_disk``, or a folder of data files), or a list of strings.
        split: ``"train"`` (default; ``None`` means the same), ``"test"``, ``"validation"`` or ``"heldout"`` (see the
            module docstring); for Hugging Face datasets any split expression ``load_dataset`` accepts.
        text_column: the column / JSON key holding the text; default ``"text"`` (``"sentence"`` for ``"ptb"``).

    A list of strings is returned as a new list whatever the split: a caller that needs held-out text disjoint from the
    calibration text must pass a separate list (``build_calibration_set`` instead draws held-out windows that do not
    overlap the calibration windows when both come from the same list).
    """
    split = "train" if split is None else split
    if not isinstance(split, str) or not split:
        raise ValueError(f"split={split!r} is not allowed; allowed: a split name such as {', '.join(map(repr, LOCAL_SPLITS))}.")
    if isinstance(source, (list, tuple)):
        return _texts_from_list(source)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str):
        raise TypeError(
            f"calibration source {source!r} has type {type(source).__name__}; expected a preset name "
            f"({', '.join(PRESETS)}), a dataset id, a local path or a list of strings."
        )
    if not source.strip():
        raise ValueError("calibration source '' is empty; use 'default', a dataset id, a local path or a list of strings.")
    marker = parse_texts_marker(source)
    if marker is not None:
        raise ValueError(
            f"calibration source {source[:40]}...> is the marker a saved model's config carries in place of the "
            f"{marker[0]} texts it was calibrated with (they are never saved); pass the texts themselves (a list of "
            "strings), a dataset name or a file."
        )
    if source == "self":
        raise ValueError(
            "calibration source 'self' is not a text source: self-generated samples come from the model; use "
            "hf_recon_prune.calibration.generate_self_calibration or build_calibration_set."
        )
    if source == "default":
        return _default_corpus(split)
    if source == "docstrings":
        heldout = _split_part(split, "the 'docstrings' corpus")
        texts = stdlib_docstrings()
        return [t for i, t in enumerate(texts) if (i % _TOPIC_SPLIT_MODULUS == _TOPIC_SPLIT_MODULUS - 1) == heldout]
    if source in PRESETS:
        return Documents(_load_preset(source, split, text_column), preset=source)
    path = os.path.expanduser(source)
    if os.path.exists(path):
        return _load_local(path, split, text_column)
    if _looks_like_path(source):
        raise FileNotFoundError(
            f"calibration source {source!r} looks like a local path but does not exist (working directory: "
            f"{os.getcwd()!r}); give an existing .txt/.jsonl/.json/.csv/.parquet file or dataset folder."
        )
    return _load_hub_dataset(source, split, text_column)


def describe_source(source: Source) -> Any:
    """A JSON-able description of a source for the model card; lists of texts are summarised by count and hash."""
    if isinstance(source, (list, tuple)):
        digest = hashlib.sha256("\x00".join(map(str, source)).encode("utf-8")).hexdigest()
        return {"texts": len(source), "sha256": digest[:16]}
    return os.fspath(source) if isinstance(source, os.PathLike) else source


def source_version(source: Source) -> Optional[str]:
    """What a source's name does not pin down, for the report: the ``default`` corpus is the running Python's own
    ``pydoc_data``, which changes between Python releases (None for every other source)."""
    if isinstance(source, str) and source == "default":
        return f"pydoc_data of Python {platform.python_version()}"
    return None


def is_heldout_split(split: Optional[str]) -> bool:
    return split in _HELDOUT_SPLITS


# ---------------------------------------------------------------------------------------------------------- sources
def _texts_from_list(source: Sequence[Any]) -> list[str]:
    if not source:
        raise ValueError("calibration source is an empty list; give at least one non-empty string.")
    for index, text in enumerate(source):
        if not isinstance(text, str):
            raise TypeError(f"calibration source list item {index} has type {type(text).__name__}; expected str.")
    return list(source)


def _split_part(split: str, source_desc: str) -> bool:
    """True for the held-out part, False for train; anything else is an error naming the allowed splits."""
    if split == "train":
        return False
    if split in _HELDOUT_SPLITS:
        return True
    raise ValueError(
        f"split={split!r} is not available for {source_desc}; allowed: {', '.join(map(repr, LOCAL_SPLITS))} "
        "('test', 'validation' and 'heldout' are the same held-out part)."
    )


def _default_corpus(split: str) -> list[str]:
    """The pydoc topics sorted by name, one in every `_TOPIC_SPLIT_MODULUS` held out. A held-out topic loses every
    paragraph (between blank lines, compared stripped) that is also a train paragraph, and is dropped if nothing is
    left, so that no held-out text is a copy of calibration text; the train topics are returned unchanged."""
    # The pydoc topics are real English prose (the Python Language Reference) written by the CPython documentation
    # team, present wherever the stdlib is, so the default works offline and is not text we wrote ourselves.
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # some distributions strip pydoc_data
        raise SourceLoadError(
            "the 'default' calibration corpus needs the stdlib module pydoc_data.topics, which this Python lacks; "
            "use a local .txt/.jsonl file or a Hugging Face dataset instead."
        ) from err
    heldout = _split_part(split, "the 'default' corpus")
    keys = sorted(topics)
    is_held = [i % _TOPIC_SPLIT_MODULUS == _TOPIC_SPLIT_MODULUS - 1 for i in range(len(keys))]
    train = [topics[k] for k, held in zip(keys, is_held) if not held]
    if not heldout:
        return train
    # Some topics are subsections repeated in others (augassign in assignment, exceptions in execmodel, id-classes in
    # identifiers). Only the held-out side is filtered: recorded results depend on the calibration windows.
    seen = {paragraph.strip() for text in train for paragraph in text.split("\n\n")}
    texts = []
    for key in (k for k, held in zip(keys, is_held) if held):
        text = "\n\n".join(p for p in topics[key].split("\n\n") if p.strip() not in seen)
        if text.strip():
            texts.append(text)
    return texts


def stdlib_docstrings(min_chars: int = 200) -> list[str]:
    """The module docstrings of this Python's standard library (at least ``min_chars`` long), sorted by path: a
    second offline corpus, by other authors and on other topics than the ``default`` documentation topics, so
    that quality can be judged on text of another source than the calibration text without a download."""
    import ast
    import glob
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    texts = []
    for path in sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "*", "__init__.py"))):
        try:
            with open(path, encoding="utf-8") as handle:
                doc = ast.get_docstring(ast.parse(handle.read()))
        except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
            continue
        if doc and len(doc) >= min_chars:
            texts.append(doc)
    return texts


def _load_preset(name: str, split: str, text_column: Optional[str]) -> list[str]:
    if name == "wikitext2":
        dataset_split = _preset_split(name, split, ("train", "validation", "test"))
        desc = f"wikitext (wikitext-2-raw-v1), split {dataset_split!r}"
        dataset = _call_load_dataset(desc, "wikitext", "wikitext-2-raw-v1", split=dataset_split)
        # Empty rows are kept (here and for every dataset): the reference perplexity protocol joins all rows.
        return _column_texts(dataset, text_column or "text", desc)
    if name == "ptb":
        dataset_split = _preset_split(name, split, ("train", "validation", "test"))
        desc = f"ptb_text_only (penn_treebank), split {dataset_split!r}"
        dataset = _call_load_dataset(desc, "ptb_text_only", "penn_treebank", split=dataset_split)
        return _column_texts(dataset, text_column or "sentence", desc)
    # c4: the one shard per split the SparseGPT / Wanda code reads; downloading only the split's own file avoids
    # fetching the 300 MB train shard when only validation text is wanted. C4 has no test split.
    dataset_split = _preset_split(name, "validation" if split == "test" else split, ("train", "validation"))
    desc = f"allenai/c4 ({_C4_FILES[dataset_split]})"
    dataset = _call_load_dataset(
        desc, "allenai/c4", data_files={dataset_split: _C4_FILES[dataset_split]}, split=dataset_split
    )
    return _column_texts(dataset, text_column or "text", desc)


def _preset_split(name: str, split: str, available: tuple[str, ...]) -> str:
    if split == "heldout":
        return "validation"
    if split not in available:
        raise ValueError(f"split={split!r} is not available for {name!r}; allowed: {', '.join(map(repr, available + ('heldout',)))}.")
    return split


def _load_hub_dataset(dataset_id: str, split: str, text_column: Optional[str]) -> list[str]:
    candidates = ["validation", "test"] if split == "heldout" else [split]
    last_error: Optional[Exception] = None
    for dataset_split in candidates:
        desc = f"dataset {dataset_id!r}, split {dataset_split!r}"
        try:
            dataset = _call_load_dataset(desc, dataset_id, split=dataset_split, _unknown_split_ok=len(candidates) > 1)
        except _UnknownSplit as err:
            last_error = err
            continue
        return _column_texts(dataset, text_column or "text", desc)
    raise ValueError(f"dataset {dataset_id!r} has neither a 'validation' nor a 'test' split for split='heldout': {last_error}")


class _UnknownSplit(Exception):
    pass


def _call_load_dataset(desc: str, *args: Any, _unknown_split_ok: bool = False, _local: Optional[str] = None,
                       **kwargs: Any) -> Any:
    import datasets

    try:
        # Explicit, so that HF_DATASETS_TRUST_REMOTE_CODE=1 cannot make datasets 3.x run a loading script.
        return datasets.load_dataset(*args, trust_remote_code=False, **kwargs)
    except Exception as err:  # network, missing repo, missing file, corrupt cache: all mean "this source is unusable"
        if _unknown_split_ok and isinstance(err, ValueError) and "split" in str(err).lower():
            raise _UnknownSplit(str(err)) from err
        # A local file or folder (_local) has a problem of its own: no network was involved.
        raise (_load_error(desc, err) if _local is None else _local_load_error(desc, _local, err)) from err


def _load_error(desc: str, err: Exception) -> SourceLoadError:
    return SourceLoadError(
        f"could not load the calibration source {desc}: {type(err).__name__}: {err}. Loading a Hub dataset needs network "
        "access (or a filled Hugging Face datasets cache). Offline, use calibration='default' (the Python reference "
        "documentation, always available) or a local .txt/.jsonl file."
    )


# ---------------------------------------------------------------------------------------------------------- local files
def _looks_like_path(source: str) -> bool:
    # A Hub id is "name" or "owner/name"; anything else (more slashes, a leading "./", a data-file suffix) is a path.
    suffix = os.path.splitext(source)[1].lower()
    return _HUB_ID_RE.match(source) is None or suffix in (".txt", *_JSONL_SUFFIXES, *_BUILDER_SUFFIXES)


def _load_local(path: str, split: str, text_column: Optional[str]) -> list[str]:
    if os.path.isdir(path):
        return _load_local_dir(path, split, text_column)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".txt":
        return _load_txt(path, split)
    if suffix in _JSONL_SUFFIXES:
        return _load_jsonl(path, split, text_column or "text")
    if suffix in _BUILDER_SUFFIXES:
        heldout = _split_part(split, f"file {path!r}")
        if os.path.getsize(path) == 0:
            raise ValueError(f"calibration file {path!r} is empty; it needs at least one record with text.")
        desc = f"file {path!r}"
        dataset = _call_load_dataset(desc, _BUILDER_SUFFIXES[suffix], data_files=path, split="train", _local=path)
        texts = _column_texts(dataset, text_column or "text", desc, local=path)
        return _rows_of_part(texts, heldout, path, split)
    raise ValueError(
        f"calibration file {path!r} has suffix {suffix or '(none)'!r}; allowed: .txt, "
        f"{', '.join(_JSONL_SUFFIXES + tuple(_BUILDER_SUFFIXES))}, or a dataset folder."
    )


def _load_local_dir(path: str, split: str, text_column: Optional[str]) -> list[str]:
    import datasets

    desc = f"folder {path!r}"
    column = text_column or "text"
    if any(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json")):
        try:
            loaded = datasets.load_from_disk(path)
        except Exception as err:
            raise _local_load_error(desc, path, err) from err
    else:  # data files: datasets infers the builder and the splits from their names (and prepares every split anyway)
        loaded = _call_load_dataset(desc, path, _local=path)
    if isinstance(loaded, datasets.DatasetDict) and len(loaded) > 1:
        # Splits of its own: the one asked for; "heldout" takes validation, else test (as for Hub datasets).
        wanted = next((s for s in (("validation", "test") if split == "heldout" else (split,)) if s in loaded), None)
        if wanted is None:
            raise ValueError(f"split={split!r} is not available in {desc}; available splits: {list(loaded)} "
                             "('heldout' takes 'validation', else 'test').")
        return _column_texts(loaded[wanted], column, f"{desc}, split {wanted!r}", local=path)
    if isinstance(loaded, datasets.DatasetDict):
        loaded = next(iter(loaded.values()))
    # No splits of its own (a saved Dataset, or files that all fall in one split): hold out rows like a JSONL file.
    heldout = _split_part(split, desc)
    return _rows_of_part(_column_texts(loaded, column, desc, local=path), heldout, path, split)


def _local_load_error(desc: str, path: str, err: BaseException) -> SourceLoadError:
    """The real problem of a local file or folder `datasets` failed on (nothing was fetched: no network advice)."""
    chain = [err]
    while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    names = {type(e).__name__ for e in chain}
    if "EmptyDataError" in names or any("corresponds to no data" in str(e) for e in chain):
        problem = "no rows (empty, or a header only)"
    elif "DataFilesNotFoundError" in names and os.path.isdir(path):
        problem = f"no data files (.csv, .json, .jsonl, .parquet, ...), only {sorted(os.listdir(path))[:9]}"
    else:
        # pandas raises UnicodeDecodeError; pyarrow's readers say "invalid UTF8" in their own words.
        utf8 = "UnicodeDecodeError" in names or "utf8" in " ".join(map(str, chain)).lower().replace("-", "")
        cause = chain[-1]
        problem = (_utf8_problem(path) if utf8 else None) or f"could not be read ({type(cause).__name__}: {cause})"
    return SourceLoadError(f"calibration {desc}: {problem}.")


def _utf8_problem(path: str) -> Optional[str]:
    """Which file (of a folder) is not UTF-8, and the offset of its first byte that is not (None: all are UTF-8)."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(root, name) for root, _, names in os.walk(path) for name in names
        if os.path.splitext(name)[1].lower() in _TEXT_DATA_SUFFIXES
    )
    for file in files:
        decoder, offset = codecs.getincrementaldecoder("utf-8")(), 0
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                pending = len(decoder.getstate()[0])  # the start of a character the previous block cut
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as err:
                    where = "" if file == path else f"its file {os.path.relpath(file, path)!r} is "
                    byte = offset - pending + err.start
                    return f"{where}not UTF-8 text (byte {byte}: {err.reason}); save it as UTF-8"
                offset += len(block)
    return None


def _read_text_file(path: str) -> str:
    try:
        # utf-8-sig: a byte-order mark (Notepad, Excel and PowerShell write one) is not text.
        with open(path, encoding="utf-8-sig") as handle:
            text = handle.read()
    except UnicodeDecodeError as err:
        raise ValueError(f"calibration file {path!r}: {_utf8_problem(path) or f'not UTF-8 text ({err})'}.") from None
    if not text.strip():
        raise ValueError(f"calibration file {path!r} is empty (no non-whitespace text); it needs text to calibrate on.")
    return text


def _load_txt(path: str, split: str) -> list[str]:
    heldout = _split_part(split, f"file {path!r}")
    text = _read_text_file(path)
    cut = _txt_cut(text)
    part = text[cut:] if heldout else text[:cut]
    if not part.strip():
        raise ValueError(
            f"the {split!r} part of {path!r} is empty: a .txt file is split at the line boundary nearest to "
            f"{_TXT_TRAIN_FRACTION:.0%} of its characters, and this file has too little text after it."
        )
    return [part]


def _txt_cut(text: str) -> int:
    """Index after the newline nearest to 90% of the characters (a plain character cut when no newline is inside)."""
    target = int(len(text) * _TXT_TRAIN_FRACTION)
    after = text.find("\n", target)
    before = text.rfind("\n", 0, target)
    options = [i + 1 for i in (before, after) if 0 <= i < len(text) - 1]
    if not options:
        return target
    return min(options, key=lambda i: abs(i - target))


def _load_jsonl(path: str, split: str, column: str) -> list[str]:
    heldout = _split_part(split, f"file {path!r}")
    content = _read_text_file(path)
    texts = []
    # Only "\n" ends a record ("\r\n" arrives as "\n": the file is read in universal-newline mode). JSON strings may
    # hold U+2028, U+2029 and U+0085 raw (sample_line writes them so), and str.splitlines would split inside them.
    for line_number, line in enumerate(content.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_number} is not valid JSON ({err.msg}); a .jsonl file holds one JSON object per line.") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_number} holds a {type(record).__name__}; a .jsonl file holds one JSON object per line.")
        if column not in record:
            raise ValueError(
                f"{path}:{line_number} has no key {column!r}; available keys: {sorted(record)}. "
                "Set calibration_text_column (text_column=...) to one of them."
            )
        value = record[column]
        if value is None:
            continue  # as for every other format (_column_texts): a missing value carries no text
        if not isinstance(value, str):
            raise ValueError(f"{path}:{line_number}: {column!r} is a {type(value).__name__}, expected a string.")
        texts.append(value)
    return _rows_of_part(texts, heldout, path, split)


def _rows_of_part(texts: list[str], heldout: bool, path: str, split: str) -> list[str]:
    last = _ROW_SPLIT_MODULUS - 1
    part = [t for i, t in enumerate(texts) if (i % _ROW_SPLIT_MODULUS == last) == heldout]
    if not any(t.strip() for t in part):
        raise ValueError(
            f"the {split!r} part of {path!r} has no text: it has {len(texts)} records and every "
            f"{_ROW_SPLIT_MODULUS}th record (index % {_ROW_SPLIT_MODULUS} == {last}) is held out; "
            f"held-out text needs at least {_ROW_SPLIT_MODULUS} records."
        )
    return part


# ---------------------------------------------------------------------------------------------------------- datasets
def _column_texts(dataset: Any, column: str, desc: str, local: Optional[str] = None) -> list[str]:
    names = list(getattr(dataset, "column_names", None) or [])
    if column not in names:
        raise ValueError(
            f"{desc} has no column {column!r}; available columns: {names}. "
            "Set calibration_text_column (text_column=...) to the column holding the text."
        )
    try:
        values = list(dataset[column])
    except UnicodeDecodeError as err:  # the json builder stores invalid UTF-8 and fails only when the text is read
        if local is None:
            raise
        raise _local_load_error(desc, local, err) from None
    texts = []
    for index, value in enumerate(values):
        if value is None:
            continue  # missing values in real datasets carry no text
        if not isinstance(value, str):
            raise ValueError(f"{desc}: column {column!r} row {index} is a {type(value).__name__}, expected a string.")
        texts.append(value)
    if not any(t.strip() for t in texts):
        raise ValueError(f"{desc}: column {column!r} has no text ({len(values)} rows, all empty).")
    return texts


__all__ = ["load_texts", "describe_source", "SourceLoadError", "PRESETS", "LOCAL_SPLITS", "is_heldout_split",
           "stdlib_docstrings"]
