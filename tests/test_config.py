"""PruningConfig: validation messages, JSON round-trip, config.json storage."""

from __future__ import annotations

import json
import logging

import pytest

from hf_recon_prune import PruningConfig


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        (dict(sparsity=1.0), "sparsity=1.0", r"\[0, 1\)"),
        (dict(sparsity=-0.1), "sparsity=-0.1", r"\[0, 1\)"),
        (dict(method="obc"), "method='obc'", "'magnitude', 'wanda', 'sparsegpt'"),
        (dict(pattern="4:2"), "pattern='4:2'", "0 < N < M"),
        (dict(pattern="0:4"), "pattern='0:4'", "0 < N < M"),
        (dict(pattern="2-4"), "pattern='2-4'", "'unstructured' or 'N:M'"),
        (dict(pattern="2:4", sparsity=0.6), "sparsity=0.6", "1 - N/M = 0.5"),
        (dict(seq_len=0), "seq_len=0", "integer > 0"),
        (dict(num_samples=-3), "num_samples=-3", "integer > 0"),
        (dict(reconstruction=["lr", "xr"]), "reconstruction=", r"subset of \['lr', 'br', 'gp', 'cr'\]"),
        (dict(reconstruction=["gp"]), "reconstruction=", "only together with 'br'"),
        (dict(reconstruction_mode="qlora"), "reconstruction_mode='qlora'", "'full', 'lora'"),
        (dict(br_lr=0.0), "br_lr=0.0", "finite number > 0"),
        (dict(include_modules=["(unclosed"]), "include_modules='\\(unclosed'", "regular expressions"),
        (dict(device="gpu"), "device='gpu'", "'cpu', 'cuda', 'cuda:N'"),
        (dict(device="cuda:x"), "device='cuda:x'", "'cuda:N'"),
    ],
)
def test_bad_values_raise_naming_field_value_and_allowed(kwargs, field, allowed):
    with pytest.raises(ValueError) as info:
        PruningConfig(**kwargs)
    message = str(info.value)
    assert "PruningConfig." in message
    assert field.replace("\\", "") in message or field in message
    import re

    assert re.search(allowed, message), message


@pytest.mark.parametrize("kwargs", [dict(num_samples="128"), dict(sparsity="0.5"), dict(reconstruction=3), dict(pattern=24)])
def test_wrong_types_raise_type_error(kwargs):
    with pytest.raises(TypeError, match="PruningConfig"):
        PruningConfig(**kwargs)


def test_nm_patterns_parse():
    assert PruningConfig(pattern="2:4").nm == (2, 4)
    assert PruningConfig(pattern="4:8").nm == (4, 8)
    assert PruningConfig(pattern="1:4", sparsity=0.75).nm == (1, 4)
    assert PruningConfig().nm is None


def test_json_round_trip_and_equality(tmp_path):
    config = PruningConfig(method="wanda", pattern="2:4", reconstruction=["lr", "br", "gp", "cr"], num_self_samples=64,
                           calibration=["a text", "another"], include_modules=["mlp"])
    assert PruningConfig.from_dict(config.to_dict()) == config
    assert PruningConfig.from_dict(json.loads(config.to_json_string())) == config
    path = tmp_path / "pruning.json"
    config.to_json_file(path)
    assert PruningConfig.from_json_file(path) == config
    assert config != PruningConfig()
    assert "method='wanda'" in repr(config) and "pattern='2:4'" in repr(config)


def test_from_pretrained_reads_config_json(tmp_path):
    config = PruningConfig(sparsity=0.6)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "pruning_config": config.to_dict()}))
    assert PruningConfig.from_pretrained(tmp_path) == config
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="no 'pruning_config'"):
        PruningConfig.from_pretrained(tmp_path)


def test_unknown_keys_are_reported_and_never_used(caplog):
    data = PruningConfig().to_dict()
    data["__class__"] = "os.system"
    data["callback"] = "subprocess:run"
    with caplog.at_level(logging.WARNING):
        config = PruningConfig.from_dict(data)
    assert config == PruningConfig()
    assert "__class__" in caplog.text and "callback" in caplog.text
    assert not hasattr(config, "callback")


def test_from_dict_rejects_non_dict():
    with pytest.raises(TypeError, match="expects a dict"):
        PruningConfig.from_dict(["method", "wanda"])


def test_sparsegpt_block_size_must_hold_whole_nm_groups():
    with pytest.raises(ValueError, match=r"sparsegpt_block_size=126 .*a multiple of M=4 with pattern='2:4'"):
        PruningConfig(method="sparsegpt", pattern="2:4", sparsity=0.5, sparsegpt_block_size=126)
    PruningConfig(method="wanda", pattern="2:4", sparsity=0.5, sparsegpt_block_size=126)  # Wanda's groups are its own
    PruningConfig(method="sparsegpt", pattern="4:8", sparsity=0.5, sparsegpt_block_size=64)


def test_the_order_of_sparsity_overrides_survives_json_and_counts_for_equality(tmp_path):
    # the first matching pattern wins, so {"q": 0.2, "proj": 0.7} and {"proj": 0.7, "q": 0.2} are different runs
    config = PruningConfig(sparsity_overrides={r"self_attn\.q_proj": 0.2, "proj": 0.7})
    path = tmp_path / "config.json"
    config.to_json_file(path)
    for again in (PruningConfig.from_json_file(path), PruningConfig.from_dict(json.loads(config.to_json_string()))):
        assert list(again.sparsity_overrides) == [r"self_attn\.q_proj", "proj"]
        assert again == config
    assert config.to_dict()["sparsity_overrides"] == [[r"self_attn\.q_proj", 0.2], ["proj", 0.7]]
    assert PruningConfig(sparsity_overrides={"proj": 0.7, r"self_attn\.q_proj": 0.2}) != config
    # configs saved before the pairs (a dict) still load
    assert PruningConfig.from_dict({"sparsity_overrides": {"proj": 0.7}}).sparsity_overrides == {"proj": 0.7}


@pytest.mark.parametrize("pairs, error, match", [
    ([["proj", 0.7], ["proj", 0.2]], ValueError, "pattern 'proj' is given twice"),
    ([["proj"]], TypeError, r"\[\[pattern, sparsity\], \.\.\.\]"),
])
def test_override_pairs_are_checked(pairs, error, match):
    with pytest.raises(error, match=match):
        PruningConfig(sparsity_overrides=pairs)
