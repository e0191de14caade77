"""The checks made before any block is touched: each refusal names the field or the module, and no weight changed."""

from __future__ import annotations

import copy
import time

import pytest
import torch
from torch import nn

from conftest import fail_pruning_after, make_tiny_model, random_ids
from hf_recon_prune import PruningConfig
from hf_recon_prune import preflight as preflight_module
from hf_recon_prune.architectures import resolve_layout
from hf_recon_prune.calibration import CalibrationSet
from hf_recon_prune.pruner import PreflightError, Pruner, PruningFailedError
from hf_recon_prune.sanitise import texts_marker


def _calibration(num: int = 8, seq_len: int = 16) -> CalibrationSet:
    return CalibrationSet(
        input_ids=random_ids(num, seq_len, seed=1), is_self_generated=torch.zeros(num, dtype=torch.bool),
        heldout_ids=random_ids(2, seq_len, seed=101), statistics_mask=torch.ones(num, dtype=torch.bool),
        description={"source": "test"},
    )


def _config(**overrides) -> PruningConfig:
    base = dict(method="sparsegpt", sparsity=0.5, reconstruction=["lr", "br"], num_samples=8, seq_len=16,
                sparsegpt_block_size=16, forward_batch_size=4, device="cpu", br_epochs=1, heldout_fraction=0.25)
    base.update(overrides)
    return PruningConfig(**base)


def _refused(model, config, match, calibration=None, tokenizer=None, **prune_kwargs):
    """Prune and expect a PreflightError matching ``match``; the model's weights must be exactly the ones before."""
    before = copy.deepcopy(model.state_dict())
    pruner = Pruner(model, config, tokenizer=tokenizer, calibration_data=calibration, show_progress=False)
    with pytest.raises(PreflightError, match=match) as caught:
        pruner.prune(**prune_kwargs)
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed although the run was refused"
    assert pruner.report is None
    return caught.value


# ---------------------------------------------------------------------------------------------------- the model
class Linear4bit(nn.Linear):
    """Stands in for bitsandbytes.nn.Linear4bit (an nn.Linear subclass, so the engine would select it)."""


Linear4bit.__module__ = "bitsandbytes.nn.modules"


def test_a_bitsandbytes_layer_is_refused_naming_the_module():
    model = make_tiny_model("llama")
    block = resolve_layout(model).blocks[1]
    dense = block.mlp.down_proj
    quantized = Linear4bit(dense.in_features, dense.out_features, bias=False)
    quantized.weight.data.copy_(dense.weight.data)
    block.mlp.down_proj = quantized
    _refused(model, _config(), r"decoder block 1 module 'mlp\.down_proj' is a Linear4bit from bitsandbytes",
             _calibration())


@pytest.mark.parametrize("how", ["quantization_config", "hf_quantizer", "load_in_8bit"])
def test_a_quantized_model_is_refused_up_front_not_at_save(how):
    model = make_tiny_model("llama")
    if how == "quantization_config":
        model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_4bit": True}
        match = r"LlamaForCausalLM is quantized \(quant_method='bitsandbytes'\)"
    elif how == "hf_quantizer":
        class GgufQuantizer:  # what transformers leaves on a model loaded from a GGUF file
            pass

        model.hf_quantizer = GgufQuantizer()
        match = r"is quantized \(GgufQuantizer\)"
    else:
        model.is_loaded_in_8bit = True
        match = r"is quantized \(is_loaded_in_8bit\)"
    error = _refused(model, _config(), match, _calibration())
    assert "Load the model without quantization" in str(error)


def test_integer_weights_are_refused_naming_the_parameter():
    model = make_tiny_model("llama")
    block = resolve_layout(model).blocks[0]
    block.self_attn.k_proj.weight = nn.Parameter(torch.zeros_like(block.self_attn.k_proj.weight, dtype=torch.int8),
                                                 requires_grad=False)
    _refused(model, _config(), r"decoder block 0 parameter 'self_attn\.k_proj\.weight' has dtype torch\.int8",
             _calibration())


def test_peft_adapters_are_refused_before_pruning():
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model("llama")
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    _refused(wrapped.base_model.model, _config(), r"PEFT adapter layer.*merge_and_unload", _calibration())


def test_a_model_left_partially_pruned_is_refused_for_a_fresh_run(monkeypatch):
    model = make_tiny_model("llama", num_layers=3)
    fail_pruning_after(monkeypatch, 7)  # fails in block 1
    with pytest.raises(PruningFailedError):
        Pruner(model, _config(), calibration_data=_calibration(), show_progress=False).prune()
    monkeypatch.undo()
    _refused(model, _config(), r"left partially pruned by a failed prune\(\).*Reload the dense model.*resume=True",
             _calibration())


# ---------------------------------------------------------------------------------------------------- calibration
def test_seq_len_beyond_the_models_positions_is_refused():
    model = make_tiny_model("llama")  # max_position_embeddings=128
    assert model.config.max_position_embeddings == 128
    _refused(model, _config(seq_len=129, calibration="default"),
             r"PruningConfig\.seq_len=129 is not allowed: LlamaForCausalLM has max_position_embeddings=128.*"
             r"allowed: seq_len <= 128")
    _refused(model, _config(), r"the calibration_data windows have 200 tokens.*max_position_embeddings=128",
             _calibration(seq_len=200))


def test_opt_learned_positions_are_checked_too():
    model = make_tiny_model("opt")
    _refused(model, _config(seq_len=4096, calibration="default"), r"seq_len=4096 is not allowed.*OPTForCausalLM")


def test_absurd_sizes_are_refused_in_seconds_naming_the_fields():
    model = make_tiny_model("llama")
    started = time.monotonic()
    _refused(model, _config(num_samples=10**12, calibration="default"),
             r"PruningConfig\.num_samples=1000000000000, num_self_samples=0 and seq_len=16 ask for "
             r"\d+ windows.*more than this machine's memory and free disk together")
    _refused(model, _config(num_self_samples=10**13, calibration="default"), r"num_self_samples=10000000000000")
    assert time.monotonic() - started < 30  # refused from the sizes, not after building anything


def test_a_saved_configs_calibration_marker_is_refused():
    model = make_tiny_model("llama")
    marker = texts_marker(["private text one", "private text two"])
    _refused(model, _config(calibration=marker),
             r"PruningConfig\.calibration is <user texts: 2, sha256 .*never saved.*allowed: the texts themselves")
    _refused(model, _config(calibration="default", heldout_source=marker), r"PruningConfig\.heldout_source is")


def test_module_filters_that_select_no_weight_are_refused_naming_the_weights():
    model = make_tiny_model("llama")
    _refused(model, _config(include_modules=["q_prj"]),
             r"no weight is left to prune: include_modules=\['q_prj'\] select none.*self_attn\.q_proj", _calibration())
    _refused(model, _config(exclude_modules=["proj"]), r"exclude_modules=\['proj'\] select none", _calibration())


def test_an_override_that_names_no_pruned_weight_is_refused():
    model = make_tiny_model("llama")
    _refused(model, _config(sparsity_overrides={r"self_attn\.q_proj": 0.3, "q_prj": 0.2}),
             r"sparsity_overrides: 'q_prj' match no weight that is pruned", _calibration())
    # a weight the module filters left out is no target for an override either
    _refused(model, _config(exclude_modules=["down_proj"], sparsity_overrides={"down_proj": 0.2}),
             r"'down_proj' match no weight that is pruned", _calibration())


def test_a_device_this_machine_lacks_is_refused_before_anything(monkeypatch):
    model = make_tiny_model("llama")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _refused(model, _config(device="cuda"), r"device='cuda': this machine has no cuda device", _calibration())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    _refused(model, _config(device="cuda:2"), r"device='cuda:2': this machine has 2 cuda device\(s\)", _calibration())


# ---------------------------------------------------------------------------------------------------- resources
def test_host_memory_below_the_plan_is_refused_before_any_block(monkeypatch):
    model = make_tiny_model("llama")
    monkeypatch.setattr(preflight_module, "host_memory", lambda: (1 << 10, 1 << 40))  # 1 KiB available
    error = _refused(model, _config(stream_location="cpu"),
                     r"the run needs about .* GiB of host memory \(activation streams .*\) and 0\.00 GiB are available",
                     _calibration())
    assert "stream_location='disk'" in str(error)
    monkeypatch.setenv(preflight_module.SKIP_RESOURCE_CHECK, "1")  # the way out when the estimate is wrong
    Pruner(model, _config(stream_location="cpu"), calibration_data=_calibration(), show_progress=False).prune()


def test_disk_below_the_plan_is_refused_naming_the_folder(monkeypatch, tmp_path):
    model = make_tiny_model("llama")
    monkeypatch.setattr(preflight_module, "_free_disk", lambda folder: 1 << 10 if folder else 1 << 40)
    _refused(model, _config(stream_location="disk", stream_folder=str(tmp_path / "streams")),
             rf"the disk-backed streams need about .* GiB on disk in {tmp_path / 'streams'}.*PruningConfig\.stream_folder",
             _calibration())
    _refused(model, _config(checkpoint_dir=str(tmp_path / "checkpoints")),
             r"the checkpoints need about .* on disk in .*checkpoints.*PruningConfig\.checkpoint_dir", _calibration())
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "streams").exists()


def test_the_checkpoints_disk_need_is_a_hand_count():
    from torch import nn

    blocks = [nn.Linear(4, 4), nn.Linear(4, 8, bias=False)]  # float32: 20 values (80 bytes), 32 values (128 bytes)
    # final + dense weights of both, a byte a value for the masks, two step folders holding the larger block
    assert preflight_module.checkpoint_bytes(blocks) == 2 * (80 + 128) + (20 + 32) + 2 * 128


def test_host_memory_reads_this_machine():
    available, total = preflight_module.host_memory()
    assert total is not None and total > 0 and 0 <= available <= total
