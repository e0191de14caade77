"""Data-parallel pruning over two CPU processes (gloo) gives the single-process model."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import make_tiny_model, random_ids
from hf_recon_prune.distributed import DataParallel, ShardedRows
from hf_recon_prune.pruner import Pruner
from test_pruner import _calibration, _config

# 7 calibration rows and 3 held-out rows: uneven shards (3 + 4, 1 + 2), and mini-batches of 4 drawn from the
# permutation of all rows, so some steps have no row at all on one of the processes.
CALIBRATION = dict(num=7, heldout=3)
# The CR recipe trains every epoch (keep-best off): the weight tolerance below is for one trajectory, and a kept
# epoch chosen on a near-tie could differ between the runs; the LoRA recipe keeps the best epoch (default), and the
# choices are compared for both.
RECIPES = {
    "sparsegpt-gp-cr": dict(method="sparsegpt", reconstruction=["lr", "br", "gp", "cr"], br_epochs=3, br_lr=1e-3,
                            br_batch_size=4, br_keep_best=False, br_patience=None),
    "wanda-local-lora": dict(method="wanda", reconstruction=["br"], reconstruction_mode="lora", br_epochs=3,
                             br_lr=1e-3, br_batch_size=4),
}


def _prune(recipe: str):
    model = make_tiny_model("llama", num_layers=3)
    pruner = Pruner(model, _config(**RECIPES[recipe]), calibration_data=_calibration(**CALIBRATION),
                    show_progress=False)
    report = pruner.prune()
    return {"state": model.state_dict(), "masks": pruner.masks, "report": report.to_dict()}


def _model_with(state):
    model = make_tiny_model("llama", num_layers=3)
    model.load_state_dict(state)
    return model


def _worker(rank: int, world_size: int, port: int, out_folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        for recipe in RECIPES:
            torch.save(_prune(recipe), os.path.join(out_folder, f"{recipe}-rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def parallel_runs(tmp_path_factory):
    """Every recipe pruned by two processes (one spawn: starting Python twice is the slow part)."""
    folder = tmp_path_factory.mktemp("data-parallel")
    mp.spawn(_worker, args=(2, _free_port(), str(folder)), nprocs=2, join=True)
    return {recipe: [torch.load(folder / f"{recipe}-rank{r}.pt", weights_only=False) for r in range(2)]
            for recipe in RECIPES}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_two_processes_match_one(recipe, parallel_runs):
    ranks = parallel_runs[recipe]
    for name, value in ranks[0]["state"].items():  # the replicas are identical, bit for bit
        assert torch.equal(value, ranks[1]["state"][name]), name

    single = _prune(recipe)
    parallel = ranks[0]
    assert parallel["masks"].keys() == single["masks"].keys()
    for name, mask in parallel["masks"].items():
        assert torch.equal(mask, single["masks"][name]), name
    # Adam divides each gradient by its running magnitude, so a weight whose gradient is ~0 moves by up to the
    # learning rate in a direction that float rounding decides: those rare weights may differ by a few steps' worth;
    # every other weight, and the model's outputs, agree to float tolerance.
    config = RECIPES[recipe]
    bound = config["br_lr"] * config["br_epochs"] * 2 * 2  # two steps per epoch, trained in up to two windows
    for name, value in parallel["state"].items():
        difference = (value - single["state"][name]).abs()
        assert float(difference.max()) <= bound, name
        assert float((difference > 1e-5).float().mean()) < 1e-3, name
    ids = random_ids(3, 16, seed=11)
    with torch.no_grad():
        outputs = [_model_with(state)(ids).logits for state in (parallel["state"], single["state"])]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-3, atol=1e-4)
    assert parallel["report"]["memory"]["data_parallel_processes"] == 2
    chosen = [[(c["window"], c["kept_epoch"]) for c in b["br_choices"]] for b in parallel["report"]["blocks"]]
    assert chosen == [[(c["window"], c["kept_epoch"]) for c in b["br_choices"]] for b in single["report"]["blocks"]]
    for mine, theirs in zip(parallel["report"]["blocks"], single["report"]["blocks"]):
        for when in ("error_before", "error_after"):
            for split in ("calibration", "heldout"):
                assert mine[when][split] == pytest.approx(theirs[when][split], rel=1e-4), (when, split)
        for mine_losses, their_losses in zip(mine["train_losses"], theirs["train_losses"]):
            assert mine_losses == pytest.approx(their_losses, rel=1e-4)


def test_shards_cover_every_row_once_and_local_rows_follow_the_batch_order():
    shards = [DataParallel(rank, 3).shard(7) for rank in range(3)]
    assert [list(range(7))[s] for s in shards] == [[0, 1], [2, 3], [4, 5, 6]]
    rows = ShardedRows(DataParallel(1, 3), 7, shards[1])
    assert rows.local(torch.tensor([5, 3, 0, 2])).tolist() == [1, 0]


# ---------------------------------------------------------------------------------------------------- failing together
# Scenarios run one after another in the same two processes (a new group each; starting Python is the slow part):
# a rank-0 step that outlasts the group's timeout (the run succeeds), rank 0 failing while it builds the calibration
# set alone, and last the acceptance case: rank 1 failing at block 1 (non-finite activations on its rows only), after
# which both processes exit non-zero.
GROUP_TIMEOUT_S = 10
SLOW_RANK0_S = 15


def _scenario(name: str, rank: int, out_folder: str) -> None:
    import json
    import time

    from hf_recon_prune.architectures import resolve_layout

    model = make_tiny_model("llama", num_layers=3)
    config = _config(method="magnitude", reconstruction=[], calibration=os.path.join(out_folder, "missing.txt"))
    pruner = Pruner(model, config, calibration_data=_calibration(**CALIBRATION), show_progress=False)
    if name == "slow-rank0":
        real = pruner._calibration_set

        def slow():
            time.sleep(SLOW_RANK0_S)  # longer than the group's timeout: the others wait on the store, not in a collective
            return real()

        pruner._calibration_set = slow
    elif name == "rank0-calibration":
        pruner.calibration_data = None  # rank 0 alone builds the set from a file that does not exist
    elif name == "rank1-block1" and rank == 1:
        with torch.no_grad():
            resolve_layout(model).blocks[1].post_attention_layernorm.weight.fill_(float("nan"))
    started = time.monotonic()
    outcome = {"ok": True}
    try:
        pruner.prune()
        if name == "slow-rank0":  # rank 0 saves, the other receives the folder; a refused save fails both
            outcome["saved"] = pruner.save_pretrained(os.path.join(out_folder, "saved"))
            notes = os.path.join(out_folder, "notes")
            os.makedirs(notes, exist_ok=True)
            with open(os.path.join(notes, "keep.txt"), "w") as handle:
                handle.write("not a model")
            try:
                pruner.save_pretrained(notes)
            except Exception as error:  # noqa: BLE001 - recorded for the test
                outcome["refused_save"] = {"type": type(error).__name__, "message": str(error),
                                           "failing_rank": getattr(error, "rank", None)}
    except Exception as error:  # noqa: BLE001 - recorded for the test
        cause = error
        while cause is not None and type(cause).__name__ != "DataParallelError":
            cause = cause.__cause__
        outcome = {"ok": False, "type": type(error).__name__, "message": str(error),
                   "data_parallel": None if cause is None else str(cause),
                   "failing_rank": None if cause is None else cause.rank}
        if name == "rank1-block1":
            raise
    finally:
        outcome["seconds"] = time.monotonic() - started
        with open(os.path.join(out_folder, f"{name}-rank{rank}.json"), "w") as handle:
            json.dump(outcome, handle)


def _failing_worker(rank: int, world_size: int, ports: list, out_folder: str) -> None:
    import datetime

    torch.set_num_threads(1)
    for port, name in zip(ports, ("slow-rank0", "rank0-calibration", "rank1-block1")):
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        try:
            _scenario(name, rank, out_folder)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


@pytest.fixture(scope="module")
def failing_runs(tmp_path_factory):
    import json
    import multiprocessing
    import time

    folder = tmp_path_factory.mktemp("data-parallel-failures")
    context = multiprocessing.get_context("spawn")
    ports = [_free_port() for _ in range(3)]
    processes = [context.Process(target=_failing_worker, args=(rank, 2, ports, str(folder))) for rank in range(2)]
    started = time.monotonic()
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=max(1.0, 240 - (time.monotonic() - started)))
    hung = [rank for rank, process in enumerate(processes) if process.is_alive()]
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join()
    assert not hung, f"ranks {hung} hung"
    results = {}
    for name in ("slow-rank0", "rank0-calibration", "rank1-block1"):
        results[name] = [json.loads((folder / f"{name}-rank{rank}.json").read_text()) for rank in range(2)]
    return results, [process.exitcode for process in processes]


def test_a_rank0_step_longer_than_the_group_timeout_does_not_fail_the_others(failing_runs):
    results, _ = failing_runs
    ranks = results["slow-rank0"]
    assert [r["ok"] for r in ranks] == [True, True], ranks
    assert ranks[1]["seconds"] >= SLOW_RANK0_S > GROUP_TIMEOUT_S
    # Saving is a rank-0 step too: both get its folder; a save rank 0 refuses fails both with its error.
    assert ranks[0]["saved"] == ranks[1]["saved"] and os.path.isfile(os.path.join(ranks[0]["saved"], "config.json"))
    refused = [r["refused_save"] for r in ranks]
    assert refused[0] == refused[1] and refused[0]["type"] == "DataParallelError" and refused[0]["failing_rank"] == 0
    assert "failed on rank 0 of 2 while saving the model to" in refused[0]["message"]
    assert "does not hold a saved model" in refused[0]["message"]


def test_rank0_failing_alone_fails_every_rank_with_its_error(failing_runs):
    results, _ = failing_runs
    ranks = results["rank0-calibration"]
    assert [r["ok"] for r in ranks] == [False, False]
    assert ranks[0]["data_parallel"] == ranks[1]["data_parallel"]
    assert ranks[0]["failing_rank"] == ranks[1]["failing_rank"] == 0
    assert "failed on rank 0 of 2 while setting up the run: FileNotFoundError" in ranks[1]["data_parallel"]
    assert all(r["seconds"] < GROUP_TIMEOUT_S for r in ranks)  # decided at once, not by a timeout


def test_rank1_failing_at_block1_fails_both_processes_with_the_same_error(failing_runs):
    """The acceptance case: both exit non-zero with the same error naming rank 1, within a bounded time."""
    results, exit_codes = failing_runs
    ranks = results["rank1-block1"]
    assert all(code not in (0, None) for code in exit_codes), exit_codes
    assert [r["ok"] for r in ranks] == [False, False]
    assert ranks[0]["type"] == ranks[1]["type"] == "PruningFailedError"
    assert ranks[0]["data_parallel"] == ranks[1]["data_parallel"]
    assert ranks[0]["failing_rank"] == ranks[1]["failing_rank"] == 1
    assert ranks[1]["data_parallel"].startswith("the data-parallel run failed on rank 1 of 2 at decoder block(s) [1]")
    assert "NonFiniteActivationsError: decoder block 1 produced non-finite activations" in ranks[0]["data_parallel"]
    assert all(r["seconds"] < GROUP_TIMEOUT_S for r in ranks)  # neither waited for the group's timeout
