"""Calibration sources, token windows and the calibration set built from a PruningConfig (real text only)."""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch

from conftest_calibration_helpers import make_bpe_tokenizer, make_position_tokenizer, position_texts
from hf_recon_prune import PruningConfig
from hf_recon_prune.calibration import (
    SourceLoadError,
    WindowOverlapWarning,
    build_calibration_set,
    load_texts,
    sample_window_starts,
    stream_windows_for_eval,
    tokenize_stream,
    tokenize_windows,
    window_ranges,
)
from hf_recon_prune.calibration import windows as windows_module

OFFSET = 3  # ids of the position tokenizer: word wk has id k + 3


def _sublist_at(haystack: list[int], needle: list[int]) -> list[int]:
    return [i for i in range(len(haystack) - len(needle) + 1) if haystack[i:i + len(needle)] == needle]


def _positions(window: torch.Tensor) -> set[int]:
    return set((window - OFFSET).tolist())


# ---------------------------------------------------------------------------------------------------------- sources
def test_default_corpus_is_real_english_and_splits_are_disjoint():
    from pydoc_data.topics import topics

    train, test = load_texts("default"), load_texts("default", "test")
    assert len(train) > 50 and len(test) > 5
    assert len(train) + len(test) == len(topics)
    assert not set(train) & set(test)
    assert load_texts("default", "validation") == test == load_texts("default", "heldout")
    assert load_texts("default", None) == train
    words = re.findall(r"[a-z]+", " ".join(train).lower())
    for common in ("the", "of", "and", "is", "to", "which"):
        assert words.count(common) > 100, common


def test_list_source_is_returned_for_every_split_and_validated():
    texts = ["one document", "another one"]
    assert load_texts(texts) == texts and load_texts(texts) is not texts
    assert load_texts(texts, "test") == texts
    with pytest.raises(ValueError, match="empty list"):
        load_texts([])
    with pytest.raises(TypeError, match="item 1 has type int"):
        load_texts(["ok", 3])
    with pytest.raises(ValueError, match="'self' is not a text source"):
        load_texts("self")
    with pytest.raises(ValueError, match="split='dev' is not available.*'train'"):
        load_texts("default", "dev")


def test_txt_file_split_at_a_line_boundary(tmp_path):
    path = tmp_path / "corpus.txt"
    lines = [f"line number {i} of the corpus" for i in range(100)]
    text = "\n".join(lines) + "\n"
    path.write_text(text, encoding="utf-8")
    (train,), (test,) = load_texts(str(path)), load_texts(path, "test")
    assert train + test == text
    assert train.endswith("\n") and test.startswith("line number")
    assert abs(len(train) / len(text) - 0.9) < 0.02
    assert load_texts(path, "heldout") == [test]


def test_empty_files_are_rejected_naming_the_path(tmp_path):
    for name in ("empty.txt", "empty.jsonl", "blank.txt"):
        path = tmp_path / name
        path.write_text("" if name.startswith("empty") else " \n\n ", encoding="utf-8")
        with pytest.raises(ValueError, match=re.escape(str(path)) + ".*empty"):
            load_texts(str(path))


def test_jsonl_rows_split_and_column_errors(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"doc {i}", "id": i}) for i in range(20)) + "\n\n", encoding="utf-8")
    assert load_texts(path, text_column="body") == [f"doc {i}" for i in range(20) if i % 10 != 9]
    assert load_texts(path, "test", text_column="body") == ["doc 9", "doc 19"]
    with pytest.raises(ValueError, match=r"no key 'text'; available keys: \['body', 'id'\]"):
        load_texts(path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2 is not valid JSON"):
        load_texts(bad)
    few = tmp_path / "few.jsonl"
    few.write_text('{"text": "only one"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="'test' part .* has no text"):
        load_texts(few, "test")


def test_missing_and_unknown_local_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_texts(str(tmp_path / "nope.txt"))
    weird = tmp_path / "code.py"
    weird.write_text("print('never run')", encoding="utf-8")
    with pytest.raises(ValueError, match="suffix '.py'"):
        load_texts(str(weird))


# ---------------------------------------------------------------------------------------------------------- datasets
def test_saved_dataset_and_dataset_dict_from_disk(tmp_path):
    import datasets

    rows = {"content": [f"row {i}" for i in range(20)], "label": list(range(20))}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "single"))
    assert load_texts(str(tmp_path / "single"), text_column="content") == [f"row {i}" for i in range(20) if i % 10 != 9]
    assert load_texts(str(tmp_path / "single"), "test", text_column="content") == ["row 9", "row 19"]
    with pytest.raises(ValueError, match=r"no column 'text'; available columns: \['content', 'label'\]"):
        load_texts(str(tmp_path / "single"))

    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["a", "b"]}), validation=datasets.Dataset.from_dict({"text": ["c"]})
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_texts(str(tmp_path / "dict")) == ["a", "b"]
    assert load_texts(str(tmp_path / "dict"), "heldout") == ["c"]
    with pytest.raises(ValueError, match=r"available splits: \['train', 'validation'\]"):
        load_texts(str(tmp_path / "dict"), "test")


def test_json_file_goes_through_the_datasets_json_builder(tmp_path):
    path = tmp_path / "records.json"
    path.write_text("\n".join(json.dumps({"text": f"record {i}", "n": i}) for i in range(10)), encoding="utf-8")
    assert load_texts(path) == [f"record {i}" for i in range(9)]
    assert load_texts(path, "test") == ["record 9"]
    with pytest.raises(ValueError, match=r"no column 'body'; available columns: \['text', 'n'\]"):
        load_texts(path, text_column="body")


def test_hub_dataset_branch_uses_load_dataset_and_checks_the_column(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        if kwargs.get("split") == "validation":
            raise ValueError('Unknown split "validation". Should be one of [\'train\', \'test\'].')
        return datasets.Dataset.from_dict({"text": ["hub text", None, "more"], "meta": [1, 2, 3]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_texts("someone/corpus", "train[:10%]") == ["hub text", "more"]
    assert calls[-1] == (("someone/corpus",), {"split": "train[:10%]", "trust_remote_code": False})
    assert load_texts("someone/corpus", "heldout") == ["hub text", "more"]  # validation is missing: falls back to test
    assert [c[1]["split"] for c in calls[-2:]] == ["validation", "test"]
    with pytest.raises(ValueError, match=r"no column 'body'; available columns: \['text', 'meta'\]"):
        load_texts("someone/corpus", text_column="body")


def test_load_failure_suggests_offline_sources(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for source, expected in (("c4", "en/c4-validation"), ("wikitext2", "wikitext-2-raw-v1"), ("someone/x", "someone/x")):
        with pytest.raises(SourceLoadError, match=f"{expected}.*ConnectionError.*calibration='default'.*local"):
            load_texts(source, "test")


# ---------------------------------------------------------------------------------------------------------- windows
@pytest.fixture(scope="module")
def bpe():
    return make_bpe_tokenizer()


@pytest.fixture(scope="module")
def small_texts():
    return load_texts("default")[20:26]


@pytest.mark.parametrize("add_bos", [False, True])
def test_windows_are_seeded_slices_of_the_tokenized_stream(small_texts, add_bos):
    tokenizer = make_bpe_tokenizer(add_bos=add_bos)
    reference = tokenizer("\n\n".join(small_texts))["input_ids"]  # independent single-pass tokenization
    assert (reference[0] == tokenizer.bos_token_id) == add_bos
    rng_state = torch.get_rng_state()
    windows, starts = tokenize_windows(small_texts, tokenizer, 12, 48, seed=5, return_starts=True)
    assert torch.equal(rng_state, torch.get_rng_state())  # no global RNG side effect
    assert windows.shape == (12, 48) and windows.dtype == torch.long
    assert tokenize_stream(small_texts, tokenizer).tolist() == reference
    for window, start in zip(windows.tolist(), starts.tolist()):
        assert reference[start:start + 48] == window
        assert start in _sublist_at(reference, window)
    assert torch.equal(windows, tokenize_windows(small_texts, tokenizer, 12, 48, seed=5))
    assert not torch.equal(windows, tokenize_windows(small_texts, tokenizer, 12, 48, seed=6))


def test_stream_decodes_back_to_the_joined_text_even_when_chunked(bpe, small_texts, monkeypatch):
    joined = "\n\n".join(small_texts)
    assert bpe.decode(tokenize_stream(small_texts, bpe).tolist()) == joined
    monkeypatch.setattr(windows_module, "_CHUNK_CHARS", 5000)
    monkeypatch.setattr(windows_module, "_CHUNKS_PER_CALL", 2)
    assert len(windows_module._chunk_documents(list(small_texts))) > 2
    assert bpe.decode(tokenize_stream(small_texts, bpe).tolist()) == joined


def test_heldout_windows_do_not_overlap_calibration_windows():
    tokenizer = make_position_tokenizer(2000)
    texts = position_texts(2000, 37)
    windows, starts = tokenize_windows(texts, tokenizer, 10, 64, seed=0, return_starts=True)
    for window, start in zip(windows, starts.tolist()):
        assert _positions(window) == set(range(start, start + 64))  # contiguous: ids are positions
    calibration = set().union(*map(_positions, windows))
    heldout = tokenize_windows(texts, tokenizer, 15, 64, seed=1, exclude=window_ranges(starts, 64))
    assert heldout.shape == (15, 64)
    for window in heldout:
        assert not _positions(window) & calibration


@pytest.mark.filterwarnings("ignore::hf_recon_prune.calibration.WindowOverlapWarning")
def test_exclusion_that_leaves_no_room_is_an_error():
    with pytest.raises(ValueError, match="no window of seq_len=50 tokens fits.*cover 80 of the source's 100 tokens"):
        sample_window_starts(100, 3, 50, 0, exclude=[(10, 90)])
    starts = sample_window_starts(100, 50, 10, 0, exclude=torch.tensor([[0, 40], [60, 100]]))
    assert ((starts >= 40) & (starts <= 50)).all()


def test_too_short_source_and_empty_text_errors(bpe, tmp_path):
    length = len(tokenize_stream(["a short text"], bpe))
    with pytest.raises(ValueError, match=f"has {length} tokens after tokenization, but seq_len=64 needs at least 64"):
        tokenize_windows(["a short text"], bpe, 4, 64, seed=0)
    with pytest.raises(ValueError, match="empty"):
        tokenize_windows(["", "  \n"], bpe, 4, 8, seed=0)
    with pytest.raises(ValueError, match="seq_len=0 is not allowed"):
        tokenize_windows(["text"], bpe, 4, 0, seed=0)


def test_heavy_overlap_warns_and_light_use_does_not():
    tokenizer = make_position_tokenizer(500)
    texts = position_texts(500, 50)
    with pytest.warns(WindowOverlapWarning, match="20 windows of 64 tokens .* from 500 available tokens"):
        tokenize_windows(texts, tokenizer, 20, 64, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenize_windows(texts, tokenizer, 4, 64, seed=0)


def test_stream_windows_for_eval_are_consecutive(small_texts):
    tokenizer = make_bpe_tokenizer(add_bos=True)
    reference = tokenizer("\n\n".join(small_texts))["input_ids"]
    windows = stream_windows_for_eval(small_texts, tokenizer, 100)
    assert windows.shape == (len(reference) // 100, 100)
    assert windows.reshape(-1).tolist() == reference[: windows.numel()]
    assert windows[0, 0] == tokenizer.bos_token_id
    assert torch.equal(stream_windows_for_eval(small_texts, tokenizer, 100, max_windows=3), windows[:3])
    with pytest.raises(ValueError, match="needs at least 100000 tokens"):
        stream_windows_for_eval(small_texts, tokenizer, 100_000)


# ---------------------------------------------------------------------------------------------------------- builder
def _config(**overrides):
    values = dict(calibration=position_texts(3000, 100), num_samples=8, seq_len=32, heldout_fraction=0.3, seed=3)
    values.update(overrides)
    return PruningConfig(**values)


def test_calibration_set_from_real_text_has_disjoint_heldout():
    config = _config()
    result = build_calibration_set(config, make_position_tokenizer(3000))
    assert result.input_ids.shape == (8, 32)
    assert result.heldout_ids.shape == (math.ceil(0.3 * 8), 32)
    assert not result.is_self_generated.any()
    assert result.statistics_rows().tolist() == list(range(8))
    calibration = set().union(*map(_positions, result.input_ids))
    for window in result.heldout_ids:
        assert not _positions(window) & calibration
    description = json.loads(json.dumps(result.description))
    assert description["num_real"] == 8 and description["num_heldout"] == 3
    assert description["heldout"]["disjoint_from_calibration"] is True
    again = build_calibration_set(config, make_position_tokenizer(3000))
    assert torch.equal(again.input_ids, result.input_ids) and torch.equal(again.heldout_ids, result.heldout_ids)


def test_calibration_set_without_heldout_and_with_a_heldout_source():
    tokenizer = make_position_tokenizer(3000)
    none = build_calibration_set(_config(heldout_fraction=0.0), tokenizer)
    assert none.heldout_ids.shape == (0, 32) and none.heldout_ids.dtype == torch.long
    other = position_texts(3000, 100)[20:]
    separate = build_calibration_set(_config(calibration=position_texts(3000, 100)[:20], heldout_source=other), tokenizer)
    assert separate.heldout_ids.shape == (3, 32)
    assert all(min(_positions(w)) >= 2000 for w in separate.heldout_ids)
    assert all(max(_positions(w)) < 2000 for w in separate.input_ids)


@pytest.mark.filterwarnings("ignore::hf_recon_prune.calibration.WindowOverlapWarning")
def test_heldout_when_calibration_windows_cover_the_source(tmp_path):
    tokenizer = make_position_tokenizer(1000)
    # A list source has no held-out part: the error says what to do.
    with pytest.raises(ValueError, match="no held-out window fits.*heldout_source"):
        build_calibration_set(_config(calibration=position_texts(100, 10), num_samples=40, seq_len=30), tokenizer)
    # A file does: its held-out part is used, with a warning.
    path = tmp_path / "small.txt"
    path.write_text("\n".join(position_texts(1000, 10)) + "\n", encoding="utf-8")
    config = _config(calibration=str(path), num_samples=300, seq_len=30, heldout_fraction=0.1)
    with pytest.warns(UserWarning, match="held-out windows are drawn from its 'heldout' split"):
        result = build_calibration_set(config, tokenizer)
    assert all(min(_positions(w)) >= 900 for w in result.heldout_ids)
    assert all(max(_positions(w)) < 900 for w in result.input_ids)


def test_the_description_fingerprints_the_calibration_and_heldout_tokens():
    import hashlib

    def sha(ids):  # the reference: shape, dtype, then the int64 bytes row-major
        header = f"{tuple(ids.shape)}|{ids.dtype}|".encode()
        return hashlib.sha256(header + ids.to(torch.int64).numpy().tobytes()).hexdigest()[:16]

    tokenizer = make_position_tokenizer(3000)
    result = build_calibration_set(_config(), tokenizer)
    description = json.loads(json.dumps(result.description))
    assert description["windows_sha256"] == sha(result.input_ids)
    assert description["heldout_windows_sha256"] == sha(result.heldout_ids)
    assert description["source_version"] is None  # a list of texts is pinned by its own hash
    assert build_calibration_set(_config(), tokenizer).description["windows_sha256"] == description["windows_sha256"]
    assert build_calibration_set(_config(seed=4), tokenizer).description["windows_sha256"] != \
        description["windows_sha256"]


def test_the_default_corpus_is_described_with_the_python_whose_pydoc_data_it_is():
    import platform

    from hf_recon_prune.calibration.sources import source_version

    assert source_version("default") == f"pydoc_data of Python {platform.python_version()}"
    assert source_version("c4") is None and source_version(["a text"]) is None
