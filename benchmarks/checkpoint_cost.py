"""What checkpoints cost: per block while pruning, and once when resuming, with the streams written (format 2) or
recomputed on resume (format 3, the default), side by side in one process.

On a random-weight Llama model (``scale_gpu.random_model``; Llama-2-7B's shape unless told otherwise) and random
calibration ids, every mode runs the same recipe with ``checkpoint_dir`` set:

    checkpoint s / block   the engine's ``checkpoint`` stage (block files, dense files, the step folder, and the
                           stream files in format 2), median over the blocks
    written / block        bytes that the run's checkpoints wrote, divided by the blocks (files that were replaced
                           counted every time: a step's files and the stream files of every step)
    resume                 ``prune(resume=True)`` of the finished run's checkpoint on a freshly built model: it loads
                           every block and, in format 3, recomputes the streams through all of them (the longest a
                           resume can take)

The resumed model is compared with the run's own, bit for bit (``identical``).

GPU (one H200, 7B shape, 3 blocks, BR at 1 epoch, about a minute; format 2 writes 4 GiB a step under --work-dir):
    python benchmarks/checkpoint_cost.py --layers 3 --epochs 1 --work-dir /tmp/ckpt \\
        --out benchmarks/results/checkpoint_cost_h200.json
CPU (the SmolLM2 shape):
    python benchmarks/checkpoint_cost.py --device cpu --layers 4 --hidden 576 --intermediate 1536 --heads 9 \\
        --kv-heads 3 --vocab 49152 --dtype float32 --samples 64 --seq-len 512 --epochs 1 --work-dir /tmp/ckpt \\
        --out /tmp/checkpoint_cost.json

Needs torch, transformers, peft, accelerate; never imports datasets/evaluate/gguf; no network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from scale_gpu import add_shape_arguments, machine, random_model, split_recipes  # noqa: E402

from hf_recon_prune import PruningConfig  # noqa: E402
from hf_recon_prune.calibration import CalibrationSet  # noqa: E402
from hf_recon_prune.pruner import Pruner  # noqa: E402

RECIPES = {"lr": ["lr"], "br+gp": ["lr", "br", "gp"], "br+gp+cr": ["lr", "br", "gp", "cr"]}
MODES = {"recompute": False, "save": True}  # run_checkpoints.SAVE_STREAMS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    run = parser.add_argument_group("run")
    run.add_argument("--recipe", default="br+gp", help=f"one of {list(RECIPES)}")
    run.add_argument("--modes", default="recompute,save", help=f"comma-separated subset of {list(MODES)}")
    run.add_argument("--samples", type=int, default=256)
    run.add_argument("--seq-len", type=int, default=1024)
    run.add_argument("--epochs", type=int, default=10)
    run.add_argument("--device", default=None, help="default: cuda if available")
    run.add_argument("--stream-location", default="cpu", choices=["auto", "device", "cpu", "disk"])
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--work-dir", required=True, help="checkpoints go in <work-dir>/<mode> (replaced if there)")
    run.add_argument("--out", default="benchmarks/results/checkpoint_cost.json")
    args = parser.parse_args(argv)
    args.recipe = split_recipes(parser, args.recipe, RECIPES)[0]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or any(m not in MODES for m in args.modes):
        parser.error(f"--modes {args.modes} is not allowed; allowed: a comma-separated subset of {list(MODES)}")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


class _WriteCounter:
    """Bytes written into the checkpoint folder: every file the checkpoint code saves, counted when saved."""

    def __init__(self):
        self.bytes = 0

    def wrap(self, module, name: str):
        real = getattr(module, name)

        def counting(tensors, path, *rest, **kwargs):
            real(tensors, path, *rest, **kwargs)
            self.bytes += os.path.getsize(path)

        setattr(module, name, counting)
        return real


def run_mode(args, mode: str) -> dict[str, Any]:
    import hf_recon_prune.checkpoint as checkpoint
    import hf_recon_prune.run_checkpoints as run_checkpoints

    folder = os.path.join(args.work_dir, mode)
    shutil.rmtree(folder, ignore_errors=True)
    ids = torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(args.seed + 1))
    calibration = CalibrationSet(
        input_ids=ids, is_self_generated=torch.zeros(args.samples, dtype=torch.bool),
        heldout_ids=ids.new_zeros((0, args.seq_len)), statistics_mask=torch.ones(args.samples, dtype=torch.bool),
        description={"source": "random tokens", "num_samples": args.samples},
    )
    config = PruningConfig(
        method="sparsegpt", sparsity=0.5, reconstruction=RECIPES[args.recipe], num_samples=args.samples,
        seq_len=args.seq_len, br_epochs=args.epochs, device=args.device, stream_location=args.stream_location,
        seed=args.seed, heldout_fraction=0.0, checkpoint_dir=folder,
        compile_blocks=False,  # BR's speed does not matter here, and a first compilation would blur the times
    )
    counter = _WriteCounter()
    real_save, real_streams = counter.wrap(checkpoint, "_save_tensors"), run_checkpoints.SAVE_STREAMS
    run_checkpoints.SAVE_STREAMS = MODES[mode]
    try:
        model = random_model(args)
        started = time.perf_counter()
        report = Pruner(model, config, calibration_data=calibration, show_progress=False).prune()
        prune_seconds = time.perf_counter() - started
        written = counter.bytes
        resumed = random_model(args)
        started = time.perf_counter()
        Pruner(resumed, config, calibration_data=calibration, show_progress=False).prune(resume=True)
        resume_seconds = time.perf_counter() - started
    finally:
        checkpoint._save_tensors, run_checkpoints.SAVE_STREAMS = real_save, real_streams
    identical = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed.state_dict().values()))
    per_block = [b.seconds.get("checkpoint", 0.0) for b in report.blocks]
    stream_bytes = args.samples * args.seq_len * args.hidden * torch.finfo(getattr(torch, args.dtype)).bits // 8
    return {
        "mode": mode, "recipe": args.recipe, "blocks": len(per_block), "prune_seconds": prune_seconds,
        "checkpoint_seconds_per_block": per_block, "checkpoint_seconds_median": statistics.median(per_block),
        "written_bytes": written, "written_bytes_per_block": written / len(per_block),
        "stream_bytes": stream_bytes, "resume_seconds": resume_seconds, "identical": identical,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.work_dir, exist_ok=True)
    results = {"machine": machine(torch.device(args.device), 1), "settings": vars(args), "runs": []}
    for mode in args.modes:
        result = run_mode(args, mode)
        results["runs"].append(result)
        print(f"{mode}: checkpoint {result['checkpoint_seconds_median']:.2f} s/block (median), written "
              f"{result['written_bytes_per_block'] / 2**20:.1f} MiB/block (a stream is "
              f"{result['stream_bytes'] / 2**20:.1f} MiB), pruning {result['prune_seconds']:.1f} s, resume of the "
              f"finished run {result['resume_seconds']:.1f} s, identical {result['identical']}", flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
    print(f"wrote {args.out}")
    return 0 if all(r["identical"] for r in results["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
