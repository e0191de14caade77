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
RECIPES = {
    "sparsegpt-gp-cr": dict(method="sparsegpt", reconstruction=["lr", "br", "gp", "cr"], br_epochs=3, br_lr=1e-3,
                            br_batch_size=4),
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
