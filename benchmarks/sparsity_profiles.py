"""Uniform sparsity against OWL's non-uniform profile, side by side, on held-out text of two sources.

For every (method, recipe, sparsity) asked for, one run with ``sparsity_profile="uniform"`` and one with
``sparsity_profile="owl"`` (one run per OWL ``lambda`` given), all from the same dense weights and the same
calibration windows. Reported per run: perplexity on the default corpus's held-out part and on the standard
library's module docstrings (another source than the calibration text), the per-block sparsities OWL chose (from
the report), the mean sparsity of the pruned weights, and the pruning time.

Runs on the CPU at a laptop budget (the numbers in docs/benchmarks.md) or on a GPU with ``--device cuda``:

    python benchmarks/sparsity_profiles.py --runs wanda:mask,sparsegpt:lr --sparsities 0.5,0.6,0.7 \\
        --out benchmarks/results/sparsity_profiles_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_recon_prune import Pruner, PruningConfig  # noqa: E402
from hf_recon_prune.calibration import load_texts, stream_windows_for_eval  # noqa: E402
from hf_recon_prune.calibration.sources import stdlib_docstrings  # noqa: E402
from hf_recon_prune.evaluation import perplexity_of_ids  # noqa: E402
from hf_recon_prune.models import load_model  # noqa: E402

RECIPES = {"mask": [], "lr": ["lr"], "br+gp": ["lr", "br", "gp"], "br+gp+cr": ["lr", "br", "gp", "cr"]}
SOURCES = ("default corpus, held-out part", "stdlib docstrings")


def _runs(text: str) -> list[tuple[str, str]]:
    """``"wanda:mask,sparsegpt:lr"`` -> ``[("wanda", "mask"), ("sparsegpt", "lr")]``."""
    runs = []
    for item in text.split(","):
        method, _, recipe = item.partition(":")
        if recipe not in RECIPES:
            raise argparse.ArgumentTypeError(f"recipe {recipe!r} in {item!r} is not one of {', '.join(RECIPES)}")
        runs.append((method, recipe))
    return runs


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def one_run(dense, tokenizer, held_out, args, method: str, recipe: str, sparsity: float,
            profile: str, lambda_: float) -> dict[str, Any]:
    model = copy.deepcopy(dense)
    config = PruningConfig(
        method=method, sparsity=sparsity, reconstruction=RECIPES[recipe], calibration="default",
        num_samples=args.num_samples, seq_len=args.seq_len, br_epochs=args.epochs, br_lr=args.br_lr,
        sparsity_profile=profile, owl_lambda=lambda_ if profile == "owl" else PruningConfig.owl_lambda,
        owl_threshold=args.owl_threshold, device=args.device, seed=args.seed)
    started = time.perf_counter()
    report = Pruner(model, config, tokenizer=tokenizer, show_progress=False).prune()
    seconds = time.perf_counter() - started
    targets = [sparsity if block.target_sparsity is None else block.target_sparsity for block in report.blocks]
    result = {
        "method": method, "recipe": recipe, "sparsity": sparsity, "profile": profile,
        "owl_lambda": lambda_ if profile == "owl" else None, "seconds": seconds,
        "perplexity": {name: perplexity_of_ids(model, ids.to(args.device)) for name, ids in held_out.items()},
        "block_target_sparsity": targets,
        "mean_sparsity_of_pruned_weights": report.mean_sparsity,
    }
    del model
    return result


def _table(results: dict[str, Any]) -> str:
    dense = results["dense"]
    lines = ["| method | recipe | sparsity | profile | " + " | ".join(SOURCES) + " | block sparsity (min–max) | time |",
             "|---|---|---:|---|" + "---:|" * len(SOURCES) + "---|---:|",
             "| dense | | | | " + " | ".join(f"{dense[s]:.2f}" for s in SOURCES) + " | | |"]
    for run in results["runs"]:
        profile = run["profile"] + (f" (λ {run['owl_lambda']:g})" if run["owl_lambda"] is not None else "")
        cells = " | ".join(f"{run['perplexity'][s]:.2f}" for s in SOURCES)
        spread = f"{min(run['block_target_sparsity']):.3f}–{max(run['block_target_sparsity']):.3f}"
        lines.append(f"| {run['method']} | {run['recipe']} | {run['sparsity']:g} | {profile} | {cells} | {spread} "
                     f"| {run['seconds']:.0f} s |")
    return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Hub id / folder; default: offline SmolLM2-135M-Instruct")
    parser.add_argument("--runs", type=_runs, default=_runs("wanda:mask,sparsegpt:lr"),
                        help="method:recipe pairs; recipes: " + ", ".join(RECIPES))
    parser.add_argument("--sparsities", default=[0.5, 0.6, 0.7], type=lambda s: [float(x) for x in s.split(",")])
    parser.add_argument("--owl-lambdas", default=[0.08], type=lambda s: [float(x) for x in s.split(",")],
                        help="one OWL run per value (0.08: OWL's and the package's default)")
    parser.add_argument("--owl-threshold", type=float, default=5.0)
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--br-lr", type=lambda s: s if s == "auto" else float(s), default="auto")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=16, help="held-out windows per source")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="sparsity_profiles.json")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    dense, tokenizer = load_model(args.model)
    dense.to(args.device)
    held_out = dict(zip(SOURCES, (
        stream_windows_for_eval(load_texts("default", split="test"), tokenizer, args.eval_seq_len,
                                max_windows=args.eval_windows),
        stream_windows_for_eval(stdlib_docstrings(), tokenizer, args.eval_seq_len, max_windows=args.eval_windows))))
    results: dict[str, Any] = {
        "setting": {k: v for k, v in vars(args).items() if k not in ("out", "runs")},
        "runs_asked": [f"{m}:{r}" for m, r in args.runs],
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu_threads": torch.get_num_threads(), "device": args.device},
        "commit": _commit(),
        "dense": {name: perplexity_of_ids(dense, ids.to(args.device)) for name, ids in held_out.items()},
        "runs": [],
    }
    for method, recipe in args.runs:
        for sparsity in args.sparsities:
            for profile, lambda_ in [("uniform", 0.0)] + [("owl", value) for value in args.owl_lambdas]:
                run = one_run(dense, tokenizer, held_out, args, method, recipe, sparsity, profile, lambda_)
                results["runs"].append(run)
                print(f"{method} {recipe} {sparsity:g} {profile} {run['owl_lambda'] or ''}: " + ", ".join(
                    f"{v:.2f}" for v in run["perplexity"].values()) + f" ({run['seconds']:.0f} s, block sparsity "
                    f"median {statistics.median(run['block_target_sparsity']):.3f})", flush=True)
                with open(args.out, "w", encoding="utf-8") as handle:  # after every run: nothing lost if stopped
                    json.dump(results, handle, indent=1)
    table = _table(results)
    with open(os.path.splitext(args.out)[0] + ".md", "w", encoding="utf-8") as handle:
        handle.write(table + "\n")
    print(table)
    return results


if __name__ == "__main__":
    main()
