"""Accelerate-offloaded models, disk streams and the memory plan give the model the in-memory run gives."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch
import transformers

import hf_recon_prune.offload as offload
from conftest import make_tiny_model, random_ids
from hf_recon_prune import PruningConfig
from hf_recon_prune.architectures import resolve_layout
from hf_recon_prune.config import parse_memory_size
from hf_recon_prune.memory import MemoryBudgetError
from hf_recon_prune.pruner import Pruner
from test_pruner import _calibration, _config

RECIPE = dict(method="sparsegpt", reconstruction=["lr", "br", "gp"], br_epochs=3, br_lr=1e-3, br_batch_size=4)


def _run(model, **overrides):
    pruner = Pruner(model, _config(**{**RECIPE, **overrides}), calibration_data=_calibration(), show_progress=False)
    return pruner, pruner.prune()


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama saved with save_pretrained, and the in-memory run of it (the reference)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model("llama", num_layers=3).save_pretrained(folder)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    pruner, report = _run(reference)
    with torch.no_grad():
        logits = reference(random_ids(2, 12, seed=7)).logits
    return {"folder": folder, "state": reference.state_dict(), "masks": pruner.masks, "report": report,
            "logits": logits, "size": sum(p.numel() * p.element_size() for p in reference.parameters())}


def _assert_same_model(state, masks, saved):
    assert masks.keys() == saved["masks"].keys() and masks
    for name, mask in masks.items():
        assert torch.equal(mask, saved["masks"][name]), name
    assert state.keys() == saved["state"].keys()
    for name, value in state.items():
        torch.testing.assert_close(value, saved["state"][name], rtol=1e-5, atol=1e-6, msg=name)


def _track_materialised_blocks(monkeypatch, layout):
    """Record, at every onload, how many decoder blocks of the model hold real (non-meta) weights."""
    counts = []
    real_onload = offload.BlockPlacement.onload

    def onload(self, block):
        result = real_onload(self, block)
        counts.append(sum(any(p.device.type != "meta" for p in b.parameters()) for b in layout.blocks))
        return result

    monkeypatch.setattr(offload.BlockPlacement, "onload", onload)
    return counts


def _force_overlapped_placement(monkeypatch) -> list[str]:
    """Overlapped placement on the CPU (the worker thread without CUDA streams): returns the background jobs' kinds,
    as they are submitted."""
    import hf_recon_prune.engine as engine

    jobs = []

    class Overlapped(offload.BlockPlacement):
        def __init__(self, device, scratch_folder=None, overlap=False):
            super().__init__(device, scratch_folder, force_overlap=True)

        def prefetch(self, block):
            jobs.append("prefetch")
            super().prefetch(block)

        def offload(self, block, background=False, **kwargs):
            jobs.append("offload in the background" if background else "offload")
            super().offload(block, background=background, **kwargs)

    monkeypatch.setattr(engine, "BlockPlacement", Overlapped)
    return jobs


def _offloaded_model(saved, storage, tmp_path, overrides):
    if storage == "cpu_offload":
        # accelerate.cpu_offload: every weight in a CPU state dict, meta tensors in the model, hooks on every module
        from accelerate import cpu_offload

        model = transformers.AutoModelForCausalLM.from_pretrained(saved["folder"]).eval()
        cpu_offload(model, execution_device=torch.device("cpu"))
        return model
    kwargs = dict(device_map="auto", max_memory={"cpu": saved["size"] // 4})
    if storage == "disk":
        kwargs["offload_folder"] = str(tmp_path / "offload")
    else:  # transformers then reads offloaded weights from the checkpoint; the pruned ones need another home
        overrides["stream_folder"] = str(tmp_path / "scratch")
    model = transformers.AutoModelForCausalLM.from_pretrained(saved["folder"], **kwargs).eval()
    assert "disk" in set(model.hf_device_map.values())
    return model


@pytest.mark.parametrize("storage, overlap", [("disk", False), ("disk-without-offload-folder", False),
                                              ("cpu_offload", False), ("disk", True), ("cpu_offload", True)])
def test_offloaded_model_prunes_to_the_in_memory_result(saved, storage, overlap, tmp_path, monkeypatch):
    checkpoint = os.path.join(saved["folder"], "model.safetensors")
    checksum = _sha256(checkpoint)
    overrides = {}
    model = _offloaded_model(saved, storage, tmp_path, overrides)
    layout = resolve_layout(model)
    assert all(p.device.type == "meta" for p in layout.blocks.parameters())

    jobs = _force_overlapped_placement(monkeypatch) if overlap else []
    counts = _track_materialised_blocks(monkeypatch, layout)
    pruner, report = _run(model, **overrides)

    if overlap:  # blocks 1 and 2 loaded ahead; every block written back while the run went on
        assert jobs.count("prefetch") == 2 and jobs.count("offload in the background") == 3, jobs
        # the window, the next block loaded ahead and the last one still being written back, at most
        assert counts and max(counts) <= 3
    else:
        assert counts and max(counts) == 1  # one window (one block with BR+GP) materialised at a time
    assert all(p.device.type == "meta" for p in layout.blocks.parameters())  # back in the offload storage
    assert _sha256(checkpoint) == checksum  # the original checkpoint is never written
    for mine, theirs in zip(report.blocks, saved["report"].blocks):
        assert mine.error_after["calibration"] == pytest.approx(theirs.error_after["calibration"], rel=1e-4)
    with torch.no_grad():  # the hooks are back: the offloaded model runs with the pruned weights
        torch.testing.assert_close(model(random_ids(2, 12, seed=7)).logits, saved["logits"], rtol=1e-4, atol=1e-5)

    if storage == "cpu_offload":  # detaching the hooks restores every weight from the state dict they serve
        from accelerate.hooks import remove_hook_from_module

        _assert_same_model(remove_hook_from_module(model, recurse=True).state_dict(), pruner.masks, saved)
    else:  # what transformers saves, reading the offload storage, is the pruned model
        model.save_pretrained(tmp_path / "saved")
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
        _assert_same_model(reloaded.state_dict(), pruner.masks, saved)
    if storage == "disk-without-offload-folder":
        assert any(name.endswith(".dat") for _, _, files in os.walk(tmp_path / "scratch") for name in files)


def test_a_failure_with_blocks_moving_in_the_background_puts_every_block_back(saved, tmp_path, monkeypatch):
    """A failure in block 1 while block 2 is being loaded ahead and block 0 written back: the backups restore the
    model, every block is back under its hooks (meta in the model), and the model runs as before."""
    from conftest import fail_pruning_after

    model = _offloaded_model(saved, "cpu_offload", tmp_path, {})
    with torch.no_grad():
        before = model(random_ids(2, 12, seed=7)).logits
    jobs = _force_overlapped_placement(monkeypatch)
    fail_pruning_after(monkeypatch, 9, "simulated failure")  # block 0 has 7 linears: fails in block 1
    with pytest.raises(RuntimeError, match="simulated failure"):
        Pruner(model, _config(**RECIPE), calibration_data=_calibration(), show_progress=False,
               keep_backup=True).prune()
    assert "prefetch" in jobs and "offload in the background" in jobs
    assert all(p.device.type == "meta" for p in resolve_layout(model).blocks.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(random_ids(2, 12, seed=7)).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("execution", ["graphed", "compiled"])
def test_no_block_moves_in_the_background_while_a_window_may_be_captured(execution, monkeypatch):
    """A capture in CUDA graphs fails if another thread makes a CUDA call meanwhile, so the engine waits for every
    background move before training a window that will be graphed (and only then)."""
    import hf_recon_prune.reconstruction as reconstruction
    import hf_recon_prune.reconstruction.execution as execution_module

    _force_overlapped_placement(monkeypatch)
    waits, at_training = [], []
    real_wait_all, real_training = offload.BlockPlacement.wait_all, reconstruction.reconstruct_window

    def wait_all(self):
        waits.append(len(self._moving))
        real_wait_all(self)

    def training(blocks, *args, **kwargs):
        at_training.append((len(waits), len(pruner._engine.placement._moving)))
        return real_training(blocks, *args, **kwargs)

    monkeypatch.setattr(offload.BlockPlacement, "wait_all", wait_all)
    monkeypatch.setattr(reconstruction, "reconstruct_window", training)
    monkeypatch.setattr(execution_module, "choose_execution", lambda *args, **kwargs: execution)
    model = make_tiny_model("llama", num_layers=3)
    pruner = Pruner(model, _config(**RECIPE), calibration_data=_calibration(), show_progress=False)
    pruner.prune()
    if execution == "graphed":  # waited before each window, and nothing was moving when it trained
        assert at_training == [(1, 0), (2, 0), (3, 0)]
    else:  # compiled windows capture nothing: the moves go on (the only wait is the run's last)
        assert [count for count, _ in at_training] == [0, 0, 0] and len(waits) == 1


def test_overlapped_placement_moves_a_block_and_back_byte_for_byte():
    """prefetch -> onload hands over the loaded block; a background offload delivers the extra tensors and puts the
    block back; onload of the same block afterwards waits for that write-back and sees its values."""
    from accelerate import cpu_offload

    model = make_tiny_model("llama", num_layers=2).eval()
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    cpu_offload(model, execution_device=torch.device("cpu"))
    block = resolve_layout(model).blocks[0]
    placement = offload.BlockPlacement(torch.device("cpu"), force_overlap=True)
    assert placement.overlaps
    placement.prefetch(block)
    placement.onload(block)
    assert all(p.device.type == "cpu" for p in block.parameters())
    assert torch.equal(block.mlp.down_proj.weight, expected["model.layers.0.mlp.down_proj.weight"])
    with torch.no_grad():
        block.mlp.down_proj.weight.mul_(2)
    delivered = {}
    mask = block.mlp.down_proj.weight != 0
    placement.offload(block, background=True, with_tensors={"mask": mask}, deliver=delivered.update)
    placement.onload(block)  # waits for the write-back first
    assert torch.equal(delivered["mask"], mask)
    assert torch.equal(block.mlp.down_proj.weight, 2 * expected["model.layers.0.mlp.down_proj.weight"])
    placement.offload(block)
    placement.close()
    assert all(p.device.type == "meta" for p in block.parameters())


def test_overlapped_placement_is_planned_only_where_its_blocks_fit(monkeypatch):
    """Two more blocks (the next one and the last one) on the device, counted in the peak; off where they do not
    fit next to the window and the device streams, and off the GPU."""
    from hf_recon_prune import memory

    def estimate():
        return memory.MemoryEstimate(device="cuda:0", window_blocks=1, block_weights=1 << 30, window_weights=1 << 30,
                                     dense_copies=0, reconstruction=0, statistics=0, activations=0, streams=4 << 30,
                                     stream_location="device", resident=0, budget=None, window_peak=3 << 30,
                                     device_peak=7 << 30)

    monkeypatch.setattr(offload, "OVERLAP_PLACEMENT", True)
    cuda = torch.device("cuda", 0)
    roomy = estimate()
    memory._plan_overlap(roomy, cuda, available=20 << 30, on_device=4 << 30)  # 3 + 4 + 2 <= 0.9 * 20 GiB
    assert roomy.overlap_placement and roomy.overlap_bytes == 2 << 30 and roomy.device_peak == 9 << 30
    tight = estimate()
    memory._plan_overlap(tight, cuda, available=9 << 30, on_device=4 << 30)  # 9 > 0.9 * 9 GiB
    assert not tight.overlap_placement and tight.overlap_bytes == 0 and tight.device_peak == 7 << 30
    on_the_cpu = estimate()
    memory._plan_overlap(on_the_cpu, torch.device("cpu"), available=None, on_device=0)
    assert not on_the_cpu.overlap_placement
    monkeypatch.setattr(offload, "OVERLAP_PLACEMENT", False)
    switched_off = estimate()
    memory._plan_overlap(switched_off, cuda, available=20 << 30, on_device=4 << 30)
    assert not switched_off.overlap_placement


def test_disk_streams_give_the_in_memory_result(saved, tmp_path, monkeypatch):
    created = []
    real = offload._disk_tensor

    def spy(shape, dtype, folder):
        created.append(folder)
        return real(shape, dtype, folder)

    monkeypatch.setattr(offload, "_disk_tensor", spy)
    model = transformers.AutoModelForCausalLM.from_pretrained(saved["folder"]).eval()
    folder = tmp_path / "streams"
    pruner, report = _run(model, stream_location="disk", stream_folder=str(folder), stream_dtype="float32")
    assert created and set(created) == {str(folder)}
    assert report.memory["estimate"]["stream_location"] == "disk"
    assert os.listdir(folder) == []  # the files are unlinked as soon as they are mapped
    _assert_same_model(model.state_dict(), pruner.masks, saved)


def test_memory_estimate_is_in_the_report():
    model = make_tiny_model("llama", num_layers=2)
    _, report = _run(model)
    estimate = report.memory["estimate"]
    block = resolve_layout(model).blocks[0]
    assert estimate["block_weights"] == sum(p.numel() * p.element_size() for p in block.parameters())
    assert estimate["window_blocks"] == 1 and estimate["dense_copies"] == 0  # GP needs no dense copy of the block
    rows, seq_len, hidden = 8 + 4, 16, model.config.hidden_size
    assert estimate["streams"] >= rows * seq_len * hidden * 4 * 4  # sparse and dense, in and out
    assert estimate["stream_location"] == "cpu" and estimate["reconstruction"] > 0
    _, report = _run(make_tiny_model("llama", num_layers=2), reconstruction=["lr", "br", "cr"])
    assert report.memory["estimate"]["window_blocks"] == 2
    assert report.memory["estimate"]["dense_copies"] == 2 * estimate["block_weights"]


def test_a_budget_below_one_window_fails_before_touching_the_model():
    model = make_tiny_model("llama", num_layers=2)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MemoryBudgetError, match=r"one window of 1 decoder block\(s\) needs about .* GiB on cpu.*"
                                                r"max_device_memory='64KiB'"):
        _run(model, max_device_memory="64KiB")
    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), key


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        (dict(stream_location="ssd"), "stream_location='ssd'", "'auto', 'device', 'cpu', 'disk'"),
        (dict(stream_folder=" "), "stream_folder=' '", "folder path"),
        (dict(max_device_memory="lots"), "max_device_memory='lots'", "'16GiB'"),
        (dict(max_device_memory=0), "max_device_memory=0", "positive number of bytes"),
        (dict(max_device_memory="-2GB"), "max_device_memory='-2GB'", "positive number of bytes"),
        (dict(data_parallel="ddp"), "data_parallel='ddp'", "'auto', 'off'"),
    ],
)
def test_new_execution_fields_validate(kwargs, field, allowed):
    with pytest.raises(ValueError) as info:
        PruningConfig(**kwargs)
    assert field in str(info.value) and allowed in str(info.value)


def test_memory_sizes_parse_like_accelerate():
    assert parse_memory_size("16GiB") == 16 * 2**30
    assert parse_memory_size("500MB") == 500 * 10**6
    assert parse_memory_size("1.5 GB") == 1_500_000_000
    assert parse_memory_size(4096) == 4096
    config = PruningConfig(max_device_memory="16GiB", stream_location="disk", stream_folder="/tmp/x")
    assert PruningConfig.from_dict(config.to_dict()) == config


def test_import_and_prune_never_load_datasets_evaluate_or_gguf():
    """The GPU machines have torch, transformers, peft and accelerate only."""
    code = (
        "import sys, torch, transformers\n"
        "import hf_recon_prune\n"
        "from hf_recon_prune import PruningConfig, Pruner\n"
        "config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,"
        " num_attention_heads=2, num_key_value_heads=1, vocab_size=64)\n"
        "model = transformers.AutoModelForCausalLM.from_config(config)\n"
        "cfg = PruningConfig(reconstruction=['lr', 'br', 'gp'], br_epochs=1, device='cpu', seq_len=8,"
        " num_samples=4, sparsegpt_block_size=16)\n"
        "Pruner(model, cfg, calibration_data=torch.randint(0, 64, (4, 8)), show_progress=False).prune()\n"
        "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'datasets', 'evaluate', 'gguf'})\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_memory_estimate_of_the_statistics_by_hand():
    """SparseGPT + LR on a tiny Llama block (hidden 64, FFN 128): every layer's Gram matrix and norms, then the
    largest layer's solve on top (two more d_in^2 float32 matrices, float32 copies of the weight)."""
    model = make_tiny_model("llama", num_layers=2)
    _, report = _run(model, reconstruction=["lr"])
    estimate = report.memory["estimate"]
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]  # (out, in): q k v o gate up down
    grams = sum(4 * i * (i + 1) for _, i in shapes)
    solve = max(16 * i * o + 8 * i * i for o, i in shapes)
    assert estimate["statistics"] == grams + solve
    hidden, ffn, tokens = 64, 128, 4 * 16  # forward_batch_size 4 of _run, seq_len 16
    forward = tokens * ((4 * hidden + 3 * ffn) * 4 + 8 * hidden)
    assert estimate["window_peak"] == estimate["block_weights"] + max(grams + forward, grams + solve)


# ---------------------------------------------------------------------------------------------------- staging
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.bool, torch.int64])
@pytest.mark.parametrize("slot_bytes", [7, 64, 1 << 20])
def test_pinned_staging_copies_every_byte_through_its_slots(dtype, slot_bytes):
    """The slot pipeline (forced on the CPU, where no memory can be pinned) against the tensors themselves: pieces
    smaller than an element, pieces that span tensors' ends, and a slot larger than every tensor."""
    staging = offload.PinnedStaging(torch.device("cpu"), slot_bytes=slot_bytes, force=True)
    generator = torch.Generator().manual_seed(0)
    shapes = [(33, 17), (5,), (), (3, 4, 5)]
    for shape in shapes:
        if dtype == torch.bool:
            value = torch.rand(shape, generator=generator) > 0.5
        elif dtype == torch.int64:
            value = torch.randint(-2**40, 2**40, shape, generator=generator)
        else:
            value = torch.randn(shape, generator=generator).to(dtype)
        for copy in (staging.to_host(value), staging.to_device(value)):
            assert copy.dtype == dtype and copy.shape == value.shape
            assert torch.equal(copy.view(-1).view(torch.uint8), value.reshape(-1).view(torch.uint8))
            assert copy.data_ptr() != value.data_ptr()


def test_pinned_staging_cuts_a_tensor_into_slot_sized_pieces_and_alternates_slots():
    staging = offload.PinnedStaging(torch.device("cpu"), slot_bytes=16, force=True)
    assert list(staging._pieces(40)) == [(0, 16), (16, 32), (32, 40)]
    taken = []
    original = staging._take_slot

    def spy(nbytes):
        taken.append((staging._next, nbytes))
        return original(nbytes)

    staging._take_slot = spy
    staging.to_host(torch.arange(10, dtype=torch.float32))  # 40 bytes
    staging.to_device(torch.arange(3, dtype=torch.float32))  # 12 bytes: the slot after the last one used
    assert taken == [(0, 16), (1, 16), (0, 8), (1, 12)]


def test_pinned_staging_is_off_on_the_cpu_and_for_what_it_cannot_stage(monkeypatch):
    assert not offload.PinnedStaging(torch.device("cpu")).enabled  # plain copies: nothing to pin on a CPU run
    staging = offload.PinnedStaging(torch.device("cpu"), slot_bytes=8, force=True)
    staging._take_slot = None  # any staged copy would fail
    transposed = torch.randn(6, 4).t()
    assert torch.equal(staging.to_host(transposed), transposed)  # not contiguous: a plain copy
    assert torch.equal(staging.to_host(torch.empty(0)), torch.empty(0))
    monkeypatch.setattr(offload, "PINNED_STAGING", False)
    assert not offload.PinnedStaging(torch.device("cuda", 0)).enabled


def test_masks_and_checkpoints_taken_through_the_staging_equal_plain_copies(tmp_path, monkeypatch):
    """On the CPU the engine's masks and checkpoint files cross nothing, so forcing the staging on shows that
    every tensor it hands over is the one a plain copy gives."""
    reference_model = make_tiny_model("llama", num_layers=3)
    reference, _ = _run(reference_model, checkpoint_dir=str(tmp_path / "plain"))
    class Counting(offload.PinnedStaging):
        pieces = 0

        def __init__(self, device):
            super().__init__(device, slot_bytes=100, force=True)

        def _take_slot(self, nbytes):
            Counting.pieces += 1
            return super()._take_slot(nbytes)

    monkeypatch.setattr(offload, "PinnedStaging", Counting)
    model = make_tiny_model("llama", num_layers=3)
    pruner, _ = _run(model, checkpoint_dir=str(tmp_path / "staged"))
    assert pruner.masks.keys() == reference.masks.keys()
    for name, mask in pruner.masks.items():
        assert torch.equal(mask, reference.masks[name]), name
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference_model.state_dict()[name]), name
    from safetensors.torch import load_file

    for path in sorted((tmp_path / "plain" / "blocks").glob("*.safetensors")):
        plain, staged = load_file(path), load_file(tmp_path / "staged" / "blocks" / path.name)
        assert plain.keys() == staged.keys() and all(torch.equal(plain[k], staged[k]) for k in plain), path.name
    assert Counting.pieces > 100  # the masks and the block files went through the slots
