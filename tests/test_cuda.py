"""The GPU suite: every place where the package moves tensors between the host and a CUDA device, checked on one.

CI has no GPU, so these tests are skipped there; run them on a GPU machine with ``python -m pytest -m cuda`` before
merging a change to code that runs on the GPU (docs/contributing.md). They take a few minutes on one H200.

The places covered, each by at least one test below:
    * activation streams on the device, in pinned CPU memory (with and without copies overlapped on a side stream),
      in pageable CPU memory and in a memory-mapped file: loads of row slices and gathered rows, stores of results
      (``offload.StreamRows``), through the whole engine for LR, BR+GP and BR+GP+CR, full and LoRA, on two families;
    * BR's row indices moved to the device once an epoch when the streams live there (``block_trainer``);
    * the first block's inputs captured into a CPU stream from embeddings on the GPU (``capture.py``);
    * blocks moved onto the device and back (``offload.BlockPlacement``): a model in CPU memory, one dispatched by
      Accelerate across the GPU and the CPU, with disk offload, and ``accelerate.cpu_offload``; every such copy, the
      masks' and the checkpoints' through the pinned slots of ``offload.PinnedStaging``, in 4-KiB pieces (a fixture
      of this file), and a model in CPU memory with and without them;
    * masks copied out to the CPU (``Pruner.masks``), BR's pinned revert snapshot, checkpoints written from GPU
      tensors and read back into a resumed run (also into the same GPU model a failure inside a block left changed);
    * the tensor-core Hessian accumulation and the batched SparseGPT solve, on CUDA tensors;
    * compiled BR against eager BR; the out-of-memory fallbacks (an injected ``torch.OutOfMemoryError``);
    * self-generated calibration data (seeded sampling on the GPU) and perplexity evaluation.

Runs that differ only in where the streams live do the same arithmetic on the same bytes: the device computes every
step, and a stream location changes only where the bytes wait between steps. The tiny models use eager attention
(deterministic kernels), so their masks must be identical; weights are compared within one bfloat16 rounding
(rtol 2**-8) and an absolute 1e-6, far below the change of a single corrupted row (the bug this suite was written
for changed 179 of 192 rows wholesale).
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import transformers

import hf_recon_prune.offload as offload
from conftest import fail_pruning_after, make_tiny_model, random_ids
from hf_recon_prune import PruningConfig
from hf_recon_prune.calibration import CalibrationSet
from hf_recon_prune.pruner import Pruner
from test_pruner import _config as _cpu_config

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU suite needs a CUDA device")]

BF16_RTOL, WEIGHT_ATOL = 2.0 ** -8, 1e-6
RECIPES = {"lr": ["lr"], "br+gp": ["lr", "br", "gp"], "br+gp+cr": ["lr", "br", "gp", "cr"]}
LOCATIONS = ("device", "cpu", "cpu-overlap", "cpu-pageable", "disk")


@pytest.fixture(autouse=True)
def _stage_every_tensor_in_small_pieces(monkeypatch):
    """The tiny models' tensors are far below the size at which placement stages copies through pinned slots, and
    below one slot: staging everything in 4 KiB pieces runs the whole suite through the pipeline's seams."""
    monkeypatch.setattr(offload, "STAGING_MIN_BYTES", 0)
    monkeypatch.setattr(offload, "STAGING_SLOT_BYTES", 4096)


def _model(family: str, num_layers: int = 3, dtype=torch.float32):
    model = make_tiny_model(family, num_layers=num_layers, dtype=dtype)
    model.config._attn_implementation = "eager"  # deterministic kernels: location changes nothing (docstring)
    return model


def _calibration(num: int = 16, seq_len: int = 24, heldout: int = 4) -> CalibrationSet:
    return CalibrationSet(
        input_ids=random_ids(num, seq_len, seed=3), is_self_generated=torch.zeros(num, dtype=torch.bool),
        heldout_ids=random_ids(heldout, seq_len, seed=4), statistics_mask=torch.ones(num, dtype=torch.bool),
        description={"source": "test"},
    )


def _config(**overrides) -> PruningConfig:
    """test_pruner's tiny-run config on the GPU: more rows, BR on, not compiled (one test compiles)."""
    base = dict(num_samples=16, seq_len=24, forward_batch_size=3, reconstruction=["lr", "br", "gp"], br_epochs=2,
                br_batch_size=4, br_lr=1e-3, lora_rank=4, device="cuda", compile_blocks=False)
    return _cpu_config(**{**base, **overrides})


def _located(location: str, monkeypatch, tmp_path) -> dict:
    """Config fields (and module switches) that put the streams at ``location``."""
    if location == "cpu-overlap":
        monkeypatch.setattr(offload, "OVERLAP_COPIES", True)
        return {"stream_location": "cpu"}
    if location == "cpu-pageable":
        monkeypatch.setattr(offload, "PIN_CPU_STREAMS", False)
        return {"stream_location": "cpu"}
    if location == "disk":
        return {"stream_location": "disk", "stream_folder": str(tmp_path / "streams")}
    return {"stream_location": location}


def _prune(model, **overrides):
    pruner = Pruner(model, _config(**overrides), calibration_data=_calibration(), show_progress=False)
    report = pruner.prune()
    return pruner, report


def _cpu_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}


def _assert_same_result(pruner, model, reference) -> None:
    ref_masks, ref_state = reference
    assert pruner.masks.keys() == ref_masks.keys() and ref_masks
    for name, mask in pruner.masks.items():
        assert mask.device.type == "cpu"
        assert torch.equal(mask, ref_masks[name]), f"{name}: {int((mask != ref_masks[name]).sum())} entries differ"
    state = _cpu_state(model)
    for name, value in state.items():
        torch.testing.assert_close(value, ref_state[name], rtol=BF16_RTOL, atol=WEIGHT_ATOL, msg=name)


def _assert_same_optimisation(pruner, report, model, reference) -> None:
    """For runs whose arithmetic differs in rounding only (compiled kernels, gradients accumulated over
    micro-batches), on one block, so the masks are chosen before BR and must be identical. Adam divides each step by
    the gradient's running magnitude, so a weight whose gradient is near zero can take lr-sized steps either way on
    a rounding difference (on the H200 about 5 % of the weights move apart by more than 1e-5). So the test is on the
    optimisation as a whole: the two runs' weights differ by under 10 % of the distance BR moved them from the
    LR-only weights (Frobenius norms over the block), and the block's error after BR agrees to 1e-3."""
    ref_pruner, ref_report, ref_model = reference
    for name, mask in pruner.masks.items():
        assert torch.equal(mask, ref_pruner.masks[name]), name
    lr_model = _model("llama", num_layers=1).cuda()
    _prune(lr_model, reconstruction=["lr"], stream_location="cpu")
    mine, theirs, lr_only = _cpu_state(model), _cpu_state(ref_model), _cpu_state(lr_model)
    apart = sum(float((mine[k] - theirs[k]).double().square().sum()) for k in mine) ** 0.5
    moved = sum(float((theirs[k] - lr_only[k]).double().square().sum()) for k in mine) ** 0.5
    assert moved > 0 and apart < 0.1 * moved, (apart, moved)
    for ours, ref in zip(report.blocks, ref_report.blocks):
        assert ours.error_after["calibration"] == pytest.approx(ref.error_after["calibration"], rel=1e-3)


_REFERENCES: dict[tuple, tuple] = {}


def _reference(family: str, recipe: str, mode: str) -> tuple:
    """The run with the streams on the device, once per (family, recipe, mode)."""
    key = (family, recipe, mode)
    if key not in _REFERENCES:
        model = _model(family).cuda()
        pruner, _ = _prune(model, reconstruction=RECIPES[recipe], reconstruction_mode=mode, stream_location="device")
        _REFERENCES[key] = ({k: v.clone() for k, v in pruner.masks.items()}, _cpu_state(model))
    return _REFERENCES[key]


# ---------------------------------------------------------------------------------------------------- StreamRows
def _slow_values(rows: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Values that are ready only after a long GPU kernel: a copy that does not wait for them reads garbage."""
    big = torch.randn(4096, 4096, device="cuda")
    for _ in range(8):
        big = big @ big / 64.0
    noise = torch.randn(rows, *shape, device="cuda")
    return noise + big[:1, :1] * 0.0  # depends on the kernels above, equals the noise


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("destination", ["device", "pinned", "pageable", "disk"])
@pytest.mark.parametrize("rows_kind", ["slice", "index"])
def test_stream_rows_store_and_load_every_location(destination, overlap, rows_kind, monkeypatch, tmp_path):
    monkeypatch.setattr(offload, "OVERLAP_COPIES", overlap)
    shape, total = (33, 40), 48
    if destination == "device":
        out = torch.zeros(total, *shape, device="cuda")
    elif destination == "disk":
        out = offload._disk_tensor((total, *shape), torch.float32, str(tmp_path))
    else:
        out = torch.zeros(total, *shape, pin_memory=destination == "pinned")
    transfers = offload.StreamRows(torch.device("cuda"))
    expected = torch.zeros(total, *shape)
    order = torch.randperm(total, generator=torch.Generator().manual_seed(0))
    for start in range(0, total, 8):
        rows = slice(start, start + 8) if rows_kind == "slice" else order[start:start + 8]
        value = _slow_values(8, shape).to(torch.bfloat16)  # stored with a dtype conversion, as bf16 streams are
        transfers.store(out, rows, value)
        expected[rows] = value.float().cpu()
    transfers.finish()
    assert torch.equal(out.cpu(), expected)
    for start in range(0, total, 8):  # loads: each the rows asked for, with the next rows copied ahead
        rows = slice(start, start + 8) if rows_kind == "slice" else order[start:start + 8]
        ahead = None if start + 8 >= total else (slice(start + 8, start + 16) if rows_kind == "slice"
                                                  else order[start + 8:start + 16])
        loaded = transfers.load(out, rows, ahead)
        assert loaded.device.type == "cuda" and torch.equal(loaded.cpu(), expected[rows])


def test_stream_factory_pins_cpu_streams_and_can_be_told_not_to(monkeypatch):
    device = offload.execution_device("cuda")
    assert device == torch.device("cuda", torch.cuda.current_device())
    assert offload.StreamFactory("cpu", device, torch.float32)((2, 3, 4)).is_pinned()
    monkeypatch.setattr(offload, "PIN_CPU_STREAMS", False)
    assert not offload.StreamFactory("cpu", device, torch.float32)((2, 3, 4)).is_pinned()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.bool])
def test_pinned_staging_round_trips_on_cuda_in_stream_order(dtype):
    staging = offload.PinnedStaging(torch.device("cuda"))
    assert staging.enabled
    generator = torch.Generator().manual_seed(0)
    for step, shape in enumerate([(257, 33), (4096,), (), (7, 3, 5), (1000, 10)]):
        host = (torch.rand(shape, generator=generator) > 0.5 if dtype == torch.bool
                else torch.randn(shape, generator=generator).to(dtype))
        on_device = staging.to_device(host)
        assert on_device.device.type == "cuda" and torch.equal(on_device.cpu(), host)
        # A kernel queued just before the copy out: the copy must see its result, not the bytes before it.
        changed = ~on_device if dtype == torch.bool else on_device * 3 + step
        back = staging.to_host(changed)
        assert back.device.type == "cpu" and not back.is_pinned()
        assert torch.equal(back, changed.cpu())
    pinned = torch.randn(300, pin_memory=True)
    assert torch.equal(staging.to_device(pinned).cpu(), pinned)  # already pinned: a plain copy


@pytest.mark.parametrize("switch, recipe, num_layers", [
    ("PINNED_STAGING", "br+gp", 3),  # blocks and masks through the reusable pinned slots, or plain copies
    ("OVERLAP_PLACEMENT", "lr", 4),  # blocks loaded ahead and written back on the worker's stream, or in turn
    ("OVERLAP_PLACEMENT", "br+gp+cr", 4),
])
def test_a_model_in_cpu_memory_gives_the_same_result_whichever_way_its_blocks_move(switch, recipe, num_layers,
                                                                                   monkeypatch):
    """Every block crosses to the GPU and back: the same masks and weights with the placement switch off and on,
    and every tensor back in (pageable) CPU memory."""
    results = {}
    for on in (False, True):
        monkeypatch.setattr(offload, switch, on)
        model = _model("llama", num_layers=num_layers)  # in CPU memory
        pruner, report = _prune(model, stream_location="cpu", reconstruction=RECIPES[recipe])
        if switch == "OVERLAP_PLACEMENT":
            assert report.memory["estimate"]["overlap_placement"] is on
        for name, tensor in model.state_dict().items():
            assert tensor.device.type == "cpu" and not tensor.is_pinned(), name
        results[on] = (pruner.masks, _cpu_state(model))
    masks, state = results[True]
    assert masks.keys() == results[False][0].keys() and masks
    for name, mask in masks.items():
        assert torch.equal(mask, results[False][0][name]), name
    for name, value in state.items():
        torch.testing.assert_close(value, results[False][1][name], rtol=BF16_RTOL, atol=WEIGHT_ATOL, msg=name)


# ---------------------------------------------------------------------------------------------------- the engine
# Without BR there is nothing to train, so LR runs once ("full" names no training there).
_RECIPE_MODES = [(recipe, mode) for recipe in sorted(RECIPES) for mode in ("full", "lora")
                 if not (recipe == "lr" and mode == "lora")]


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("recipe, mode", _RECIPE_MODES)
@pytest.mark.parametrize("location", [loc for loc in LOCATIONS if loc != "device"])
def test_every_stream_location_gives_the_device_stream_result(family, recipe, mode, location, monkeypatch, tmp_path):
    reference = _reference(family, recipe, mode)
    model = _model(family).cuda()
    pruner, report = _prune(model, reconstruction=RECIPES[recipe], reconstruction_mode=mode,
                            **_located(location, monkeypatch, tmp_path))
    assert report.memory["estimate"]["stream_location"] == location.split("-")[0]
    _assert_same_result(pruner, model, reference)


# ---------------------------------------------------------------------------------------------------- experts
def _moe_model(family: str, dtype=torch.float32):
    from test_moe import make_model

    model = make_model(family).to(dtype)
    model.config._attn_implementation = "eager"
    return model.cuda()


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("recipe, mode", [("lr", "full"), ("br+gp", "full"), ("br+gp+cr", "lora")])
def test_fused_experts_on_cpu_streams_give_the_device_stream_result(family, recipe, mode):
    """Routed-expert statistics, 3-D masks, and BR through fused experts (full, and masked low-rank deltas)."""
    results = {}
    for location in ("device", "cpu"):
        model = _moe_model(family)
        pruner, report = _prune(model, method="wanda", reconstruction=RECIPES[recipe], reconstruction_mode=mode,
                                stream_location=location, moe_min_tokens=0)
        results[location] = (pruner, report, model)
    pruner, report, model = results["cpu"]
    reference = ({k: v.clone() for k, v in results["device"][0].masks.items()}, _cpu_state(results["device"][2]))
    _assert_same_result(pruner, model, reference)
    assert any("experts" in name for name in pruner.masks)
    assert report.blocks[0].expert_tokens == results["device"][1].blocks[0].expert_tokens
    params = dict(model.named_parameters())
    for name, keep in pruner.masks.items():
        weight = params[name] if name in params else params[f"{name}.weight"]
        assert bool((weight.detach().cpu()[~keep] == 0).all()), name


def test_fused_experts_of_a_bfloat16_model_with_compiled_lora_br_on_cuda():
    model = _moe_model("qwen3_moe", dtype=torch.bfloat16)
    pruner, report = _prune(model, method="sparsegpt", reconstruction=["lr", "br", "gp"], reconstruction_mode="lora",
                            compile_blocks=True, stream_location="cpu", moe_min_tokens=0)
    assert not any("torch.compile failed" in w for w in report.warnings), report.warnings
    assert report.mean_sparsity == pytest.approx(0.5)
    params = dict(model.named_parameters())
    for name, keep in pruner.masks.items():
        weight = params[name] if name in params else params[f"{name}.weight"]
        assert weight.dtype == torch.bfloat16 and bool((weight.detach().cpu()[~keep] == 0).all()), name
    for block in report.blocks:
        assert block.error_after["calibration"] < block.error_before["calibration"]


def test_bfloat16_streams_of_a_bfloat16_model_on_cpu_match_the_device(monkeypatch):
    results = {}
    for location in ("device", "cpu"):
        model = _model("llama", dtype=torch.bfloat16).cuda()
        pruner, _ = _prune(model, stream_location=location, stream_dtype="bfloat16")
        results[location] = (pruner.masks, _cpu_state(model))
    model_masks, model_state = results["cpu"]
    for name, mask in model_masks.items():
        assert torch.equal(mask, results["device"][0][name]), name
    for name, value in model_state.items():
        torch.testing.assert_close(value, results["device"][1][name], rtol=BF16_RTOL, atol=WEIGHT_ATOL, msg=name)


# ---------------------------------------------------------------------------------------------------- dispatch
@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-cuda")
    model = _model("llama", num_layers=4)
    model.save_pretrained(folder)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    return {"folder": str(folder), "size": size, "block": block}


def _load(saved, **kwargs):
    model = transformers.AutoModelForCausalLM.from_pretrained(saved["folder"], attn_implementation="eager", **kwargs)
    return model.eval()


_DISPATCH = {
    # blocks 0-1 (and the embeddings) on the GPU, the rest offloaded to the CPU by Accelerate's hooks
    "gpu-and-cpu": lambda s, tmp: dict(device_map={"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0,
                                                   "model.layers.1": 0, "model.layers.2": "cpu",
                                                   "model.layers.3": "cpu", "model.norm": "cpu", "lm_head": "cpu"}),
    "gpu-cpu-disk": lambda s, tmp: dict(device_map={"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0,
                                                    "model.layers.1": "cpu", "model.layers.2": "disk",
                                                    "model.layers.3": "disk", "model.norm": 0, "lm_head": "cpu"},
                                        offload_folder=str(tmp / "offload")),
    "auto-max-memory": lambda s, tmp: dict(device_map="auto",
                                           max_memory={0: s["size"] - 2 * s["block"], "cpu": 10 * s["size"]}),
}


@pytest.mark.parametrize("dispatch", sorted(_DISPATCH) + ["cpu_offload", "max_device_memory"])
@pytest.mark.parametrize("recipe", ["lr", "br+gp"])
def test_dispatched_models_equal_the_in_memory_run(saved_llama, dispatch, recipe, tmp_path):
    # The model in memory on the GPU. (A model in CPU memory computes its embeddings and rotary tables on the CPU:
    # equal up to rounding, which BR's Adam steps then amplify, so it is no bitwise reference.)
    reference_model = _load(saved_llama).cuda()
    reference_pruner, _ = _prune(reference_model, reconstruction=RECIPES[recipe], stream_location="device")
    reference = ({k: v.clone() for k, v in reference_pruner.masks.items()}, _cpu_state(reference_model))
    overrides = {}
    if dispatch == "cpu_offload":
        from accelerate import cpu_offload

        model = _load(saved_llama)
        cpu_offload(model, execution_device=torch.device("cuda"))
    elif dispatch == "max_device_memory":  # room for a window, not for the streams too: they go to the CPU
        from hf_recon_prune.memory import MARGIN

        model = _load(saved_llama).cuda()
        estimate = reference_pruner.report.memory["estimate"]
        available = int((estimate["window_peak"] + estimate["streams"] // 2) / MARGIN)
        overrides = {"stream_location": "auto", "max_device_memory": torch.cuda.memory_allocated() + available}
    else:
        model = _load(saved_llama, **_DISPATCH[dispatch](saved_llama, tmp_path))
        devices = set(model.hf_device_map.values())
        assert 0 in devices and devices - {0}, model.hf_device_map  # split between the GPU and elsewhere
    pruner, report = _prune(model, reconstruction=RECIPES[recipe], **overrides)
    if dispatch == "max_device_memory":
        assert report.memory["estimate"]["stream_location"] == "cpu"
    with torch.no_grad():  # the hooks are back: the model still runs, with the pruned weights
        ids = random_ids(2, 12, seed=7)
        logits = model(ids.to("cuda")).logits.float().cpu()
        expected = reference_model(ids.to("cuda")).logits.float().cpu()
    torch.testing.assert_close(logits, expected, rtol=1e-3, atol=1e-4)
    if dispatch == "cpu_offload":  # transformers cannot save under cpu_offload: its hooks give the weights back
        from accelerate.hooks import remove_hook_from_module

        reloaded = remove_hook_from_module(model, recurse=True)
    else:
        model.save_pretrained(tmp_path / "saved")
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    for name in pruner.masks:
        assert torch.equal(pruner.masks[name], reference[0][name]), name
    for name, value in _cpu_state(reloaded).items():
        torch.testing.assert_close(value, reference[1][name], rtol=BF16_RTOL, atol=WEIGHT_ATOL, msg=name)


# ---------------------------------------------------------------------------------------------------- kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gram_update_cuda_low_precision_is_exact_products(dtype):
    from hf_recon_prune.criteria.statistics import gram_update_

    x = torch.randn(4096, 256, device="cuda").to(dtype)
    gram = torch.zeros(256, 256, device="cuda")
    gram_update_(gram, x)
    reference = x.double().T @ x.double()
    torch.testing.assert_close(gram.double(), reference, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_batched_sparsegpt_solve_matches_the_column_loop_on_cuda(nm):
    from hf_recon_prune.criteria import sparsegpt_prune

    generator = torch.Generator().manual_seed(0)
    X = torch.randn(2048, 256, generator=generator) * torch.rand(256, generator=generator) * 2
    W = torch.randn(96, 256, generator=generator)
    H = (X.T @ X / X.shape[0]).cuda()
    W = W.cuda()
    loop = sparsegpt_prune(W, H, 0.5, block_size=64, nm=nm, batched=False)
    fast = sparsegpt_prune(W, H, 0.5, block_size=64, nm=nm, batched=True)
    assert fast.weight.device.type == "cuda"
    assert torch.equal(loop.keep_mask, fast.keep_mask)
    torch.testing.assert_close(fast.weight, loop.weight, rtol=1e-4, atol=1e-5)
    # and both against the float64 column loop on the CPU
    reference = sparsegpt_prune(W.double().cpu(), H.double().cpu(), 0.5, block_size=64, nm=nm, batched=False)
    assert torch.equal(reference.keep_mask, fast.keep_mask.cpu())
    torch.testing.assert_close(fast.weight.double().cpu(), reference.weight.double(), rtol=1e-3, atol=1e-4)


def test_compiled_br_equals_eager_br_on_cuda():
    runs = {}
    for compiled in (False, True):
        model = _model("llama", num_layers=1).cuda()
        pruner, report = _prune(model, compile_blocks=compiled, stream_location="cpu")
        assert not any("torch.compile failed" in w for w in report.warnings), report.warnings
        runs[compiled] = (pruner, report, model)
    _assert_same_optimisation(*runs[True], reference=runs[False])


@pytest.mark.parametrize("recipe, mode, batch", [("br+gp", "full", 4), ("br+gp+cr", "full", 5), ("br+gp", "lora", 4)])
def test_graphed_br_equals_eager_br_on_cuda(recipe, mode, batch):
    """compile_blocks="auto" captures these small windows in CUDA graphs: a replay runs the eager step's kernels on
    the same bytes, so masks and weights equal the eager run's. With batch 5 every epoch ends with a mini-batch of 1
    row, which runs eagerly between replays; br_lr="auto" trains its probes on the window's one pair of graphs, and
    the held-out error is measured by replaying the forward graph."""
    runs = {}
    for setting in (False, "auto"):
        model = _model("llama", num_layers=3).cuda()
        pruner, report = _prune(model, compile_blocks=setting, stream_location="cpu", reconstruction=RECIPES[recipe],
                                reconstruction_mode=mode, br_batch_size=batch, br_lr="auto", br_epochs=3)
        executions = {choice["execution"] for block in report.blocks for choice in block.br_choices}
        assert executions == {"graphed" if setting else "eager"}, (executions, report.warnings)
        assert not any("CUDA graphs failed" in w for w in report.warnings), report.warnings
        runs[setting] = (pruner, model)
    _assert_same_result(*runs["auto"], reference=(runs[False][0].masks, _cpu_state(runs[False][1])))


@pytest.mark.parametrize("compile_blocks", [False, "auto"])
def test_br_gathers_device_stream_rows_with_an_index_on_the_device(compile_blocks, monkeypatch):
    """With the streams on the device, BR moves each epoch's order there once, so no step copies its rows' index from
    the host (a pageable host-to-device copy waits for the device's whole queue); CPU streams, and device streams
    with ``INDEX_ON_DEVICE`` off (the behaviour before), are gathered with CPU indices. All give the same masks and
    weights, eager and graphed."""
    import hf_recon_prune.reconstruction.block_trainer as block_trainer

    seen, real = [], block_trainer._MiniBatches.load

    def load(self, rows, ahead=None):
        seen.append({rows.device.type} | ({ahead.device.type} if ahead is not None else set()))
        return real(self, rows, ahead)

    monkeypatch.setattr(block_trainer._MiniBatches, "load", load)
    runs = {}
    for location, on_device, index_device in (("device", True, "cuda"), ("device", False, "cpu"),
                                              ("cpu", True, "cpu")):
        seen.clear()
        monkeypatch.setattr(block_trainer, "INDEX_ON_DEVICE", on_device)
        model = _model("llama", num_layers=2).cuda()
        pruner, report = _prune(model, stream_location=location, compile_blocks=compile_blocks)
        assert seen and all(devices == {index_device} for devices in seen), (location, on_device, seen[:4])
        runs[location, on_device] = (pruner, model)
    reference = runs["cpu", True]
    for key in (("device", True), ("device", False)):
        _assert_same_result(*runs[key], reference=(reference[0].masks, _cpu_state(reference[1])))


# ---------------------------------------------------------------------------------------------------- fallbacks
def test_out_of_memory_in_a_forward_pass_halves_the_batch_on_cuda(monkeypatch):
    import hf_recon_prune.propagation as engine

    reference_model = _model("llama", num_layers=2).cuda()
    reference_pruner, _ = _prune(reference_model, forward_batch_size=2, stream_location="cpu")
    real, failures = engine.call_window, []

    def call_window(blocks, hidden_states, kwargs):
        if hidden_states.shape[0] > 2:
            failures.append(hidden_states.shape[0])
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(blocks, hidden_states, kwargs)

    monkeypatch.setattr(engine, "call_window", call_window)
    model = _model("llama", num_layers=2).cuda()
    pruner, report = _prune(model, forward_batch_size=4, stream_location="cpu")
    assert failures == [4] and any("retrying with 2" in w for w in report.warnings)
    _assert_same_result(pruner, model, (reference_pruner.masks, _cpu_state(reference_model)))


@pytest.mark.parametrize("compile_blocks", [False, "auto"])
def test_out_of_memory_in_block_training_accumulates_micro_batches_on_cuda(monkeypatch, compile_blocks):
    """Graphed ("auto"), the injected error comes while capturing: the window goes on eagerly, in micro-batches."""
    import hf_recon_prune.reconstruction.execution as execution

    reference_model = _model("llama", num_layers=1).cuda()
    reference_pruner, reference_report = _prune(reference_model, stream_location="cpu")
    real = execution.call_window

    def limited(blocks, x, kwargs):
        if torch.is_grad_enabled() and x.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(blocks, x, kwargs)

    monkeypatch.setattr(execution, "call_window", limited)
    model = _model("llama", num_layers=1).cuda()
    pruner, report = _prune(model, stream_location="cpu", compile_blocks=compile_blocks)
    assert any("micro-batch" in w for w in report.warnings)
    assert [c["execution"] for c in report.blocks[0].br_choices] == ["eager"]
    _assert_same_optimisation(pruner, report, model, (reference_pruner, reference_report, reference_model))


def test_non_finite_training_reverts_from_the_pinned_snapshot_exactly(monkeypatch):
    """BR whose loss turns non-finite restores the window from its pinned CPU snapshot: the weights after LR."""
    import hf_recon_prune.reconstruction.execution as execution

    lr_model = _model("llama", num_layers=2).cuda()
    lr_pruner, _ = _prune(lr_model, reconstruction=["lr"], stream_location="cpu")
    real = execution.call_window

    def poisoned(blocks, x, kwargs):
        out = real(blocks, x, kwargs)
        return out * float("nan") if torch.is_grad_enabled() else out

    monkeypatch.setattr(execution, "call_window", poisoned)
    model = _model("llama", num_layers=2).cuda()
    pruner, report = _prune(model, reconstruction=["lr", "br", "gp"], stream_location="cpu")
    assert all(block.reverted for block in report.blocks)
    _assert_same_result(pruner, model, (lr_pruner.masks, _cpu_state(lr_model)))


# ---------------------------------------------------------------------------------------------------- state on disk
def test_checkpoint_and_resume_from_gpu_tensors_equal_the_uninterrupted_run(tmp_path):
    reference_model = _model("llama").cuda()
    reference_pruner, _ = _prune(reference_model, stream_location="cpu", reconstruction=["lr", "br", "gp", "cr"])

    class _Stop(Exception):
        pass

    def stop_after_first(index, _report):
        if index == 0:
            raise _Stop()

    config = _config(stream_location="cpu", reconstruction=["lr", "br", "gp", "cr"],
                     checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(Exception):
        Pruner(_model("llama").cuda(), config, calibration_data=_calibration(), show_progress=False,
               on_block_end=stop_after_first).prune()
    model = _model("llama").cuda()
    pruner = Pruner(model, config, calibration_data=_calibration(), show_progress=False)
    pruner.prune(resume=True)
    _assert_same_result(pruner, model, (reference_pruner.masks, _cpu_state(reference_model)))


def test_in_process_resume_after_a_failure_inside_a_block_on_cuda(tmp_path, monkeypatch):
    """The same GPU-resident model object, failed inside block 1 after its masks and LR changed it: the resume puts
    block 1 back from the run's dense copy (a CPU file loaded into GPU weights) and ends as the uninterrupted run."""
    from hf_recon_prune.pruner import PruningFailedError

    reference_model = _model("llama").cuda()
    reference_pruner, _ = _prune(reference_model, stream_location="cpu")
    config = _config(stream_location="cpu", checkpoint_dir=str(tmp_path / "ckpt"))
    model = _model("llama").cuda()
    with monkeypatch.context() as patch, pytest.raises(PruningFailedError):
        fail_pruning_after(patch, 9)  # inside block 1: its first two linears are changed
        Pruner(model, config, calibration_data=_calibration(), show_progress=False).prune()
    pruner = Pruner(model, config, calibration_data=_calibration(), show_progress=False)
    pruner.prune(resume=True)
    _assert_same_result(pruner, model, (reference_pruner.masks, _cpu_state(reference_model)))


# ---------------------------------------------------------------------------------------------------- data
def test_auto_reconstruction_mode_on_cuda_trains_masked_lora_when_only_that_fits_the_budget():
    """The budget counts what is already on the GPU (the models' weights here), so it is what is allocated now plus
    a window between the LoRA and the full-mode estimates of the two explicit runs."""
    from hf_recon_prune.memory import MARGIN

    cr = dict(reconstruction=["lr", "br", "gp", "cr"], stream_location="cpu")
    runs = {}
    for mode in ("full", "lora"):
        model = _model("llama").cuda()
        runs[mode] = (*_prune(model, **cr, reconstruction_mode=mode), model)
    peaks = {mode: report.memory["estimate"]["window_peak"] for mode, (_, report, _) in runs.items()}
    assert peaks["lora"] < peaks["full"]
    model = _model("llama").cuda()
    budget = torch.cuda.memory_allocated() + int((peaks["lora"] + peaks["full"]) / 2 / MARGIN)
    pruner, report, _ = (*_prune(model, **cr, reconstruction_mode="auto", max_device_memory=budget), model)
    assert report.reconstruction_mode == "lora"
    _assert_same_result(pruner, model, (runs["lora"][0].masks, _cpu_state(runs["lora"][2])))


def test_self_generation_on_cuda_is_reproducible_for_a_seed():
    from conftest_calibration_helpers import make_bpe_tokenizer, make_tiny_llama
    from hf_recon_prune.calibration import generate_self_calibration

    tokenizer = make_bpe_tokenizer()
    model = make_tiny_llama(len(tokenizer)).cuda()

    def generate(seed):
        return generate_self_calibration(model, tokenizer, 6, 20, seed=seed, language=None, batch_size=4,
                                         top_k=50, show_progress=False)

    first, again, other = generate(0), generate(0), generate(1)
    assert first.input_ids.device.type == "cpu" and first.input_ids.shape == (6, 20)
    assert torch.equal(first.input_ids, again.input_ids) and first.texts == again.texts
    assert not torch.equal(first.input_ids, other.input_ids)


def test_self_generation_on_cuda_keeps_the_samples_of_candidate_order_whatever_the_batch():
    """The samples kept are the first candidates that pass, so batch 8 gives the samples of batch 1 (one candidate
    a round)."""
    from conftest_calibration_helpers import make_bpe_tokenizer, make_tiny_llama
    from hf_recon_prune.calibration import generate_self_calibration

    tokenizer = make_bpe_tokenizer()
    model = make_tiny_llama(len(tokenizer)).cuda().double()  # float64: batching cannot flip an argmax
    one, eight = (generate_self_calibration(model, tokenizer, 3, 12, seed=4, language=None, batch_size=size,
                                            temperature=0, show_progress=False) for size in (1, 8))
    assert torch.equal(one.input_ids, eight.input_ids)
    assert one.num_candidates == eight.num_candidates and one.num_short == eight.num_short


def _eos_prone_on_cuda(tokenizer, dtype, bonus=1.0):
    from conftest_calibration_helpers import make_tiny_llama

    model = make_tiny_llama(len(tokenizer), seed=2).cuda().to(dtype)
    index = torch.tensor([tokenizer.eos_token_id], device="cuda")  # made here: a copy from the host is not capturable
    model.lm_head.register_forward_hook(
        lambda module, args, out: out.index_add(-1, index, torch.full_like(out[..., :1], bonus)))
    return model


def test_self_generation_in_cuda_graphs_gives_generates_samples():
    """The default on a GPU decodes in CUDA graphs; in float64 its samples equal generate()'s with the dynamic
    cache (candidates, rows ended early, windows)."""
    from conftest_calibration_helpers import make_bpe_tokenizer
    from hf_recon_prune.calibration import generate_self_calibration

    tokenizer = make_bpe_tokenizer()
    model = _eos_prone_on_cuda(tokenizer, torch.float64)
    settings = dict(seed=3, language=None, batch_size=4, show_progress=False, max_length=40)
    graphed = generate_self_calibration(model, tokenizer, 6, 20, **settings)
    plain = generate_self_calibration(model, tokenizer, 6, 20, static_cache=False, **settings)
    assert graphed.decoding == "cuda graphs" and plain.decoding == "dynamic cache"
    assert torch.equal(graphed.input_ids, plain.input_ids)
    assert (graphed.num_candidates, graphed.num_short) == (plain.num_candidates, plain.num_short)
    assert plain.num_short > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_replayed_decoding_step_equals_the_eager_one(dtype, monkeypatch):
    """The same decoder captured and replayed, against every step run eagerly: the same kernels, so the same tokens,
    bit for bit, also in float32 and bfloat16 (GQA: 4 query heads over 2 key/value heads). Windows of 16 positions:
    four graphs in one memory pool."""
    from conftest_calibration_helpers import make_bpe_tokenizer
    from hf_recon_prune.calibration import graphed_decoding

    monkeypatch.setattr(graphed_decoding, "WINDOW", 16)

    tokenizer = make_bpe_tokenizer()
    model = _eos_prone_on_cuda(tokenizer, dtype, bonus=-2.0)
    prompts = torch.randint(3, len(tokenizer), (8, 5), generator=torch.Generator().manual_seed(0)).cuda()
    spec = graphed_decoding.SamplingSpec(keys=list(range(8)), temperature=1.0, top_k=50, top_p=0.95, suppressed=[],
                                         eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        replayed, captured = graphed_decoding.sample_in_graphs(model, prompts, 60, spec, capture=True)
        eager, _ = graphed_decoding.sample_in_graphs(model, prompts, 60, spec, capture=False)
    assert captured and torch.equal(replayed, eager)
    assert len(set(replayed[:, 5:].flatten().tolist())) > 10  # sampled text, not one repeated token


def test_a_decoding_step_that_waits_for_the_host_is_decoded_eagerly():
    """A forward hook that reads a value on the host cannot be captured: the run warns, finishes eagerly and gives
    the samples of a run that never tried to capture."""
    from conftest_calibration_helpers import make_bpe_tokenizer
    from hf_recon_prune.calibration import generate_self_calibration

    tokenizer = make_bpe_tokenizer()
    model = _eos_prone_on_cuda(tokenizer, torch.float32)
    settings = dict(seed=1, language=None, batch_size=4, show_progress=False)
    reference = generate_self_calibration(model, tokenizer, 4, 20, **settings)
    def read_on_the_host(module, args, output):
        float(output[0].abs().max())

    model.model.layers[0].register_forward_hook(read_on_the_host)
    data = generate_self_calibration(model, tokenizer, 4, 20, **settings)
    assert reference.decoding == "cuda graphs" and data.decoding.startswith("static cache, eager")
    assert torch.equal(data.input_ids, reference.input_ids)


def test_the_preallocated_kv_cache_on_cuda_gives_transformers_samples_and_logits(monkeypatch):
    """Self-generation's preallocated cache against transformers' DynamicCache on the GPU: the same samples in
    float64, and the same decoding logits in bfloat16 (where SDPA reads the cache as strided views)."""
    from conftest_calibration_helpers import make_bpe_tokenizer, make_tiny_llama
    from hf_recon_prune.calibration import generate_self_calibration, kv_cache, self_generation

    tokenizer = make_bpe_tokenizer()
    model = make_tiny_llama(len(tokenizer)).cuda().double()
    settings = dict(seed=2, language=None, batch_size=4, show_progress=False, static_cache=False)
    fast = generate_self_calibration(model, tokenizer, 5, 24, **settings)
    monkeypatch.setattr(self_generation, "preallocated_cache", lambda model, capacity: None)
    plain = generate_self_calibration(model, tokenizer, 5, 24, **settings)
    assert torch.equal(fast.input_ids, plain.input_ids)

    model = model.to(torch.bfloat16)
    ids = torch.randint(0, len(tokenizer), (3, 6), generator=torch.Generator().manual_seed(0)).cuda()
    logits = []
    for cache in (kv_cache.preallocated_cache(model, 16), transformers.DynamicCache(config=model.config)):
        with torch.inference_mode():
            steps = [model(input_ids=ids, **{kv_cache.cache_argument_name(model): cache}).logits[:, -1]]
            for _ in range(8):
                token = steps[-1].argmax(-1, keepdim=True)
                steps.append(model(input_ids=token, **{kv_cache.cache_argument_name(model): cache}).logits[:, -1])
        logits.append(torch.stack(steps).float())
    assert type(cache.layers[0]) is not kv_cache.PreallocatedLayer
    torch.testing.assert_close(logits[0], logits[1], atol=2e-2, rtol=2e-2)


def test_perplexity_on_cuda_equals_the_cpu():
    from hf_recon_prune.evaluation import perplexity_of_ids

    model = _model("llama", num_layers=2)
    windows = random_ids(6, 24, seed=9)
    on_cpu = perplexity_of_ids(copy.deepcopy(model), windows, batch_size=4)
    on_gpu = perplexity_of_ids(model.cuda(), windows, batch_size=4)
    assert on_gpu == pytest.approx(on_cpu, rel=1e-4)


def test_a_model_in_cpu_memory_is_measured_on_the_gpu_and_returned_to_the_cpu():
    """placed_for_evaluation (the CLI's --eval-device auto): the perplexity measured on the GPU equals the CPU's, and
    the model is back in CPU memory afterwards, also after an error inside."""
    from hf_recon_prune.evaluation import perplexity_of_ids, placed_for_evaluation

    model = _model("llama", num_layers=2)
    windows = random_ids(6, 24, seed=9)
    on_cpu = perplexity_of_ids(model, windows, batch_size=4)
    with placed_for_evaluation(model, "auto") as (device, why):
        assert device.type == "cuda" and next(model.parameters()).is_cuda and "fits" in why
        on_gpu = perplexity_of_ids(model, windows, batch_size=4)
    assert on_gpu == pytest.approx(on_cpu, rel=1e-4)
    assert all(p.device.type == "cpu" for p in model.parameters())
    with pytest.raises(RuntimeError, match="inside"), placed_for_evaluation(model, "cuda:0"):
        raise RuntimeError("inside")
    assert all(p.device.type == "cpu" for p in model.parameters())
    with placed_for_evaluation(model, "auto", working_bytes=1 << 50) as (device, why):  # 1 PiB: does not fit
        assert device.type == "cpu" and "runs on the CPU" in why


def test_the_cli_measures_and_generates_on_the_gpu_and_prunes_as_on_the_cpu(tmp_path, capsys):
    """prune's perplexity passes and self-generation, eval, generate-calibration: on the GPU with --eval-device /
    --device auto, the CPU's perplexities (within float rounding), and the pruning itself unchanged."""
    import json

    from hf_recon_prune import cli
    from tiny_assets import save_tiny_llama, write_text

    model, text = save_tiny_llama(tmp_path / "tiny"), write_text(tmp_path / "corpus.txt")
    common = ["--eval-source", text, "--eval-seq-len", "32", "--eval-windows", "4"]
    results = {}
    for where in ("cpu", "auto"):
        out = tmp_path / f"pruned-{where}"
        code = cli.main(["prune", "--model", model, "-o", str(out), "--method", "wanda", "--reconstruction", "none",
                         "--calibration", text, "--num-samples", "4", "--seq-len", "32", "--num-self-samples", "2",
                         "--eval-device", where, *common])
        err = capsys.readouterr().err
        assert code == 0, err
        assert ("running on cuda" in err) == (where == "auto")
        results[where] = json.loads((out / "prune_report.json").read_text())["perplexity"]["corpus.txt"]
    assert results["auto"]["dense"] == pytest.approx(results["cpu"]["dense"], rel=1e-4)
    assert results["auto"]["pruned"] == pytest.approx(results["cpu"]["pruned"], rel=1e-4)  # self rows: BR only, none here
    code = cli.main(["eval", "--model", str(tmp_path / "pruned-auto"), *common])
    captured = capsys.readouterr()
    assert code == 0 and "running on cuda" in captured.err, captured.err
    assert json.loads(captured.out)["perplexity"]["value"] == pytest.approx(results["auto"]["pruned"], rel=1e-4)
    code = cli.main(["generate-calibration", "--model", model, "--num-samples", "2", "--seq-len", "16",
                     "--output", str(tmp_path / "self.jsonl")])
    captured = capsys.readouterr()
    assert code == 0 and "running on cuda" in captured.err and (tmp_path / "self.jsonl").is_file(), captured.err


def test_a_cuda_run_leaves_no_stream_file_behind(tmp_path):
    folder = tmp_path / "streams"
    model = _model("llama", num_layers=2).cuda()
    _prune(model, stream_location="disk", stream_folder=str(folder))
    assert os.listdir(folder) == []


# Last in the file: a capture that fails is the one test here that makes CUDA return an error, and should a driver
# ever keep such an error, no test after it is affected.
def test_a_window_that_cannot_be_captured_trains_eagerly_with_a_note_on_cuda(monkeypatch):
    """A host synchronisation in the window's forward (``.item()``) is not allowed while capturing: the capture
    fails, the window says so and trains eagerly, with the eager run's result."""
    import hf_recon_prune.reconstruction.execution as execution

    real = execution.call_window

    def synchronising(blocks, x, kwargs):
        out = real(blocks, x, kwargs)
        return out * (1.0 + 0.0 * float(out.detach().abs().max().item()))

    monkeypatch.setattr(execution, "call_window", synchronising)
    runs = {}
    for setting in (False, "auto"):
        model = _model("llama", num_layers=2).cuda()
        runs[setting] = (model, *_prune(model, compile_blocks=setting, stream_location="cpu"))
    model, pruner, report = runs["auto"]
    notes = [w for w in report.warnings if "capturing the window in CUDA graphs failed" in w]
    assert len(notes) == len(report.blocks), report.warnings  # each window tried once
    assert {c["execution"] for b in report.blocks for c in b.br_choices} == {"eager"}
    reference_model, reference_pruner, _ = runs[False]
    _assert_same_result(pruner, model, (reference_pruner.masks, _cpu_state(reference_model)))
