"""Time and memory of pruning a mixture-of-experts model, per block, with the expert-token coverage.

A Qwen3-MoE-shaped model (Qwen3-30B-A3B by default: hidden 2048, 128 experts of intermediate 768, top-8 routing,
32 heads with 4 KV heads of dimension 128) with random weights (meta init, seeded normal fill, drawn on the GPU when
there is one) and random calibration token ids (256 x 1024 by default) is pruned with each recipe by ``Pruner``.
For each recipe the JSON has the per-block stage times that the engine records (``report.blocks[i].seconds``), their
median over the blocks, the measured peak GPU memory per window, and the calibration tokens routed to each expert
of each block (min / median / max, and how many experts fell back to every token's statistics). There is no FLOP
floor here: the experts' work depends on the routing, which random weights make near-uniform.

Needs torch, transformers, peft, accelerate; never imports datasets/evaluate/gguf; no network.

GPU (one H200):
    python benchmarks/moe_profile.py --layers 2 --recipes lr,br+gp --out benchmarks/results/moe_profile.json
CPU smoke test:
    python benchmarks/moe_profile.py --device cpu --layers 2 --hidden 64 --experts 4 --top-k 2 \\
        --moe-intermediate 32 --heads 4 --kv-heads 2 --head-dim 16 --vocab 256 --samples 4 --seq-len 16 \\
        --epochs 1 --out /tmp/moe.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from scale_gpu import machine, random_from_config, split_recipes  # noqa: E402

from hf_recon_prune import PruningConfig  # noqa: E402
from hf_recon_prune.pruner import Pruner  # noqa: E402

RECIPES = {"lr": ["lr"], "br+gp": ["lr", "br", "gp"], "br+gp+cr": ["lr", "br", "gp", "cr"]}
GiB = float(1 << 30)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shape = parser.add_argument_group("model shape (Qwen3-30B-A3B by default)")
    shape.add_argument("--layers", type=int, default=2)
    shape.add_argument("--hidden", type=int, default=2048)
    shape.add_argument("--experts", type=int, default=128)
    shape.add_argument("--top-k", type=int, default=8)
    shape.add_argument("--moe-intermediate", type=int, default=768)
    shape.add_argument("--heads", type=int, default=32)
    shape.add_argument("--kv-heads", type=int, default=4)
    shape.add_argument("--head-dim", type=int, default=128)
    shape.add_argument("--vocab", type=int, default=32000)
    shape.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    run = parser.add_argument_group("run")
    run.add_argument("--recipes", default="lr,br+gp", help=f"comma-separated subset of {list(RECIPES)}")
    run.add_argument("--method", default="sparsegpt", choices=["sparsegpt", "wanda", "magnitude"])
    run.add_argument("--mode", default="full", choices=["full", "lora"])
    run.add_argument("--samples", type=int, default=256)
    run.add_argument("--seq-len", type=int, default=1024)
    run.add_argument("--epochs", type=int, default=10)
    run.add_argument("--br-batch-size", type=int, default=8)
    run.add_argument("--forward-batch-size", type=int, default=8)
    run.add_argument("--stream-location", default="cpu", choices=["auto", "device", "cpu", "disk"])
    run.add_argument("--compile", action="store_true", help="compile_blocks=True for BR")
    run.add_argument("--device", default=None, help="default: cuda if available")
    run.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/moe_profile.json")
    args = parser.parse_args(argv)
    args.recipes = split_recipes(parser, args.recipes, RECIPES)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def random_moe_model(args):
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim, num_experts=args.experts,
        num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_intermediate, intermediate_size=4 * args.hidden,
        decoder_sparse_step=1, vocab_size=args.vocab, max_position_embeddings=max(4096, args.seq_len),
        tie_word_embeddings=False, dtype=args.dtype,
    )
    return random_from_config(config, args.dtype, args.seed)


def coverage(report) -> list[dict[str, Any]]:
    rows = []
    for block in report.blocks:
        for module, tokens in block.expert_tokens.items():
            rows.append({"block": block.index, "module": module, "experts": len(tokens), "min": min(tokens),
                         "median": statistics.median(tokens), "max": max(tokens), "total": sum(tokens),
                         "fallback": len(block.expert_fallback.get(module, []))})
    return rows


def run_recipe(args, recipe: str) -> dict[str, Any]:
    from hf_recon_prune.calibration import CalibrationSet

    device = torch.device(args.device)
    model = random_moe_model(args)
    ids = torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(1))
    calibration = CalibrationSet(
        input_ids=ids, is_self_generated=torch.zeros(args.samples, dtype=torch.bool),
        heldout_ids=ids.new_zeros((0, args.seq_len)), statistics_mask=torch.ones(args.samples, dtype=torch.bool),
        description={"source": "random tokens", "num_samples": args.samples},
    )
    config = PruningConfig(
        method=args.method, sparsity=0.5, reconstruction=RECIPES[recipe], num_samples=args.samples,
        seq_len=args.seq_len, br_epochs=args.epochs, br_batch_size=args.br_batch_size,
        forward_batch_size=args.forward_batch_size, device=args.device, stream_location=args.stream_location,
        heldout_fraction=0.0, track_reconstruction_error=False, compile_blocks=args.compile,
        reconstruction_mode=args.mode, seed=args.seed,
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    report = Pruner(model, config, calibration_data=calibration, show_progress=False,
                    on_block_end=lambda i, _r: print(f"  {recipe}: block {i} at {time.perf_counter() - started:.1f} s",
                                                     flush=True)).prune()
    seconds = time.perf_counter() - started
    per_block = [dict(b.seconds) for b in report.blocks]
    stages = sorted({stage for block in per_block for stage in block})
    peaks = report.memory.get("peak_device_bytes_per_window") or []
    result = {
        "recipe": recipe, "reconstruction": RECIPES[recipe], "mode": args.mode, "method": args.method,
        "total_seconds": seconds,
        "seconds_per_block_median": statistics.median(sum(s.values()) for s in per_block),
        "stage_median_seconds": {stage: statistics.median(s.get(stage, 0.0) for s in per_block) for stage in stages},
        "peak_gpu_gib": max(peaks) / GiB if peaks else None,
        "peak_gpu_gib_per_window": [p / GiB for p in peaks],
        "sparsity_of_pruned_weights": report.mean_sparsity, "block_sparsity": report.block_sparsity,
        "left_dense": report.left_dense(), "expert_coverage": coverage(report),
        "memory_estimate_peak_gib": (report.memory.get("estimate") or {}).get("device_peak", 0) / GiB,
        "warnings": list(report.warnings),
    }
    del report, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    results = {"settings": {k: v for k, v in vars(args).items() if k != "out"}, "machine": machine(device, 1),
               "recipes": []}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    for recipe in args.recipes:
        results["recipes"].append(run_recipe(args, recipe))
        with open(args.out, "w", encoding="utf-8") as handle:  # rewritten after each recipe: a cut run keeps some
            json.dump(results, handle, indent=2)
        entry = results["recipes"][-1]
        cov = entry["expert_coverage"]
        print(f"{recipe}: {entry['seconds_per_block_median']:.1f} s/block (median), peak "
              f"{entry['peak_gpu_gib'] or 0:.1f} GiB, tokens per expert min {min(c['min'] for c in cov)} / median "
              f"{statistics.median(c['median'] for c in cov)} / max {max(c['max'] for c in cov)}", flush=True)


if __name__ == "__main__":
    main()
