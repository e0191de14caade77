"""Reconstruction recipes side by side, as in the paper's tables, plus self-generated calibration data.

For every pruning method: masks only, LR, BR, BR+GP, BR+GP+CR (BR recipes in "full" and "lora" mode), each with
0 or N self-generated samples mixed into the reconstruction loss. Every run starts from the same dense weights and
the same calibration windows; reported per run: held-out perplexity, final-block reconstruction error on the
calibration and held-out samples (before and after reconstruction), wall time, peak memory.

Runs on a GPU (the numbers in docs/benchmarks.md come from an H200) or on the CPU with a reduced budget. Needs only
torch, transformers, peft (and gguf + langdetect for the default model and self-generation): no datasets/evaluate.

    python benchmarks/recipes.py --methods sparsegpt,wanda --out benchmarks/results/recipes.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import resource
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hf_recon_prune import PruningConfig  # noqa: E402
from hf_recon_prune.calibration import build_calibration_set, load_texts, stream_windows_for_eval  # noqa: E402
from hf_recon_prune.evaluation import perplexity_of_ids  # noqa: E402
from hf_recon_prune.models import load_model  # noqa: E402
from hf_recon_prune.pruner import Pruner  # noqa: E402

RECIPES = {
    "mask": [],
    "lr": ["lr"],
    "br": ["lr", "br"],
    "br+gp": ["lr", "br", "gp"],
    "br+gp+cr": ["lr", "br", "gp", "cr"],
}


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores (torch {torch.__version__})"


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dense, tokenizer = load_model(args.model, dtype=args.dtype if args.dtype == "auto" else getattr(torch, args.dtype))
    dense = dense.to(device).eval()
    eval_windows = stream_windows_for_eval(load_texts(args.eval_source, split="test"), tokenizer, args.eval_seq_len)
    results = {
        "machine": machine(device), "model": args.model, "eval_source": args.eval_source,
        "eval_windows": list(eval_windows.shape), "settings": vars(args), "runs": [],
    }
    started = time.perf_counter()
    results["dense_perplexity"] = perplexity_of_ids(dense, eval_windows, batch_size=args.eval_batch_size)
    print(f"dense perplexity {results['dense_perplexity']:.3f} ({time.perf_counter() - started:.1f}s)", flush=True)

    calibration_sets = {}
    for num_self in args.self_samples:
        cfg = PruningConfig(calibration=args.calibration, num_samples=args.num_samples, seq_len=args.seq_len,
                            num_self_samples=num_self, heldout_fraction=args.heldout_fraction, seed=args.seed,
                            self_gen_cache_dir=args.cache_dir, self_gen_batch_size=args.self_gen_batch_size)
        started = time.perf_counter()
        calibration_sets[num_self] = build_calibration_set(cfg, tokenizer, dense, show_progress=False)
        print(f"calibration set with {num_self} self-generated samples: {time.perf_counter() - started:.1f}s",
              flush=True)

    for method in args.methods:
        for recipe in args.recipes:
            modes = args.modes if "br" in RECIPES[recipe] else ["-"]
            for mode in modes:
                for num_self in (args.self_samples if "br" in RECIPES[recipe] else [0]):
                    for compiled in (args.compile if "br" in RECIPES[recipe] else ["auto"]):
                        results["runs"].append(
                            one_run(dense, tokenizer, calibration_sets[num_self], eval_windows, method, recipe, mode,
                                    num_self, device, args, compiled)
                        )
                        with open(args.out, "w", encoding="utf-8") as handle:
                            json.dump(results, handle, indent=2)
    return results


COMPILE_SETTINGS = {"off": False, "on": True, "auto": "auto"}


def one_run(dense, tokenizer, calibration, eval_windows, method, recipe, mode, num_self, device, args,
            compiled: str = "auto") -> dict:
    model = copy.deepcopy(dense)
    config = PruningConfig(
        method=method, sparsity=args.sparsity, pattern=args.pattern, reconstruction=RECIPES[recipe],
        reconstruction_mode="full" if mode == "-" else mode, calibration=args.calibration,
        num_samples=args.num_samples, seq_len=args.seq_len, num_self_samples=num_self, seed=args.seed,
        br_epochs=args.epochs, br_lr=args.br_lr, br_batch_size=args.br_batch_size, lora_rank=args.lora_rank,
        lora_alpha=2.0 * args.lora_rank, forward_batch_size=args.forward_batch_size, device=str(device),
        compile_blocks=COMPILE_SETTINGS[compiled],
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    report = Pruner(model, config, tokenizer=tokenizer, calibration_data=calibration, show_progress=False).prune()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    # the engine resets CUDA's peak statistics per window: its own list has every window's peak
    window_peaks = report.memory.get("peak_device_bytes_per_window") or []
    peak = max(window_peaks) / 2**30 if window_peaks else peak_memory_gib(device)
    ppl = perplexity_of_ids(model, eval_windows, batch_size=args.eval_batch_size)
    last = report.blocks[-1]
    row = {
        "method": method, "recipe": recipe, "mode": mode, "self_samples": num_self, "compile_blocks": compiled,
        "perplexity": ppl,
        "final_error_calibration_before": last.error_before.get("calibration"),
        "final_error_calibration": last.error_after.get("calibration"),
        "final_error_heldout_before": last.error_before.get("heldout"),
        "final_error_heldout": last.error_after.get("heldout"),
        "mean_sparsity": report.mean_sparsity, "seconds": seconds, "peak_memory_gib": peak,
        "stage_seconds": report.stage_seconds(),
        "block_errors": [
            {"calibration": b.error_after.get("calibration"), "heldout": b.error_after.get("heldout")}
            for b in report.blocks
        ],
        "reverted_blocks": [b.index for b in report.blocks if b.reverted],
    }
    print(json.dumps({k: v for k, v in row.items() if k not in ("block_errors", "stage_seconds")}), flush=True)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def to_markdown(results: dict) -> str:
    def fmt(value, digits=4):
        return "–" if value is None else f"{value:.{digits}g}"

    lines = [
        f"Machine: {results['machine']}; model: {results['model']}; dense held-out perplexity "
        f"{results['dense_perplexity']:.3f}.",
        "",
        "| method | recipe | mode | self samples | compile | held-out ppl | final-block err. calib. (LR → after) | "
        "final-block err. held-out (LR → after) | time (s) | peak mem (GiB) |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        lines.append(
            f"| {r['method']} | {r['recipe']} | {r['mode']} | {r['self_samples']} | {r.get('compile_blocks', 'off')} | "
            f"{r['perplexity']:.3f} | "
            f"{fmt(r['final_error_calibration_before'])} → {fmt(r['final_error_calibration'])} | "
            f"{fmt(r['final_error_heldout_before'])} → {fmt(r['final_error_heldout'])} | {r['seconds']:.1f} | "
            f"{r['peak_memory_gib']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id / folder; default: offline SmolLM2-135M-Instruct")
    parser.add_argument("--methods", default="sparsegpt,wanda", type=lambda s: s.split(","))
    parser.add_argument("--recipes", default="mask,lr,br,br+gp,br+gp+cr", type=lambda s: s.split(","))
    parser.add_argument("--modes", default="full,lora", type=lambda s: s.split(","))
    parser.add_argument("--self-samples", default="0", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--compile", default="auto", type=lambda s: s.split(","),
                        help="compile_blocks settings to run side by side, of off,on,auto (auto: on CUDA only)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--pattern", default="unstructured")
    parser.add_argument("--calibration", default="default")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--heldout-fraction", type=float, default=0.125)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--br-lr", type=lambda s: s if s == "auto" else float(s), default=2e-4,
                        help="a learning rate, or auto (chosen per window by held-out error)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="the model's dtype (auto: as it was saved; the offline SmolLM2 is float32)")
    parser.add_argument("--br-batch-size", type=int, default=8)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--forward-batch-size", type=int, default=32)
    parser.add_argument("--self-gen-batch-size", type=int, default=64)
    parser.add_argument("--cache-dir", default=os.path.join(os.path.expanduser("~"), ".cache", "hf-recon-prune", "selfgen"))
    parser.add_argument("--eval-source", default="default")
    parser.add_argument("--eval-seq-len", type=int, default=512)
    parser.add_argument("--eval-batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="recipes.json")
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    unknown = [c for c in args.compile if c not in COMPILE_SETTINGS]
    if unknown:
        parser.error(f"--compile {','.join(unknown)}: allowed values are {', '.join(COMPILE_SETTINGS)}")
    results = run(args)
    table = to_markdown(results)
    print(table)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(table)


if __name__ == "__main__":
    main()
