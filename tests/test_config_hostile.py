"""Hostile configuration input: PruningConfig.from_dict / from_json_file / from_pretrained on arbitrary JSON either
return a config or raise ValueError / TypeError naming the field; nothing is imported, opened or evaluated."""

from __future__ import annotations

import builtins
import dataclasses
import importlib
import io
import json
import math
import os
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_recon_prune import PruningConfig

FIELDS = [f.name for f in dataclasses.fields(PruningConfig)]

NASTY_STRINGS = [
    "os.system", "os:system", "subprocess.Popen", "evil_module_xyz:thing", "__import__('os').system('true')",
    "../../etc/passwd", "/etc/passwd", "~/.ssh/id_rsa", "file:///etc/passwd", "{0.__class__}", "{config.__init__}",
    "%s%s%s%n", "${HOME}", "$(touch /tmp/pwned)", "\x00", "a" * 10_000, "2:4", "0:0", "9" * 5000 + ":4", "lr",
    "unstructured", "sparsegpt", "wanda", "magnitude", "auto", "cpu", "cuda", "meta", "disk", "float32", "1e999GiB",
    "16GiB", "-1", "NaN", "(unclosed", "a{4294967296}", "(?P<x", "*", "self", "c4", "default",
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, -(2**63) - 1, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 0.5, 0.75, 1.0, -0.0, 1e-300, 1e308, math.inf, -math.inf, math.nan]),
    st.text(max_size=40),
    st.sampled_from(NASTY_STRINGS),
)
json_values = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=5),
                               st.dictionaries(st.text(max_size=10), children, max_size=5)),
    max_leaves=12,
)
# Values that pass the type check of some field, so that the value checks and the cross-field rules run too.
plausible = st.one_of(
    st.sampled_from(["magnitude", "wanda", "sparsegpt", "unstructured", "2:4", "4:8", "1:4", "full", "lora",
                     "reconstruction", "all", "auto", "off", "device", "cpu", "disk", "bfloat16", "float16",
                     "float32", "c4", "default", "self", "en", "500MB"]),
    st.lists(st.sampled_from(["lr", "br", "gp", "cr", "xr", "mlp", "self_attn", "(", ""]), max_size=5),
    st.floats(min_value=-0.5, max_value=1.5),
    st.integers(min_value=-3, max_value=300),
)
strings = st.one_of(st.text(max_size=20), st.sampled_from(NASTY_STRINGS), plausible.filter(lambda v: isinstance(v, str)))
_BY_TYPE = {
    "str": strings,
    "int": st.one_of(st.integers(min_value=-3, max_value=300), st.integers()),
    "float": st.one_of(st.floats(min_value=-0.5, max_value=1.5), st.floats(), st.integers(min_value=-2, max_value=2)),
    "bool": st.booleans(),
    "list[str]": st.lists(st.one_of(strings, st.sampled_from(["lr", "br", "gp", "cr"])), max_size=5),
    "dict[str,float]": st.dictionaries(st.one_of(strings, st.sampled_from(["mlp", r"self_attn\.q_proj", "("])),
                                       st.floats(min_value=-0.5, max_value=1.5), max_size=3),
}


def _typed(annotation) -> st.SearchStrategy:
    """Values of the field's own type(s), so that the value checks and the cross-field rules run, not only types."""
    spec = str(annotation).replace(" ", "")
    options = []
    if spec.startswith("Optional["):
        options.append(st.none())
        spec = spec[len("Optional["):-1]
    parts = spec[len("Union["):-1].split(",", 1) if spec.startswith("Union[") else [spec]
    options.extend(_BY_TYPE[part] for part in parts)
    return st.one_of(options)


typed_dicts = st.fixed_dictionaries(
    {}, optional={f.name: _typed(f.type) for f in dataclasses.fields(PruningConfig)}
)
random_dicts = st.dictionaries(
    st.one_of(st.sampled_from(FIELDS), st.sampled_from(["hf_recon_prune_version", "__class__", "__init__",
                                                        "validate", "trust_remote_code", "_check_types"]),
              st.text(max_size=12)),
    st.one_of(json_values, plausible),
    max_size=12,
)
config_dicts = st.one_of(typed_dicts, random_dicts)


def _check_result(data):
    try:
        config = PruningConfig.from_dict(data)
    except (ValueError, TypeError) as error:
        message = str(error)
        assert message and len(message) < 5000, message[:300]
        return None
    # Whatever is accepted behaves like a config: it prints, serialises and round-trips.
    assert isinstance(config, PruningConfig)
    repr(config)
    assert PruningConfig.from_dict(json.loads(config.to_json_string())) == config
    return config


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config_dicts)
def test_from_dict_on_generated_input_returns_a_config_or_raises_value_or_type_error(data):
    _check_result(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(json_values, config_dicts))
def test_from_dict_on_any_json_value_never_fails_otherwise(data):
    _check_result(data)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.one_of(json_values, config_dicts, st.fixed_dictionaries({"pruning_config": st.one_of(json_values,
                                                                                               config_dicts)})))
def test_from_json_file_and_from_pretrained_on_any_json(tmp_path, data):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    for load in (PruningConfig.from_json_file, PruningConfig.from_pretrained):
        try:
            assert isinstance(load(str(path)), PruningConfig)
        except (ValueError, TypeError):
            pass


@pytest.mark.parametrize("text", ["", "{", "[" * 100_000 + "]" * 100_000, "\xff\xfe", "NaN", '{"pruning_config": 1}',
                                  '{"a": ' * 50_000 + "1" + "}" * 50_000])
def test_broken_json_files_raise_value_or_type_error(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_bytes(text.encode("utf-8", "surrogateescape") if text != "\xff\xfe" else b"\xff\xfe\x00")
    for load in (PruningConfig.from_json_file, PruningConfig.from_pretrained):
        with pytest.raises((ValueError, TypeError)):
            load(str(path))


def test_deeply_nested_values_are_refused_without_recursion_errors():
    nested: list = []
    for _ in range(100_000):
        nested = [nested]
    with pytest.raises(TypeError, match="PruningConfig.reconstruction=.*cannot be printed|PruningConfig.reconstruction"):
        PruningConfig.from_dict({"reconstruction": nested})


@pytest.mark.parametrize("data, field", [
    ({"num_samples": 10**5000}, "num_samples"),
    ({"seed": 2**64}, "seed"),
    ({"br_lr": 10**400}, "br_lr"),
    ({"self_gen_temperature": 10**400}, "self_gen_temperature"),
    ({"max_device_memory": "9" * 400 + "GiB"}, "max_device_memory"),
    ({"pattern": "9" * 5000 + ":4"}, "pattern"),
    ({"include_modules": ["a{4294967296}"]}, "include_modules"),
    ({"checkpoint_dir": "   "}, "checkpoint_dir"),
])
def test_huge_or_malformed_values_name_the_field(data, field):
    with pytest.raises(ValueError, match=rf"PruningConfig\.{field}="):
        PruningConfig.from_dict(data)


# ---------------------------------------------------------------------------------------------------- no code, no files
@pytest.fixture
def nothing_imported_or_opened(monkeypatch):
    """Fail loudly if anything imports a module that is not loaded yet, or opens a file."""
    before = set(sys.modules)
    real_import = builtins.__import__

    def guarded_import(name, *args, **kwargs):
        if name.split(".")[0] not in sys.modules and name not in sys.modules:
            raise AssertionError(f"tried to import {name!r}")
        return real_import(name, *args, **kwargs)

    def no_open(*args, **kwargs):
        raise AssertionError(f"tried to open {args[:1]!r}")

    monkeypatch.setattr(builtins, "__import__", guarded_import)
    monkeypatch.setattr(importlib, "import_module", lambda name, *a, **k: no_open(name))
    monkeypatch.setattr(builtins, "open", no_open)
    monkeypatch.setattr(io, "open", no_open)
    monkeypatch.setattr(os, "open", no_open)
    yield
    assert not set(sys.modules) - before


@pytest.mark.parametrize("data", [
    {"method": "os.system"},
    {"method": "evil_module_xyz:thing"},
    {"reconstruction_mode": "evil_module_xyz.Trainer"},
    {"stream_location": "evil_module_xyz"},
    {"autocast_dtype": "torch.load"},
    {"pattern": "{0.__class__.__mro__}"},
    {"device": "%s%n"},
])
def test_a_config_naming_a_module_is_rejected_without_importing_it(nothing_imported_or_opened, data):
    with pytest.raises(ValueError, match="PruningConfig"):
        PruningConfig.from_dict(data)
    assert "evil_module_xyz" not in sys.modules


@pytest.mark.parametrize("data", [
    # ``calibration`` legitimately names a dataset, a local file or folder: from_dict keeps it as data and never
    # opens it. Only the calibration loader reads it, and only when prune() runs and asks for calibration text.
    {"calibration": "evil_module_xyz:thing"},
    {"calibration": "../../etc/passwd"},
    {"calibration": "/etc/passwd", "heldout_source": "~/.ssh/id_rsa"},
    {"self_gen_cache_dir": "/etc", "stream_folder": "../../", "checkpoint_dir": "/proc/self"},
    {"self_gen_language": "{0.__class__.__mro__}", "include_modules": ["os.system"]},
])
def test_names_and_paths_in_fields_stay_data(nothing_imported_or_opened, data):
    config = PruningConfig.from_dict(data)
    for key, value in data.items():
        assert getattr(config, key) == value  # kept verbatim: not formatted, resolved or evaluated
    assert "evil_module_xyz" not in sys.modules


def test_unknown_keys_never_reach_attributes(nothing_imported_or_opened):
    config = PruningConfig.from_dict({"__class__": "os.system", "validate": "x", "trust_remote_code": True,
                                      "__init__": None, "_check_types": 1})
    assert type(config) is PruningConfig and callable(config.validate) and callable(config._check_types)
    assert not hasattr(config, "trust_remote_code")


# ---------------------------------------------------------------------------------------------------- remote code
def test_trust_remote_code_stays_off_unless_the_user_passes_it(tmp_path):
    from hf_recon_prune.cli import _config_from_args, build_parser

    saved = tmp_path / "recipe.json"
    saved.write_text(json.dumps({"method": "wanda", "trust_remote_code": True}), encoding="utf-8")
    parser = build_parser()
    args = parser.parse_args(["prune", "--output", str(tmp_path / "out"), "--config", str(saved)])
    assert args.trust_remote_code is False  # a config file cannot switch it on
    assert _config_from_args(args).method == "wanda"
    assert parser.parse_args(["prune", "--output", "o", "--trust-remote-code"]).trust_remote_code is True


def test_calibration_datasets_are_loaded_without_remote_code(monkeypatch):
    import datasets

    from hf_recon_prune.calibration.sources import load_texts

    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append(kwargs)
        raise FileNotFoundError("no network in this test")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(Exception):
        load_texts("someone/evil-dataset-with-a-script")
    assert calls and all(not kwargs.get("trust_remote_code") for kwargs in calls)
