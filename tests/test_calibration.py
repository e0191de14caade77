"""Calibration sources, token windows and the calibration set built from a PruningConfig (real text only)."""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch

from conftest_calibration_helpers import make_bpe_tokenizer, make_position_tokenizer, make_tiny_llama, position_texts
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
    assert len(train) == len(topics) - len(topics) // 8 and len(train) + len(test) <= len(topics)
    assert not set(train) & set(test)
    assert load_texts("default", "validation") == test == load_texts("default", "heldout")
    assert load_texts("default", None) == train
    words = re.findall(r"[a-z]+", " ".join(train).lower())
    for common in ("the", "of", "and", "is", "to", "which"):
        assert words.count(common) > 100, common


def test_default_heldout_part_repeats_no_train_paragraph():
    from pydoc_data.topics import topics

    keys = sorted(topics)  # the rule the calibration windows of every recorded run were drawn with
    assert load_texts("default") == [topics[k] for i, k in enumerate(keys) if i % 8 != 7]
    train, heldout = "\n\n".join(load_texts("default")), load_texts("default", "heldout")
    train_paragraphs = {p.strip() for p in train.split("\n\n")}
    for text in heldout:
        assert text.strip() and not {p.strip() for p in text.split("\n\n")} & train_paragraphs
        # Nothing of substance is copied either: what is left in the train text is at most a short phrase.
        assert all(len(p.strip()) < 20 or p.strip() not in train for p in text.split("\n\n"))
    # The three topics that are subsections repeated in train topics keep their title only.
    for key, copied_from in (("augassign", "assignment"), ("exceptions", "execmodel"), ("id-classes", "identifiers")):
        assert keys.index(key) % 8 == 7 and keys.index(copied_from) % 8 != 7
        title = topics[key].split("\n\n")[0]
        assert title in heldout and not any(topics[key][len(title):].strip()[:200] in t for t in heldout)
    unaffected = [topics[k] for i, k in enumerate(keys) if i % 8 == 7 and k in ("booleans", "power", "lists")]
    assert len(unaffected) == 3 and all(t in heldout for t in unaffected)


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
    # a null text is skipped, as the csv / json / parquet loaders skip it; another type is still refused
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text("\n".join(json.dumps({"text": None if i % 3 == 0 else f"doc {i}"}) for i in range(30)),
                     encoding="utf-8")
    kept = [f"doc {i}" for i in range(30) if i % 3]
    assert load_texts(nulls) == [t for k, t in enumerate(kept) if k % 10 != 9]
    csv = tmp_path / "nulls.csv"
    csv.write_text("text\n" + "\n".join("" if i % 3 == 0 else f"doc {i}" for i in range(30)) + "\n", encoding="utf-8")
    assert sorted(load_texts(csv) + load_texts(csv, "test")) == sorted(kept)
    number = tmp_path / "number.jsonl"
    number.write_text('{"text": "fine"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"number.jsonl:2: 'text' is a int, expected a string"):
        load_texts(number)
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


def test_one_huge_document_is_tokenized_in_pieces_cut_at_paragraph_breaks(bpe, small_texts, monkeypatch):
    """A whole .txt file is one document: beyond _CHUNK_CHARS it is cut after paragraph breaks (else line breaks, else
    spaces) into pieces that concatenate to it, and the stream still decodes to the text."""
    text = "\n\n".join(small_texts)
    monkeypatch.setattr(windows_module, "_CHUNK_CHARS", 3000)
    pieces = windows_module._pieces(text)
    assert "".join(pieces) == text and len(pieces) >= len(text) // 3000
    assert all(1500 <= len(p) <= 3000 and p.endswith("\n\n") for p in pieces[:-1])
    chunks = windows_module._chunk_documents([text, "a short one"])
    assert "\n\n".join([text, "a short one"]) == "".join(chunks) and max(map(len, chunks)) <= 3000 + 2
    assert bpe.decode(tokenize_stream([text], bpe).tolist()) == text
    lines = "\n".join(f"line {i} " + "word " * 20 for i in range(200))  # no paragraph break: cut after a line
    assert all(p.endswith("\n") for p in windows_module._pieces(lines)[:-1])
    words = "word " * 2000  # no line break either: cut after a space
    assert all(p.endswith(" ") for p in windows_module._pieces(words)[:-1]) and "".join(windows_module._pieces(words)) == words
    assert windows_module._pieces("x" * 7000) == ["x" * 7000]  # nothing to cut at: one piece


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


def _reference_windows(ids: list[int], seq_len: int) -> torch.Tensor:
    count = len(ids) // seq_len
    return torch.tensor(ids[: count * seq_len]).view(count, seq_len)


def test_perplexity_streams_of_the_presets_follow_the_reference_code(monkeypatch):
    import datasets

    from hf_recon_prune.evaluation import perplexity, perplexity_of_ids

    sentences = [f"the company said it expects {i} new orders in the quarter" for i in range(300)]
    documents = [f"Document {i} of the shard." + " More words follow here." * (i % 4) for i in range(1300)]
    articles = [line for i in range(30) for line in (f" = Article {i} = ", "", f" The article number {i} is here . ")]

    def fake_load_dataset(name, *args, **kwargs):
        if name == "ptb_text_only":
            return datasets.Dataset.from_dict({"sentence": sentences})
        if name == "allenai/c4":
            assert kwargs["split"] == "validation" and "c4-validation" in kwargs["data_files"]["validation"]
            return datasets.Dataset.from_dict({"text": documents})
        assert name == "wikitext"
        return datasets.Dataset.from_dict({"text": articles})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    tokenizer = make_bpe_tokenizer(add_bos=True)
    # SparseGPT's datautils.py (Wanda's is the same): tokenizer(" ".join(test["sentence"])) for PTB;
    # tokenizer(" ".join(validation[:1100]["text"])).input_ids[:, :256 * seq_len] for C4; "\n\n" for wikitext2.
    ptb = _reference_windows(tokenizer(" ".join(sentences))["input_ids"], 64)
    assert torch.equal(stream_windows_for_eval(load_texts("ptb", "test"), tokenizer, 64), ptb)
    c4 = _reference_windows(tokenizer(" ".join(documents[:1100]))["input_ids"][: 256 * 16], 16)
    assert c4.shape == (256, 16)
    assert torch.equal(stream_windows_for_eval(load_texts("c4", "validation"), tokenizer, 16), c4)
    assert torch.equal(stream_windows_for_eval(load_texts("c4", "test"), tokenizer, 16, max_windows=3), c4[:3])
    wikitext = _reference_windows(tokenizer("\n\n".join(articles))["input_ids"], 32)
    assert torch.equal(stream_windows_for_eval(load_texts("wikitext2", "test"), tokenizer, 32), wikitext)

    model = make_tiny_llama(len(tokenizer))
    assert perplexity(model, tokenizer, "ptb", seq_len=64, max_windows=4) == pytest.approx(perplexity_of_ids(model, ptb[:4]))
    # Calibration windows (and held-out windows of a calibration set) are cut from the "\n\n" join of every source.
    joined = tokenizer("\n\n".join(sentences))["input_ids"]
    assert tokenize_stream(load_texts("ptb", "train"), tokenizer).tolist() == joined
    assert tokenize_stream(load_texts("c4", "validation"), tokenizer).tolist() == tokenizer("\n\n".join(documents))["input_ids"]


def _documents_of(lengths: list[int]) -> list[str]:
    """Documents of the position tokenizer's words, each its own run: document d holds the words after d-1's."""
    documents, start = [], 0
    for length in lengths:
        documents.append(" ".join(f"w{i}" for i in range(start, start + length)))
        start += length
    return documents


def _fake_c4(monkeypatch, documents: list[str]) -> None:
    import datasets

    def fake_load_dataset(name, *args, **kwargs):
        assert name == "allenai/c4"
        return datasets.Dataset.from_dict({"text": documents})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)


def test_c4_calibration_windows_lie_inside_single_long_documents(monkeypatch):
    """C4 as SparseGPT's datautils.py draws it: each window inside one document of more than seq_len tokens, at an
    offset in [0, len - seq_len); the documents are visited in a seeded random order and the first long enough ones
    are used, one window each, calibration first, then held-out (other documents)."""
    lengths = [5, 40, 12, 80, 16, 17, 33, 9, 64, 20, 100, 16] * 3
    documents = _documents_of(lengths)
    _fake_c4(monkeypatch, documents)
    bounds = torch.tensor([0] + lengths).cumsum(0).tolist()  # document d holds positions [bounds[d], bounds[d + 1])
    tokenizer = make_position_tokenizer(sum(lengths))
    config = PruningConfig(calibration="c4", num_samples=8, seq_len=16, heldout_fraction=0.25, seed=7)
    calibration = build_calibration_set(config, tokenizer, show_progress=False)
    assert calibration.input_ids.shape == (8, 16) and calibration.heldout_ids.shape == (2, 16)
    used = []
    for window in torch.cat([calibration.input_ids, calibration.heldout_ids]):
        positions = (window - OFFSET).tolist()
        assert positions == list(range(positions[0], positions[0] + 16))  # a contiguous run of one text
        document = max(d for d in range(len(lengths)) if bounds[d] <= positions[0])
        assert lengths[document] > 16 and positions[-1] < bounds[document + 1] - 1  # inside, never its last token
        used.append(document)
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(7)).tolist()
    assert used == [d for d in order if lengths[d] > 16][:10]  # distinct documents, in the draw's order
    assert calibration.description["source_documents"]["windows"] == "one per document, inside it"
    heldout = calibration.description["heldout"]
    assert heldout["disjoint_from_calibration"] is True and "other documents" in heldout["note"]


def test_c4_as_the_heldout_source_gives_windows_inside_its_documents(monkeypatch):
    """heldout_source="c4" (its validation split): the held-out windows follow C4's rule too, whatever the
    calibration source."""
    lengths = [40, 10, 64, 18, 9, 33] * 4
    _fake_c4(monkeypatch, _documents_of(lengths))
    bounds = torch.tensor([0] + lengths).cumsum(0).tolist()
    tokenizer = make_position_tokenizer(sum(lengths))
    calibration_texts = [" ".join(f"w{i}" for i in range(200))]  # another text: windows of its stream
    config = PruningConfig(calibration=calibration_texts, num_samples=4, seq_len=16, heldout_fraction=0.5,
                           heldout_source="c4", seed=2)
    calibration = build_calibration_set(config, tokenizer, show_progress=False)
    assert calibration.heldout_ids.shape == (2, 16)
    for window in calibration.heldout_ids:
        positions = (window - OFFSET).tolist()
        document = max(d for d in range(len(lengths)) if bounds[d] <= positions[0])
        assert positions[-1] < bounds[document + 1] - 1 and lengths[document] > 16
    assert "inside each of some documents" in calibration.description["heldout"]["note"]

    # C4's validation split as calibration and as held-out source: held-out windows from other documents of it
    config = PruningConfig(calibration="c4", calibration_split="validation", num_samples=4, seq_len=16,
                           heldout_fraction=0.5, heldout_source="c4", seed=2)
    calibration = build_calibration_set(config, tokenizer, show_progress=False)

    def documents(windows):
        return {max(d for d in range(len(lengths)) if bounds[d] <= int(w[0]) - OFFSET) for w in windows}

    assert len(documents(calibration.input_ids)) == 4 and len(documents(calibration.heldout_ids)) == 2
    assert not documents(calibration.input_ids) & documents(calibration.heldout_ids)
    assert calibration.description["heldout"]["disjoint_from_calibration"] is True


def test_document_windows_are_seeded_and_a_group_does_not_depend_on_the_next():
    from hf_recon_prune.calibration.windows import sample_document_windows

    documents = _documents_of([30, 18, 50, 7, 22, 40, 19, 64] * 4)
    tokenizer = make_position_tokenizer(sum([30, 18, 50, 7, 22, 40, 19, 64] * 4))
    (alone, none), _ = sample_document_windows(documents, tokenizer, [6, 0], 16, seed=3)
    (first, second), described = sample_document_windows(documents, tokenizer, [6, 4], 16, seed=3)
    assert torch.equal(alone, first) and none.shape == (0, 16) and second.shape == (4, 16)
    (again, _), _ = sample_document_windows(documents, tokenizer, [6, 4], 16, seed=3)
    assert torch.equal(again, first)
    (other, _), _ = sample_document_windows(documents, tokenizer, [6, 4], 16, seed=4)
    assert not torch.equal(other, first)
    assert described["documents"] == 32 and 10 <= described["documents_tokenized"] <= 32


def test_too_few_long_documents_for_c4_windows_is_a_clear_error(monkeypatch):
    documents = _documents_of([40, 10, 12, 50, 8])
    _fake_c4(monkeypatch, documents)
    config = PruningConfig(calibration="c4", num_samples=3, seq_len=16, heldout_fraction=0.0)
    with pytest.raises(ValueError, match=r"3 windows of seq_len=16 tokens need 3 documents of more than 16 tokens.*"
                                         r"only 2 of its 5 documents are that long; use a smaller seq_len"):
        build_calibration_set(config, make_position_tokenizer(120), show_progress=False)


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


# ---------------------------------------------------------------------------------------------------------- local files
def test_jsonl_lines_are_split_at_newlines_only(tmp_path):
    from hf_recon_prune.calibration.generation_cache import sample_line

    # JSON strings may hold U+2028, U+2029 and U+0085 raw; str.splitlines would split inside them.
    texts = [f"sample {i}: one\u2028two\u2029three\x85four" if i % 3 == 0 else f"sample {i}" for i in range(20)]
    path = tmp_path / "self.jsonl"
    path.write_text("".join(sample_line(torch.tensor([1, 2]), t) + "\n" for t in texts), encoding="utf-8")
    assert load_texts(path) == [t for i, t in enumerate(texts) if i % 10 != 9]
    assert load_texts(path, "heldout") == [texts[9], texts[19]]
    crlf = tmp_path / "windows.jsonl"
    crlf.write_bytes("".join(json.dumps({"text": t}) + "\r\n" for t in texts).encode("utf-8"))
    assert load_texts(crlf, "test") == [texts[9], texts[19]]


def test_a_utf8_byte_order_mark_is_not_text(tmp_path):
    jsonl = tmp_path / "notepad.jsonl"
    jsonl.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(20)), encoding="utf-8-sig")
    assert jsonl.read_bytes().startswith(b"\xef\xbb\xbf")
    assert load_texts(jsonl)[:2] == ["document 0", "document 1"]
    txt = tmp_path / "notepad.txt"
    txt.write_text("hello world\n" * 20, encoding="utf-8-sig")
    (train,), (test,) = load_texts(txt), load_texts(txt, "test")
    assert train + test == "hello world\n" * 20


def _write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


def test_folder_of_data_files_has_a_heldout_split(tmp_path):
    splits = tmp_path / "splits"
    splits.mkdir()
    for name in ("train", "test"):
        _write_jsonl(splits / f"{name}.jsonl", [f"{name} document {i}" for i in range(12)])
    assert load_texts(splits) == [f"train document {i}" for i in range(12)]
    assert load_texts(splits, "test") == load_texts(splits, "heldout") == [f"test document {i}" for i in range(12)]
    with pytest.raises(ValueError, match=r"split='validation' is not available in .*splits'; available splits: \['train', 'test'\]"):
        load_texts(splits, "validation")
    _write_jsonl(splits / "validation.jsonl", ["validation document"])
    assert load_texts(splits, "heldout") == ["validation document"]  # validation first, as for Hub datasets

    # Only training files: rows are split like a single file's, so every held-out split is the same remainder.
    plain = tmp_path / "plain"
    plain.mkdir()
    _write_jsonl(plain / "part-a.jsonl", [f"a {i}" for i in range(10)])
    _write_jsonl(plain / "part-b.jsonl", [f"b {i}" for i in range(10)])
    rows = [f"a {i}" for i in range(10)] + [f"b {i}" for i in range(10)]
    assert sorted(load_texts(plain) + load_texts(plain, "test")) == sorted(rows)
    held = load_texts(plain, "heldout")
    assert len(held) == 2 and not set(held) & set(load_texts(plain))
    assert load_texts(plain, "test") == load_texts(plain, "validation") == held
    import datasets  # a saved DatasetDict of one split is the same

    datasets.DatasetDict(train=datasets.Dataset.from_dict({"text": rows})).save_to_disk(str(tmp_path / "saved"))
    assert load_texts(tmp_path / "saved", "heldout") == ["a 9", "b 9"]
    assert load_texts(tmp_path / "saved") == [t for i, t in enumerate(rows) if i % 10 != 9]

    empty = tmp_path / "nothing"
    empty.mkdir()
    (empty / "notes.md").write_text("not a data file", encoding="utf-8")
    with pytest.raises(SourceLoadError, match=r"nothing': no data files .*\['notes.md'\]"):
        load_texts(empty, "heldout")


def test_folder_of_data_files_as_calibration_and_heldout_source(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", position_texts(2000, 100))
    _write_jsonl(folder / "test.jsonl", [" ".join(f"w{i}" for i in range(2000, 3000))])
    config = _config(calibration=str(folder), heldout_source=str(folder), num_samples=4)
    result = build_calibration_set(config, make_position_tokenizer(3000))
    assert result.heldout_ids.shape == (2, 32)
    assert all(min(_positions(w)) >= 2000 for w in result.heldout_ids)
    assert all(max(_positions(w)) < 2000 for w in result.input_ids)


def test_local_file_errors_name_the_file_and_its_problem(tmp_path):
    latin = tmp_path / "latin1.csv"
    latin.write_bytes(b"text\n" + "caf\u00e9 au lait\n".encode("latin-1") * 20)
    with pytest.raises(SourceLoadError, match=r"latin1\.csv.* not UTF-8.*byte 8\b") as info:
        load_texts(latin)
    assert "Hub" not in str(info.value) and "network" not in str(info.value)
    header = tmp_path / "header.csv"
    header.write_text("text\n", encoding="utf-8")
    with pytest.raises(SourceLoadError, match=r"header\.csv.* no rows") as info:
        load_texts(header)
    assert "Hub" not in str(info.value) and "network" not in str(info.value)
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 this is not a parquet file")
    with pytest.raises(SourceLoadError, match=r"broken\.parquet.* could not be read") as info:
        load_texts(broken)
    assert "Hub" not in str(info.value) and "network" not in str(info.value)
    for name, content in (("array.json", b'[{"text": "caf\xe9"}]'), ("lines.json", b'{"text": "caf\xe9"}\n' * 20)):
        # pyarrow refuses the first in its own words; it keeps the bytes of the second and fails when they are read
        (tmp_path / name).write_bytes(content)
        with pytest.raises(SourceLoadError, match=name.replace(".", r"\.") + r".* not UTF-8.*byte 1[34]\b"):
            load_texts(tmp_path / name)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "data.csv").write_bytes(latin.read_bytes())
    with pytest.raises(SourceLoadError, match=r"data\.csv.* not UTF-8.*byte 8\b") as info:
        load_texts(folder)
    assert "Hub" not in str(info.value)
    txt = tmp_path / "latin.txt"
    txt.write_bytes("caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin\.txt.* not UTF-8.*byte 3\b"):
        load_texts(txt)


def test_a_missing_evaluation_source_is_named_as_one(tmp_path, monkeypatch):
    from conftest import make_tiny_model

    from hf_recon_prune.evaluation import evaluate, perplexity

    monkeypatch.chdir(tmp_path)
    model = make_tiny_model("llama")
    for call in (lambda: perplexity(model, object(), "nosuch/corpus.txt"),
                 lambda: evaluate(model, object(), perplexity={"x": "nosuch/corpus.txt"})):
        with pytest.raises(FileNotFoundError, match=r"^evaluation source 'nosuch/corpus.txt' looks like a local path"):
            call()
