"""The offline demo's recipes at several calibration budgets, side by side on one loaded model: what each budget
closes of the LR-to-dense gap and what it costs, to choose the budget of ``make demo``.

A budget is ``SAMPLESxSEQ_LENxEPOCHS``. For each, SparseGPT 50 % with LR and with LR + BR + GP (``br_lr="auto"``) from
the default corpus, as ``examples/reconstruction_demo.py`` runs them (LR is run once per samples x seq_len: epochs
do not change it). Perplexity on the demo's held-out windows: the default corpus's held-out part and the standard
library's module docstrings, 8 windows of 512 tokens each.

    python benchmarks/demo_budgets.py --budgets 24x128x4,32x128x3 --out benchmarks/results/demo_budgets_cpu.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
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

SOURCES = ("default corpus, held-out part", "stdlib docstrings")


def _budgets(text: str) -> list[tuple[int, int, int]]:
    """``"24x128x4,32x128x3"`` -> ``[(24, 128, 4), (32, 128, 3)]``."""
    try:
        budgets = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        budgets = []
    if not budgets or any(len(b) != 3 or min(b) < 1 for b in budgets):
        raise argparse.ArgumentTypeError(f"budgets {text!r}: expected SAMPLESxSEQ_LENxEPOCHS, comma-separated")
    return budgets  # type: ignore[return-value]


def _pruned(dense, tokenizer, held_out, samples: int, seq_len: int, epochs: int, reconstruction: list[str]) -> dict:
    model = copy.deepcopy(dense)
    config = PruningConfig(method="sparsegpt", sparsity=0.5, reconstruction=reconstruction, calibration="default",
                           num_samples=samples, seq_len=seq_len, br_epochs=epochs, br_lr="auto", device="cpu")
    started = time.perf_counter()
    Pruner(model, config, tokenizer=tokenizer, show_progress=False).prune()
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "perplexity": {name: perplexity_of_ids(model, ids) for name, ids in held_out.items()}}


def gap_closed(dense: dict, lr: dict, reconstructed: dict) -> dict[str, float]:
    """The fraction of the LR-to-dense perplexity gap that reconstruction closes, per source."""
    return {name: (lr[name] - reconstructed[name]) / (lr[name] - dense[name]) for name in dense}


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Hub id / folder; default: offline SmolLM2-135M-Instruct")
    parser.add_argument("--budgets", type=_budgets, default=_budgets("24x128x4,32x128x4"))
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--out", default="demo_budgets.json")
    args = parser.parse_args(argv)

    dense, tokenizer = load_model(args.model)
    held_out = dict(zip(SOURCES, (
        stream_windows_for_eval(load_texts("default", split="test"), tokenizer, args.eval_seq_len,
                                max_windows=args.eval_windows),
        stream_windows_for_eval(stdlib_docstrings(), tokenizer, args.eval_seq_len, max_windows=args.eval_windows))))
    results: dict[str, Any] = {
        "setting": {"budgets": [list(b) for b in args.budgets], "eval_seq_len": args.eval_seq_len,
                    "eval_windows": args.eval_windows},
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "cpu_threads": torch.get_num_threads()},
        "dense": {name: perplexity_of_ids(dense, ids) for name, ids in held_out.items()},
        "runs": [],
    }
    lr_runs: dict[tuple[int, int], dict] = {}
    for samples, seq_len, epochs in args.budgets:
        if (samples, seq_len) not in lr_runs:
            lr_runs[samples, seq_len] = _pruned(dense, tokenizer, held_out, samples, seq_len, epochs, ["lr"])
        lr = lr_runs[samples, seq_len]
        reconstructed = _pruned(dense, tokenizer, held_out, samples, seq_len, epochs, ["lr", "br", "gp"])
        run = {"samples": samples, "seq_len": seq_len, "epochs": epochs, "lr": lr, "lr_br_gp": reconstructed,
               "gap_closed": gap_closed(results["dense"], lr["perplexity"], reconstructed["perplexity"])}
        results["runs"].append(run)
        print(f"{samples} x {seq_len}, {epochs} epochs: LR " + " / ".join(f"{v:.2f}" for v in lr["perplexity"].values())
              + ", LR + BR + GP " + " / ".join(f"{v:.2f}" for v in reconstructed["perplexity"].values())
              + ", gap closed " + " / ".join(f"{v:.0%}" for v in run["gap_closed"].values())
              + f" ({lr['seconds']:.0f} s, {reconstructed['seconds']:.0f} s)", flush=True)
        with open(args.out, "w", encoding="utf-8") as handle:  # after every budget: nothing lost if stopped
            json.dump(results, handle, indent=1)
    return results


if __name__ == "__main__":
    main()
