"""On paper: what one window of a large model needs on the GPU, from the package's own memory estimate.

No GPU and no weights: two decoder blocks of each shape are built on the meta device (bfloat16, as a user loads such
a model) and ``hf_recon_prune.memory.estimate_memory`` is asked what one window needs for LR, BR + GP and
BR + GP + CR, in full and masked-LoRA mode, at the paper's budget (256 windows of 1024 tokens, of which 32 are held
out), with the activation streams in CPU memory (what ``max_device_memory="24GiB"`` leaves a large model). Each
row says whether the window fits the budget the run checks against (90 % of ``--budget``). A third mode is costed
by hand: full mode with Adam's two moments in CPU memory (``12 * trainable`` bytes of reconstruction state become
``4 * trainable`` on the device). It is **not implemented** in the package; the row shows what it would buy.

Shapes: Llama-2-7B (hidden 4096, FFN 11008, 32 heads), Llama-3-70B (8192, 28672, 64 heads, 8 KV heads) and
Llama-3.1-405B (16384, 53248, 128 heads, 8 KV heads). These are estimates, not measurements: the estimate's
accuracy is measured in docs/benchmarks.md (the MoE profile: within 7 % of the measured peak).

    python benchmarks/memory_plan.py --out benchmarks/results/memory_plan.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from hf_recon_prune import PruningConfig  # noqa: E402
from hf_recon_prune.config import parse_memory_size  # noqa: E402
from hf_recon_prune.memory import MARGIN, estimate_memory  # noqa: E402

SHAPES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64, num_key_value_heads=8),
    "llama-3.1-405b": dict(hidden_size=16384, intermediate_size=53248, num_attention_heads=128, num_key_value_heads=8),
}
RECIPES = {"lr": ["lr"], "br+gp": ["lr", "br", "gp"], "br+gp+cr": ["lr", "br", "gp", "cr"]}
GiB = float(1 << 30)


def meta_blocks(shape: dict[str, int], count: int = 2) -> torch.nn.ModuleList:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(**shape, num_hidden_layers=count, vocab_size=128256)
    with torch.device("meta"):
        return torch.nn.ModuleList(LlamaDecoderLayer(config, i).to(torch.bfloat16) for i in range(count))


def plan_row(blocks, shape: dict[str, int], recipe: str, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    config = PruningConfig(method="sparsegpt", reconstruction=RECIPES[recipe], reconstruction_mode=mode,
                           num_samples=args.samples, seq_len=args.seq_len, autocast_dtype="bfloat16",
                           stream_location="cpu", max_device_memory=args.budget)
    heldout = round(args.samples * config.heldout_fraction)
    estimate = estimate_memory(blocks, config, args.samples - heldout, heldout, args.seq_len, shape["hidden_size"],
                               torch.bfloat16, torch.device("cuda"), attention="sdpa",
                               num_heads=shape["num_attention_heads"])
    budget = parse_memory_size(args.budget)
    row = {"recipe": recipe, "mode": mode, "window_blocks": estimate.window_blocks,
           "window_peak_gib": estimate.window_peak / GiB, "reconstruction_state_gib": estimate.reconstruction / GiB,
           "statistics_gib": estimate.statistics / GiB, "activations_gib": estimate.activations / GiB,
           "streams_cpu_gib": estimate.streams / GiB,
           "fits": estimate.window_peak <= MARGIN * budget}
    if mode == "full" and estimate.reconstruction:
        # Adam's moments (8 of the 12 bytes per trainable parameter) moved to CPU memory: on paper only.
        trainable = (estimate.reconstruction / estimate.window_blocks
                     - 4 * sum(p.numel() for p in blocks[0].parameters())) / 12
        offloaded = estimate.window_peak - estimate.window_blocks * 8 * trainable
        row["cpu_adam_window_peak_gib"] = offloaded / GiB
        row["cpu_adam_fits"] = offloaded <= MARGIN * budget
    return row


def main(argv=None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated subset of {list(SHAPES)}")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--budget", default="24GiB")
    parser.add_argument("--out", default="benchmarks/results/memory_plan.json")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"budget": args.budget, "planned_fraction": MARGIN, "samples": args.samples,
                               "seq_len": args.seq_len, "shapes": {}}
    for name in [s for s in args.shapes.split(",") if s]:
        shape = SHAPES[name]
        blocks = meta_blocks(shape)
        rows = [plan_row(blocks, shape, recipe, mode, args) for recipe in RECIPES for mode in ("full", "lora")
                if recipe != "lr" or mode == "full"]
        results["shapes"][name] = {"shape": shape, "block_gib": sum(p.numel() for p in blocks[0].parameters()) * 2 / GiB,
                                   "rows": rows}
        for row in rows:
            extra = (f", Adam moments on the CPU {row['cpu_adam_window_peak_gib']:.1f} GiB"
                     if "cpu_adam_window_peak_gib" in row else "")
            print(f"{name} {row['recipe']} {row['mode']}: window peak {row['window_peak_gib']:.1f} GiB "
                  f"({'fits' if row['fits'] else 'does not fit'} {args.budget}){extra}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    return results


if __name__ == "__main__":
    main()
