"""Self-generated calibration data (LLM-QAT procedure) and its mix with real windows in the calibration set."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import os
import sys

import pytest
import torch

from conftest_calibration_helpers import make_bpe_tokenizer, make_position_tokenizer, make_tiny_llama, position_texts
from hf_recon_prune import PruningConfig
from hf_recon_prune.calibration import (
    SelfGenerationError,
    build_calibration_set,
    detect_language,
    generate_self_calibration,
    make_language_filter,
)
from hf_recon_prune.calibration import language as language_module
from hf_recon_prune.calibration import sampling

NUM, LENGTH = 6, 20
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer():
    return make_bpe_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return make_tiny_llama(len(tokenizer))


def _generate(model, tokenizer, **kwargs):
    settings = dict(seed=0, batch_size=4, show_progress=False)
    settings.update(kwargs)
    return generate_self_calibration(model, tokenizer, settings.pop("num", NUM), settings.pop("seq_len", LENGTH),
                                     **settings)


class _ForwardRaises(torch.nn.Module):
    def forward(self, *args, **kwargs):
        raise AssertionError("the model must not run")


def test_shape_determinism_and_no_side_effects(model, tokenizer):
    model.train()
    generation_config = model.generation_config
    rng_state = torch.get_rng_state()
    first = _generate(model, tokenizer)
    assert torch.equal(rng_state, torch.get_rng_state())  # the caller's RNG is untouched
    assert model.training and model.generation_config is generation_config  # mode and config restored
    model.eval()
    assert first.input_ids.shape == (NUM, LENGTH) and first.input_ids.dtype == torch.long
    assert len(first.texts) == NUM and not first.from_cache
    assert first.texts == [tokenizer.decode(row.tolist()) for row in first.input_ids]
    special = set(tokenizer.all_special_ids)
    assert not special & set(first.input_ids[:, 0].tolist())  # start tokens are ordinary tokens
    second = _generate(model, tokenizer)
    assert torch.equal(first.input_ids, second.input_ids) and first.texts == second.texts
    assert not torch.equal(first.input_ids, _generate(model, tokenizer, seed=1).input_ids)


def test_greedy_results_do_not_depend_on_batch_size(model, tokenizer):
    one = _generate(model, tokenizer, temperature=0, batch_size=1)
    four = _generate(model, tokenizer, temperature=0, batch_size=4)
    assert torch.equal(one.input_ids, four.input_ids) and one.texts == four.texts
    # Greedy continuation of a greedy prefix: each row is the argmax path from its start token.
    row = one.input_ids[0]
    logits = model(row.view(1, -1)).logits[0, :-1]
    assert torch.equal(logits.argmax(-1), row[1:])


def test_a_static_kv_cache_gives_the_same_samples_as_the_dynamic_one(model, tokenizer):
    dynamic = _generate(model, tokenizer, static_cache=False)
    for batch_size in (2, 4):  # the static cache is sized per batch: another batch, the same rows
        static = _generate(model, tokenizer, static_cache=True, batch_size=batch_size)
        assert torch.equal(static.input_ids, dynamic.input_ids) and static.texts == dynamic.texts


def test_sampling_settings_change_the_samples(model, tokenizer):
    # EOS suppressed, so that no sample is replaced and all three keep the same candidates.
    base = _generate(model, tokenizer, greedy_tokens=2, stop_at_eos=False)
    top_k_1 = _generate(model, tokenizer, greedy_tokens=2, top_k=1, stop_at_eos=False)
    greedy = _generate(model, tokenizer, greedy_tokens=2, temperature=0, stop_at_eos=False)
    assert torch.equal(base.input_ids[:, :3], greedy.input_ids[:, :3])  # same accepted prefixes
    assert not torch.equal(base.input_ids, greedy.input_ids)
    assert torch.equal(top_k_1.input_ids, greedy.input_ids)  # top-1 sampling is greedy decoding


def test_language_filter_predicate_is_applied_to_prefixes(model, tokenizer):
    seen = []

    def odd_first_character(text: str) -> bool:
        seen.append(text)
        return bool(text) and ord(text[0]) % 2 == 1

    data = _generate(model, tokenizer, greedy_tokens=3, language_filter=odd_first_character, language="en")
    judged = list(seen)
    assert data.input_ids.shape == (NUM, LENGTH)
    for row in data.input_ids:
        assert odd_first_character(tokenizer.decode(row[:4].tolist(), skip_special_tokens=True))
    # Candidates are judged in order (a batch at a time, so a few past the last one used may be judged too); each
    # rejected one was replaced by the next draw.
    used = judged[:data.num_candidates]
    rejected = [t for t in used if not (t and ord(t[0]) % 2 == 1)]
    assert rejected and len(judged) >= data.num_candidates == NUM + len(rejected)


def test_filter_that_rejects_everything_gives_up_after_the_budget(model, tokenizer):
    calls = []
    with pytest.raises(SelfGenerationError, match=r"only 0 of num_samples=6 samples came from 18 candidates "
                                                  r"\(max_attempts_factor=3 allows 18\): 18 prefixes failed the language"):
        _generate(model, tokenizer, language_filter=lambda text: calls.append(text) and False, max_attempts_factor=3)
    assert len(calls) == 3 * NUM


def test_langdetect_filter_on_fixed_sentences():
    english = make_language_filter("en")
    assert english("The committee will publish its final report on the new railway line next spring.")
    assert not english("Der Ausschuss wird seinen Abschlussbericht über die neue Bahnstrecke im Frühjahr veröffentlichen.")
    assert not english("Le comité publiera son rapport final sur la nouvelle ligne de chemin de fer au printemps.")
    assert detect_language("Le comité publiera son rapport final au printemps.") == "fr"
    assert detect_language("12345 !!!") is None
    with pytest.raises(ValueError, match="language='english' is not supported.*'en'"):
        make_language_filter("english")


def test_english_filter_keeps_only_english_prefixes(model, tokenizer):
    data = _generate(model, tokenizer, num=3, language="en", greedy_tokens=4, max_attempts_factor=40)
    for row in data.input_ids:
        assert detect_language(tokenizer.decode(row[:5].tolist(), skip_special_tokens=True)) == "en"


def test_without_stop_at_eos_eos_is_suppressed_so_every_sample_has_full_length(tokenizer):
    model = make_tiny_llama(len(tokenizer), seed=1)
    eos = tokenizer.eos_token_id
    hook = model.lm_head.register_forward_hook(lambda module, args, out: out.index_add(-1, torch.tensor([eos]), torch.full((*out.shape[:-1], 1), 1e4)))
    try:
        assert model(torch.tensor([[5, 6]])).logits[0, -1].argmax() == eos
        data = _generate(model, tokenizer, stop_at_eos=False)
        with pytest.raises(SelfGenerationError, match=r"48 samples ended \(EOS\) before seq_len=20 tokens; to get "
                                                      r"more: raise max_attempts_factor, or stop_at_eos=False"):
            _generate(model, tokenizer)  # every sample ends at once: none is long enough
        # Through PruningConfig the advice names its fields, and leaves out what it cannot set; the CLI, its flags.
        from hf_recon_prune import PruningConfig
        from hf_recon_prune.calibration import build_calibration_set
        from hf_recon_prune.cli.errors import in_flag_terms

        config = PruningConfig(calibration="self", num_samples=NUM, seq_len=LENGTH, heldout_fraction=0.0,
                               self_gen_batch_size=4)
        with pytest.raises(SelfGenerationError) as raised:
            build_calibration_set(config, tokenizer, model, show_progress=False)
        assert str(raised.value).endswith("before seq_len=20 tokens; to get more: self_gen_stop_at_eos=False (EOS "
                                          "suppressed: every sample runs to the full length).")
        assert "raise max_attempts_factor" not in str(raised.value)  # not a PruningConfig field
        assert [name for name, _ in raised.value.remedies] == ["self_gen_stop_at_eos"]
        flags = in_flag_terms(raised.value)
        assert isinstance(flags, SelfGenerationError) and str(flags).endswith(
            "to get more: --self-gen-stop-at-eos false (EOS suppressed: every sample runs to the full length).")
    finally:
        hook.remove()
    assert data.input_ids.shape == (NUM, LENGTH) and not (data.input_ids == eos).any() and data.num_short == 0


def test_self_generation_advice_follows_the_callers_names():
    from hf_recon_prune.calibration.builder import SELF_GENERATION_FIELDS
    from hf_recon_prune.cli.errors import in_flag_terms

    error = SelfGenerationError("only 1 of 4", [("max_attempts_factor", "raise max_attempts_factor"),
                                                ("greedy_tokens", "raise greedy_tokens (x)"),
                                                ("language", "disable the filter with language=None")])
    assert str(error) == ("only 1 of 4; to get more: raise max_attempts_factor, or raise greedy_tokens (x), or "
                          "disable the filter with language=None.")
    config = error.renamed(SELF_GENERATION_FIELDS)
    assert str(config) == ("only 1 of 4; to get more: raise self_gen_greedy_tokens (x), or disable the filter with "
                           "self_gen_language=None.")
    flags = ("only 1 of 4; to get more: raise --self-gen-greedy-tokens (x), or disable the filter with "
             "--self-gen-language none.")
    assert str(in_flag_terms(config)) == str(in_flag_terms(error)) == flags
    assert str(error.renamed({})) == "only 1 of 4."
    other = ValueError("language=None")
    assert in_flag_terms(other) is other


def test_tokenizer_without_pad_uses_eos_and_without_eos_fails(model):
    no_pad = make_bpe_tokenizer(pad=False)
    assert no_pad.pad_token_id is None
    assert _generate(model, no_pad).input_ids.shape == (NUM, LENGTH)
    bare = make_bpe_tokenizer(pad=False, eos=False)
    bare_model = make_tiny_llama(len(bare))
    bare_model.config.eos_token_id = None
    bare_model.generation_config.eos_token_id = None
    with pytest.raises(ValueError, match="neither a pad token nor an EOS token"):
        _generate(bare_model, bare)


def test_cache_is_reused_without_running_the_model(model, tokenizer, tmp_path):
    first = _generate(model, tokenizer, cache_dir=str(tmp_path))
    files = os.listdir(tmp_path)
    assert len(files) == 1 and files[0].endswith(".jsonl") and first.cache_path
    lines = (tmp_path / files[0]).read_text(encoding="utf-8").splitlines()
    header = json.loads(lines[0])["header"]
    assert header["seq_len"] == LENGTH and header["num_samples"] == NUM and len(lines) == NUM + 1
    assert json.loads(lines[1])["input_ids"] == first.input_ids[0].tolist()

    original_forward = model.forward
    model.forward = _ForwardRaises().forward
    try:
        cached = _generate(model, tokenizer, cache_dir=str(tmp_path))
        assert cached.from_cache and torch.equal(cached.input_ids, first.input_ids) and cached.texts == first.texts
        with pytest.raises(AssertionError, match="must not run"):  # another setting is another cache entry
            _generate(model, tokenizer, cache_dir=str(tmp_path), greedy_tokens=2)
    finally:
        model.forward = original_forward

    (tmp_path / files[0]).write_text(lines[0] + "\n" + lines[1] + "\n", encoding="utf-8")  # truncated file
    regenerated = _generate(model, tokenizer, cache_dir=str(tmp_path))
    assert not regenerated.from_cache and torch.equal(regenerated.input_ids, first.input_ids)
    assert len((tmp_path / files[0]).read_text(encoding="utf-8").splitlines()) == NUM + 1
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")]


def test_invalid_arguments_name_the_value(model, tokenizer):
    with pytest.raises(ValueError, match="temperature=-1 is not allowed"):
        _generate(model, tokenizer, temperature=-1)
    with pytest.raises(ValueError, match="top_p=0 is not allowed"):
        _generate(model, tokenizer, top_p=0)
    with pytest.raises(ValueError, match="batch_size='many' is not allowed; allowed: an integer >= 1 or 'auto'"):
        _generate(model, tokenizer, batch_size="many")
    with pytest.raises(ValueError, match=r"max_length=10 is not allowed; allowed: None \(= seq_len\) or an integer >= "
                                         r"seq_len \(20\)"):
        _generate(model, tokenizer, max_length=10)


# ---------------------------------------------------------------------------------------------------------- mixed set
@pytest.mark.parametrize("use", ["reconstruction", "all"])
def test_calibration_set_mixes_real_and_self_generated_rows(use, tmp_path):
    tokenizer = make_position_tokenizer(3000)
    model = make_tiny_llama(len(tokenizer))
    config = PruningConfig(
        calibration=position_texts(3000, 100), num_samples=5, num_self_samples=3, seq_len=16, heldout_fraction=0.2,
        self_samples_use=use, self_gen_language=None, self_gen_batch_size=2, self_gen_cache_dir=str(tmp_path),
    )
    result = build_calibration_set(config, tokenizer, model, show_progress=False)
    assert result.input_ids.shape == (8, 16) and result.heldout_ids.shape == (1, 16)
    assert result.is_self_generated.tolist() == [False] * 5 + [True] * 3
    assert result.num_real == 5 and result.num_self_generated == 3
    expected_rows = list(range(5)) if use == "reconstruction" else list(range(8))
    assert result.statistics_rows().tolist() == expected_rows
    direct = generate_self_calibration(
        model, tokenizer, 3, 16, seed=config.seed, language=None, batch_size=2, show_progress=False, cache_dir=str(tmp_path)
    )
    assert direct.from_cache and torch.equal(result.input_ids[5:], direct.input_ids)
    assert json.loads(json.dumps(result.description))["self_generation"]["num"] == 3
    with pytest.raises(ValueError, match="needs the model"):
        build_calibration_set(config, tokenizer)


def test_self_only_calibration_set():
    tokenizer = make_bpe_tokenizer()
    model = make_tiny_llama(len(tokenizer))
    config = PruningConfig(
        calibration="self", num_samples=4, num_self_samples=2, seq_len=12, heldout_fraction=0.25, self_gen_language=None
    )
    result = build_calibration_set(config, tokenizer, model, show_progress=False)
    assert result.input_ids.shape == (6, 12) and result.is_self_generated.all()
    assert result.statistics_rows().tolist() == [0, 1, 2, 3]  # "self" replaces the real rows; extras only reconstruct
    assert result.heldout_ids.shape == (1, 12)
    assert result.description["heldout"]["source"] == "self"


def test_generated_ids_can_be_used_under_autograd(model, tokenizer):
    data = _generate(model, tokenizer)
    assert not data.input_ids.is_inference()
    model.zero_grad()
    model(data.input_ids[:2]).logits.float().mean().backward()  # an inference tensor would raise here
    assert model.model.embed_tokens.weight.grad is not None
    model.zero_grad()


def test_model_fingerprint_ignores_use_cache_but_not_weights(tokenizer):
    from hf_recon_prune.calibration.self_generation import model_fingerprint

    model = make_tiny_llama(len(tokenizer))
    before = model_fingerprint(model)
    model.config.use_cache = not model.config.use_cache  # the pruner flips it while it runs: the cache must still hit
    assert model_fingerprint(model) == before
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    assert model_fingerprint(model)["sha256"] != before["sha256"]


# ------------------------------------------------------------------- sampling, EOS, cache key, batch size
class _GenerateCalls:
    """Wraps model.generate: records the batch sizes and outputs of the sampling calls (those with processors)."""

    def __init__(self, model):
        self.model, self.real, self.batches, self.outputs = model, model.generate, [], []

    def __enter__(self):
        def generate(*args, **kwargs):
            output = self.real(*args, **kwargs)
            if kwargs.get("logits_processor") is not None:
                self.batches.append(output.shape[0])
                self.outputs.extend(output.cpu())
            return output

        self.model.generate = generate
        return self

    def __exit__(self, *exc):
        del self.model.generate


def _derive(seed, *parts):  # the documented seeding: sha256 of the JSON list, first 15 hex digits
    return int(hashlib.sha256(json.dumps([seed, *parts]).encode("utf-8")).hexdigest()[:15], 16)


def test_generation_is_seeded_and_does_not_depend_on_the_batch_size(model, tokenizer):
    rng = torch.get_rng_state()
    with _GenerateCalls(model) as calls:
        batched = _generate(model, tokenizer, batch_size=4)
    assert max(calls.batches) == 4 and len(calls.batches) == math.ceil(NUM / 4)  # batched, not one at a time
    assert torch.equal(rng, torch.get_rng_state())  # the caller's RNG is untouched
    for size in (1, 3, "auto"):
        other = _generate(model, tokenizer, batch_size=size)
        assert torch.equal(other.input_ids, batched.input_ids) and other.texts == batched.texts
    assert _generate(model, tokenizer, batch_size="auto").batch_size == sampling.CPU_BATCH_SIZE
    assert torch.equal(_generate(model, tokenizer).input_ids, batched.input_ids)
    assert not torch.equal(_generate(model, tokenizer, seed=1).input_ids, batched.input_ids)


def test_top_k_is_50_by_default_and_every_sampled_token_is_in_the_models_top_k(model, tokenizer):
    assert inspect.signature(generate_self_calibration).parameters["top_k"].default == 50
    assert PruningConfig().self_gen_top_k == 50
    greedy = 4
    for top_k, inside in ((50, True), (0, False)):
        data = _generate(model, tokenizer, num=8, stop_at_eos=False, top_k=top_k, greedy_tokens=greedy)
        with torch.no_grad():
            logits = model(data.input_ids).logits[:, :-1].float()  # reference: the model's next-token scores
        chosen = logits.gather(-1, data.input_ids[:, 1:, None])
        ranks = (logits > chosen + 1e-4).sum(-1)[:, greedy:]  # positions after the greedy prefix are sampled
        assert bool((ranks < 50).all()) == inside, top_k
        assert bool((ranks[:, :] == 0).all()) is False  # sampled, not greedy


def test_gumbel_noise_samples_from_the_softmax():
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]])
    draws = 20000
    keys = list(range(draws))
    noisy = sampling.SeededGumbelNoise(keys)(torch.zeros(draws, 7, dtype=torch.long), scores.expand(draws, -1))
    frequencies = torch.bincount(noisy.argmax(-1), minlength=5).double() / draws
    expected = torch.softmax(scores[0].double(), -1)
    assert torch.allclose(frequencies, expected, atol=0.015) and frequencies[4] == 0
    again = sampling.SeededGumbelNoise(keys[:5])(torch.zeros(5, 7, dtype=torch.long), scores.expand(5, -1))
    assert torch.equal(again, noisy[:5])  # a row's noise depends on its key and position only
    later = sampling.SeededGumbelNoise(keys[:5])(torch.zeros(5, 8, dtype=torch.long), scores.expand(5, -1))
    assert not torch.equal(later, noisy[:5])


def _eos_prone(tokenizer, bonus: float):
    model = make_tiny_llama(len(tokenizer), seed=2)
    eos = tokenizer.eos_token_id
    model.lm_head.register_forward_hook(
        lambda module, args, out: out.index_add(-1, torch.tensor([eos]), torch.full((*out.shape[:-1], 1), bonus)))
    return model


def test_samples_end_at_eos_short_ones_are_replaced_and_windows_are_seeded(tokenizer):
    """Reference: the raw samples generate() returned, in candidate order; each is cut at its first EOS, those
    shorter than seq_len are dropped, and the window of candidate i starts where the documented seeded draw says."""
    model, eos, max_length = _eos_prone(tokenizer, bonus=1.0), tokenizer.eos_token_id, 2 * LENGTH
    with _GenerateCalls(model) as calls:
        data = _generate(model, tokenizer, max_length=max_length)
    expected, short = [], 0
    for index, raw in enumerate(calls.outputs):
        is_eos = raw[5:] == eos  # the prompt is the start token and 4 greedy tokens
        length = 5 + int(is_eos.int().argmax()) if bool(is_eos.any()) else raw.shape[0]
        if len(expected) == NUM:
            break
        if length < LENGTH:
            short += 1
            continue
        generator = torch.Generator().manual_seed(_derive(0, "window", index))
        start = int(torch.randint(0, length - LENGTH + 1, (1,), generator=generator))
        assert 0 <= start <= max_length - LENGTH
        expected.append(raw[start:start + LENGTH])
    assert short > 0 and len(expected) == NUM  # the construction makes some samples end early
    assert torch.equal(data.input_ids, torch.stack(expected))
    assert data.num_short == short and data.num_candidates == NUM + short
    assert not (data.input_ids == eos).any()
    # Random windows: not all at the start, seeded (same again), and another seed moves them.
    full = _generate(_eos_prone(tokenizer, bonus=-1e4), tokenizer, max_length=max_length)
    assert torch.equal(full.input_ids, _generate(_eos_prone(tokenizer, bonus=-1e4), tokenizer,
                                                 max_length=max_length).input_ids)
    starts = [int(torch.randint(0, max_length - LENGTH + 1, (1,),
                                generator=torch.Generator().manual_seed(_derive(0, "window", i)))) for i in range(NUM)]
    assert len(set(starts)) > 1 and full.num_short == 0


def test_the_cache_key_holds_the_new_settings_but_not_the_batch_size(model, tokenizer, tmp_path):
    first = _generate(model, tokenizer, cache_dir=str(tmp_path))
    header = json.loads(open(first.cache_path, encoding="utf-8").readline())["header"]
    assert {"max_length": LENGTH, "stop_at_eos": True, "static_cache": False, "top_k": 50}.items() <= header.items()
    real_forward = model.forward
    model.forward = lambda *a, **k: (_ for _ in ()).throw(AssertionError("the model must not run"))
    try:
        again = _generate(model, tokenizer, cache_dir=str(tmp_path), batch_size=1)  # another batch size: a hit
        assert again.from_cache and torch.equal(again.input_ids, first.input_ids)
        for changed in (dict(top_k=10), dict(max_length=LENGTH + 5), dict(stop_at_eos=False)):
            with pytest.raises(AssertionError, match="must not run"):
                _generate(model, tokenizer, cache_dir=str(tmp_path), **changed)
    finally:
        model.forward = real_forward


def test_a_compile_backend_reaches_transformers_compile_config_and_the_cache_key(model, tokenizer, tmp_path):
    seen = []
    real = model.generate

    def generate(*args, **kwargs):
        config = kwargs["generation_config"]
        if kwargs.get("logits_processor") is not None:  # the sampling call, where the static cache applies
            seen.append((config.cache_implementation, getattr(config, "compile_config", None), bool(config.disable_compile)))
        return real(*args, **kwargs)

    model.generate = generate
    try:
        default = _generate(model, tokenizer, static_cache=True, cache_dir=str(tmp_path))
        calls_of_default = len(seen)
        graphs = _generate(model, tokenizer, static_cache=True, compile_backend="cudagraphs", cache_dir=str(tmp_path))
        calls_until_graphs = len(seen)
        inductor = _generate(model, tokenizer, static_cache=True, compile_backend="inductor")
    finally:
        del model.generate
    assert calls_of_default and seen[:calls_of_default] == [("static", None, True)] * calls_of_default  # no compile
    graph_calls = [(c, k.backend, k.mode, off) for c, k, off in seen[calls_of_default:calls_until_graphs]]
    assert graph_calls and set(graph_calls) == {("static", "cudagraphs", "default", False)}  # a mode: inductor's
    assert {(c, k.backend, k.mode, off) for c, k, off in seen[calls_until_graphs:]} == {
        ("static", "inductor", "reduce-overhead", False)}
    assert torch.equal(inductor.input_ids, default.input_ids)
    header = lambda data: json.loads(open(data.cache_path, encoding="utf-8").readline())["header"]  # noqa: E731
    assert "compile_backend" not in header(default)  # caches written before the option stay valid
    assert header(graphs)["compile_backend"] == "cudagraphs" and graphs.cache_path != default.cache_path
    assert torch.equal(default.input_ids, graphs.input_ids)  # on the CPU transformers compiles nothing
    allowed = r"compile_backend='nope' is not allowed; allowed: None \(no compile\) or one of \[.*'eager'"
    with pytest.raises(ValueError, match=allowed):
        _generate(model, tokenizer, static_cache=True, compile_backend="nope")
    with pytest.raises(ValueError, match="needs static_cache=True"):
        _generate(model, tokenizer, compile_backend="cudagraphs")


def test_default_self_generation_works_without_langdetect(monkeypatch):
    for name in ("langdetect", "langdetect.detector_factory", "langdetect.lang_detect_exception"):
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    language_module._factory.cache_clear()
    try:
        tokenizer = make_position_tokenizer(3000)
        model = make_tiny_llama(len(tokenizer))
        config = PruningConfig(calibration=position_texts(3000, 100), num_samples=4, num_self_samples=3, seq_len=16)
        assert config.self_gen_language is None
        result = build_calibration_set(config, tokenizer, model, show_progress=False)
        assert result.num_self_generated == 3
        generation = result.description["self_generation"]
        assert generation["top_k"] == 50 and generation["stop_at_eos"] and generation["max_length"] == 16
        with pytest.raises(ImportError, match="needs langdetect.*self_gen_language=None"):
            build_calibration_set(dataclasses.replace(config, self_gen_language="en"), tokenizer, model,
                                  show_progress=False)
    finally:
        language_module._factory.cache_clear()


def test_auto_batch_size_fills_half_the_free_memory_with_kv_cache():
    model = make_tiny_llama(400)
    config = model.config
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    assert sampling.kv_cache_bytes_per_token(model) == per_token
    per_sequence = per_token * 1024 + 64 * 400
    free = 3 * 2**30
    assert sampling.auto_batch_size(model, CPU, 1024, 400, free_bytes=free) == min(1024, int(0.5 * free // per_sequence))
    assert sampling.auto_batch_size(model, CPU, 1024, 400, free_bytes=per_sequence) == 1
    assert sampling.auto_batch_size(model, CPU, 1024, 400) == sampling.CPU_BATCH_SIZE
