"""Time SparseGPT's solvers side by side: the column loop against the batched solve (unstructured) and the
group-by-group N:M solve, on one layer with random weights and a Hessian from random inputs. The batched solve of an
unstructured block runs as the package runs it on the device (``SOLVE_GROUP_COLUMNS``: groups of 32 columns on the
CPU) and, beside it, as one solve a column block.

    python benchmarks/sparsegpt_solver.py --shapes 1024x1024,576x1536 --repeats 3 --out sparsegpt_solver.json

Prints and writes the median seconds of each solver, and checks that they give the same mask.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_recon_prune.criteria import sparsegpt as sparsegpt_module  # noqa: E402
from hf_recon_prune.criteria import sparsegpt_prune  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_solver(W, H, nm, batched: bool, repeats: int, device: torch.device):
    times, result = [], None
    for _ in range(repeats + 1):  # the first call warms up
        _sync(device)
        started = time.perf_counter()
        result = sparsegpt_prune(W, H, 0.5, nm, batched=batched)
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]), result


def _time_whole_block_solve(W, H, repeats: int, device: torch.device):
    groups = sparsegpt_module.SOLVE_GROUP_COLUMNS
    sparsegpt_module.SOLVE_GROUP_COLUMNS = {}
    try:
        return time_solver(W, H, None, True, repeats, device)
    finally:
        sparsegpt_module.SOLVE_GROUP_COLUMNS = groups


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1024x1024,576x1536", help="comma-separated OUTxIN layer shapes")
    parser.add_argument("--patterns", default="unstructured,2:4", help="comma-separated: unstructured, N:M")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--out", default="sparsegpt_solver.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator().manual_seed(0)
    rows = []
    for shape in args.shapes.split(","):
        d_out, d_in = (int(v) for v in shape.lower().split("x"))
        X = torch.randn(args.tokens, d_in, generator=generator)
        W = torch.randn(d_out, d_in, generator=generator).to(device)
        H = (X.T @ X / args.tokens).to(device)
        for pattern in args.patterns.split(","):
            nm = None if pattern == "unstructured" else tuple(int(v) for v in pattern.split(":"))
            loop_seconds, loop = time_solver(W, H, nm, False, args.repeats, device)
            fast_seconds, fast = time_solver(W, H, nm, True, args.repeats, device)
            row = {"shape": [d_out, d_in], "pattern": pattern, "column_loop_seconds": loop_seconds,
                   "batched_seconds": fast_seconds, "speed_up": loop_seconds / fast_seconds,
                   "same_mask": bool(torch.equal(loop.keep_mask, fast.keep_mask)),
                   "max_weight_difference": float((loop.weight - fast.weight).abs().max()),
                   "group_columns": sparsegpt_module.SOLVE_GROUP_COLUMNS.get(device.type)}
            text = f"batched {fast_seconds:.3f} s ({row['speed_up']:.2f}x)"
            if nm is None and row["group_columns"] is not None:  # beside it: one solve a column block
                whole_seconds, whole = _time_whole_block_solve(W, H, args.repeats, device)
                row["one_solve_a_block_seconds"] = whole_seconds
                row["same_mask"] = row["same_mask"] and bool(torch.equal(loop.keep_mask, whole.keep_mask))
                text += f", one solve a block {whole_seconds:.3f} s"
            rows.append(row)
            print(f"{d_out}x{d_in} {pattern}: column loop {loop_seconds:.3f} s, {text}, same mask {row['same_mask']}",
                  flush=True)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump({"machine": machine, "torch": torch.__version__, "settings": vars(args), "rows": rows}, handle,
                  indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
