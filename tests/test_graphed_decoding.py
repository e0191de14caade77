"""Self-generation's own decoder (calibration/graphed_decoding.py), on the CPU: its samples equal generate()'s, the
capture seam (a stand-in that records without running, as a CUDA graph capture does), the fallbacks, the attention
function against a float64 reference. The real capture is checked on the GPU (tests/test_cuda.py)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest_calibration_helpers import make_bpe_tokenizer, make_tiny_llama
from hf_recon_prune import PruningConfig
from hf_recon_prune.calibration import generate_self_calibration, graphed_decoding, self_generation

NUM, LENGTH = 6, 20


@pytest.fixture(scope="module")
def tokenizer():
    return make_bpe_tokenizer()


def _eos_prone(tokenizer, bonus: float = 1.0):
    model = make_tiny_llama(len(tokenizer), seed=2).double()
    eos = tokenizer.eos_token_id
    model.lm_head.register_forward_hook(lambda module, args, out: out.index_add(
        -1, torch.tensor([eos]), torch.full((*out.shape[:-1], 1), bonus, dtype=out.dtype)))
    return model


@pytest.fixture
def fake_capture(monkeypatch):
    """Decoding "in graphs" on the CPU: the warm-up runs the step, the capture records it without running it (as
    a CUDA graph capture does) and the replay runs it."""
    calls = {"captures": 0}

    def capture(step, pool):
        calls["captures"] += 1
        return step, pool

    monkeypatch.setattr(self_generation, "resolve_decoding", lambda *args: (True, True))
    monkeypatch.setattr(graphed_decoding, "WINDOW", 8)  # several windows, so several graphs, in every run
    monkeypatch.setattr(graphed_decoding, "warm_up", lambda step: step())
    monkeypatch.setattr(graphed_decoding, "capture_step", capture)
    return calls


def _generate(model, tokenizer, **kwargs):
    settings = dict(seed=0, batch_size=4, show_progress=False)
    settings.update(kwargs)
    return generate_self_calibration(model, tokenizer, settings.pop("num", NUM), settings.pop("seq_len", LENGTH),
                                     **settings)


SETTINGS = {
    "defaults (top-k 50, until EOS)": {},
    "temperature and top-p": dict(temperature=0.7, top_p=0.9),
    "no filter": dict(top_k=0),
    "greedy": dict(temperature=0, stop_at_eos=False),
    "EOS suppressed": dict(stop_at_eos=False),
    "longer samples": dict(max_length=2 * LENGTH),
}


@pytest.mark.parametrize("settings", list(SETTINGS.values()), ids=list(SETTINGS))
def test_the_decoder_gives_generates_samples(tokenizer, fake_capture, monkeypatch, settings):
    """Reference: model.generate with the preallocated dynamic cache (float64, so that attending over the whole
    masked cache cannot flip an argmax), same candidates, same samples, same rows ended early."""
    model = _eos_prone(tokenizer)
    ours = _generate(model, tokenizer, **settings)
    assert ours.decoding == "cuda graphs" and fake_capture["captures"] >= 1
    with monkeypatch.context() as plain:
        plain.setattr(self_generation, "resolve_decoding", lambda *args: (False, False))
        reference = _generate(model, tokenizer, batch_size=3, **settings)
    assert reference.decoding == "dynamic cache"
    assert torch.equal(ours.input_ids, reference.input_ids) and ours.texts == reference.texts
    assert (ours.num_candidates, ours.num_short) == (reference.num_candidates, reference.num_short)
    if not settings or "max_length" in settings:
        assert reference.num_short > 0  # the construction makes some samples end at EOS
    assert model.config._attn_implementation == "sdpa"  # the attention implementation is put back


def test_sequences_are_padded_after_eos_and_stop_once_every_row_ended(tokenizer, monkeypatch):
    """A hand-checked run: every row ends at EOS within a few tokens (a large EOS bonus after the prompt), so the
    rows are pad after their EOS and the decoder stops at the first look after that (CHECK_EVERY steps)."""
    model = _eos_prone(tokenizer, bonus=50.0)
    monkeypatch.setattr(graphed_decoding, "CHECK_EVERY", 4)
    steps = []
    model.register_forward_pre_hook(lambda module, args, kwargs: steps.append(kwargs["input_ids"].shape[1]),
                                    with_kwargs=True)
    prompts = torch.tensor([[5, 6, 7], [8, 9, 10]])
    spec = graphed_decoding.SamplingSpec(keys=[1, 2], temperature=1.0, top_k=50, top_p=1.0, suppressed=[],
                                         eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        sequences, captured = graphed_decoding.sample_in_graphs(model, prompts, 30, spec, capture=False)
    assert not captured and sequences.shape == (2, 33)
    assert torch.equal(sequences[:, :3], prompts)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for row in sequences:
        first = int((row == eos).nonzero()[0])
        assert 3 <= first < 8 and (row[first + 1:] == pad).all()
    assert steps[0] == 3 and set(steps[1:]) == {1} and len(steps) == 1 + 4  # stopped at the first look


def test_each_attention_window_is_warmed_up_captured_once_and_replayed(tokenizer, fake_capture, monkeypatch):
    """Windows of 8 positions: steps whose context fits 8, 16, 24, 32 positions each get a warm-up, a capture (not
    run) and replays; the tokens equal those of one window over the whole cache, every step eager."""
    model = _eos_prone(tokenizer, bonus=-1e4)  # no EOS: every step runs
    windows, warm_ups = [], []
    monkeypatch.setattr(graphed_decoding, "warm_up", lambda step: (warm_ups.append(1), step()))
    real_forward = graphed_decoding._Decoder._forward
    monkeypatch.setattr(graphed_decoding._Decoder, "_forward",
                        lambda self, ids: (windows.append(self.positions.window), real_forward(self, ids)))
    prompts = torch.tensor([[5, 6, 7], [8, 9, 10]])
    spec = graphed_decoding.SamplingSpec(keys=[1, 2], temperature=1.0, top_k=50, top_p=1.0, suppressed=[],
                                         eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        windowed, captured = graphed_decoding.sample_in_graphs(model, prompts, 30, spec)
    assert captured and fake_capture["captures"] == 4 and len(warm_ups) == 4
    # the prompt, then steps whose last token sits at positions 3 .. 31: the capture itself runs nothing
    expected = [8] + [min(33, 8 * (last // 8 + 1)) for last in range(3, 32)]
    assert sorted(windows) == sorted(expected) and len(windows) == 30
    monkeypatch.setattr(graphed_decoding, "WINDOW", 256)
    with torch.inference_mode():
        whole, _ = graphed_decoding.sample_in_graphs(model, prompts, 30, spec, capture=False)
    assert torch.equal(windowed, whole)


def test_a_capture_that_fails_leaves_the_run_eager_with_the_same_samples(tokenizer, fake_capture, monkeypatch):
    model = _eos_prone(tokenizer)
    graphed = _generate(model, tokenizer, max_length=2 * LENGTH)
    failures = []

    def failing(step, pool):
        failures.append(1)
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(graphed_decoding, "capture_step", failing)
    eager = _generate(model, tokenizer, max_length=2 * LENGTH)
    assert torch.equal(graphed.input_ids, eager.input_ids)
    assert eager.decoding.startswith("static cache, eager") and len(failures) == 1  # not tried again next batch


def test_an_attention_the_decoder_lacks_falls_back_to_generate(tokenizer, fake_capture):
    """The attention function raises UnsupportedModel at the prompt's forward (here made to by a hook): the batch
    and the rest go through generate() with transformers' static cache, the samples are the same."""
    model = _eos_prone(tokenizer)
    reference = _generate(model, tokenizer)

    def refuse(module, args):
        if module.config._attn_implementation == graphed_decoding.DECODE_ATTENTION:
            raise graphed_decoding.UnsupportedModel("attention with 'softcap'")

    model.model.layers[0].self_attn.register_forward_pre_hook(refuse)
    data = _generate(model, tokenizer)
    assert data.decoding == "static cache" and torch.equal(data.input_ids, reference.input_ids)
    assert model.config._attn_implementation == "sdpa"


def _reference_attention(query, key, value, allowed, scale):
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = torch.einsum("bhqd,bhkd->bhqk", query, key) * scale
    weights = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
    return torch.einsum("bhqk,bhkd->bqhd", weights, value)


@pytest.mark.parametrize("queries", [1, 3])
def test_decode_attention_matches_a_float64_reference(queries):
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(shape, generator=generator, dtype=torch.float64)
                         for shape in ((2, 6, queries, 8), (2, 2, 7, 8), (2, 2, 7, 8)))
    positions = torch.arange(queries) + 2  # the queries sit at positions 2.., the cache holds 7 (the rest unfilled)
    allowed = (torch.arange(7)[None, :] <= positions[:, None]).view(1, 1, queries, 7)
    output, weights = graphed_decoding.decode_attention(None, query, key, value, allowed, scaling=0.3)
    assert weights is None and output.shape == (2, queries, 6, 8)
    torch.testing.assert_close(output, _reference_attention(query, key, value, allowed, 0.3), rtol=1e-12, atol=1e-12)


def test_decode_attention_refuses_what_it_does_not_implement():
    query, key, value = torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 5, 4), torch.zeros(1, 2, 5, 4)
    with pytest.raises(graphed_decoding.UnsupportedModel, match="softcap"):
        graphed_decoding.decode_attention(None, query, key, value, None, softcap=30.0)
    with pytest.raises(graphed_decoding.UnsupportedModel, match="sliding-window attention"):
        graphed_decoding.decode_attention(None, query, key, value, None, sliding_window=4)
    graphed_decoding.decode_attention(None, query, key, value, None, sliding_window=5)  # the window covers all


def test_which_models_the_decoder_takes(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = make_tiny_llama(len(tokenizer))
    assert graphed_decoding.unsupported_reason(model) is None
    model.config._attn_implementation_internal = "flash_attention_2"
    assert "attention implementation ['flash_attention_2']" in graphed_decoding.unsupported_reason(model)
    model.config._attn_implementation_internal = "sdpa"
    model.model.layers[0]._hf_hook = object()
    assert "Accelerate hooks" in graphed_decoding.unsupported_reason(model)
    del model.model.layers[0]._hf_hook
    model.lm_head.to(torch.float64).to("meta")
    assert "not on one device" in graphed_decoding.unsupported_reason(model)
    config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, use_sliding_window=True, sliding_window=4,
                         max_window_layers=1, layer_types=["full_attention", "sliding_attention", "sliding_attention"])
    assert "not plain full attention" in graphed_decoding.unsupported_reason(Qwen2ForCausalLM(config))


def test_the_static_cache_setting_resolves_per_device(tokenizer, monkeypatch):
    model, cpu, cuda = make_tiny_llama(len(tokenizer)), torch.device("cpu"), torch.device("cuda")
    resolve = graphed_decoding.resolve_decoding
    assert [resolve(model, cpu, setting, None) for setting in ("auto", True, False)] == [
        (False, False), (False, True), (False, False)]
    assert [resolve(model, cuda, setting, None) for setting in ("auto", True, False)] == [
        (True, True), (True, True), (False, False)]
    assert resolve(model, cuda, True, "inductor") == (False, True)  # a compile backend: transformers decodes
    monkeypatch.setattr(graphed_decoding, "unsupported_reason", lambda model: "sliding window")
    assert [resolve(model, cuda, setting, None) for setting in ("auto", True)] == [(False, False), (False, True)]
    with pytest.raises(ValueError, match=r"static_cache='yes' is not allowed; allowed: 'auto'"):
        resolve(model, cpu, "yes", None)
    with pytest.raises(ValueError, match=r"self_gen_static_cache='graphs' is not allowed.*True, False or 'auto'"):
        PruningConfig(self_gen_static_cache="graphs")
    assert PruningConfig().self_gen_static_cache == "auto"


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "opt", "gpt_neox", "gemma"])
def test_the_decoder_gives_generates_samples_for_every_family(tokenizer, fake_capture, monkeypatch, family):
    """Each model family's own attention, positions and cache calls through the decoder (windows of 8 positions)
    against generate() with the dynamic cache, in float64."""
    from conftest import make_tiny_model

    model = make_tiny_model(family, dtype=torch.float64)
    assert graphed_decoding.unsupported_reason(model) is None
    ours = _generate(model, tokenizer, stop_at_eos=False)
    monkeypatch.setattr(self_generation, "resolve_decoding", lambda *args: (False, False))
    reference = _generate(model, tokenizer, stop_at_eos=False, batch_size=3)
    assert ours.decoding == "cuda graphs" and torch.equal(ours.input_ids, reference.input_ids)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "deepseek_v3", "qwen2_moe", "phi3", "gpt2"])
def test_the_decoder_gives_generates_samples_for_mixture_of_experts_models(tokenizer, fake_capture, monkeypatch,
                                                                            family):
    """Routed experts (float32: their grouped matrix products take no float64), DeepSeek-V3's latent attention,
    Phi-3's fused projections and GPT-2's learned positions. Hybrid models (linear attention, sliding windows) go to
    generate() instead."""
    from test_moe import make_model

    model = make_model(family).eval()
    ours = _generate(model, tokenizer, stop_at_eos=False)
    monkeypatch.setattr(self_generation, "resolve_decoding", lambda *args: (False, False))
    reference = _generate(model, tokenizer, stop_at_eos=False, batch_size=3)
    assert ours.decoding == "cuda graphs" and torch.equal(ours.input_ids, reference.input_ids)


@pytest.mark.parametrize("family", ["gpt_oss", "qwen3_next", "jamba"])
def test_models_with_other_attention_layers_are_left_to_generate(family):
    from test_moe import make_model

    assert "not plain full attention" in graphed_decoding.unsupported_reason(make_model(family))


def test_generating_on_the_cpu_with_a_gpu_at_hand_says_to_move_the_model(tokenizer, monkeypatch, caplog):
    model = make_tiny_llama(len(tokenizer))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level("WARNING", logger="hf_recon_prune.calibration.self_generation"):
        _generate(model, tokenizer, num=1, seq_len=8)
    assert "runs where the model is, on the CPU, though a GPU is available" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    caplog.clear()
    with caplog.at_level("WARNING", logger="hf_recon_prune.calibration.self_generation"):
        _generate(model, tokenizer, num=1, seq_len=8)
    assert "GPU is available" not in caplog.text
