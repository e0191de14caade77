"""Peak GPU memory and time per block of LR, BR+GP and BR+GP+CR on a Llama-2-7B-shaped model, and the 2-GPU speed-up.

The paper (Shin et al., EMNLP 2024) reports 3.9 / 5.7 / 10.6 GB peak GPU memory for LR / BR+GP / BR+GP+CR on
Llama-2-7B; this measures the same recipes on the same shapes with random weights (memory and time do not depend on
the values), 256 calibration windows of 1024 random tokens, nothing downloaded. Only the window being processed is
on the GPU: the model stays on the CPU (``--placement cpu``), or is loaded with an Accelerate ``device_map`` and
``max_memory`` that keeps most blocks CPU-offloaded (``--placement accelerate``). ``max_device_memory`` is the
engine's budget on the GPU (16 GiB by default, as in the issue).

Needs torch, transformers, peft and accelerate; no datasets/evaluate/gguf, no network.

One GPU:
    python benchmarks/scale_gpu.py --layers 4 --out benchmarks/results/scale_gpu_1.json
Two GPUs, data-parallel (same recipes; speed-up against the one-GPU JSON):
    torchrun --nproc_per_node 2 benchmarks/scale_gpu.py --layers 4 --out benchmarks/results/scale_gpu_2.json \
        --baseline benchmarks/results/scale_gpu_1.json
The full recipe over all 32 blocks in parts of at most one device call each (every part resumes from the package's
own checkpoints, so call it again with the same arguments until the recipe reports complete; add the parts' times):
    python benchmarks/scale_gpu.py --layers 32 --recipes br+gp+cr --stream-location device \
        --max-device-memory 120GiB --checkpoint-dir /tmp/ck7b --stop-after 420 --out /tmp/part.json
CPU smoke test:
    python benchmarks/scale_gpu.py --device cpu --layers 2 --hidden 256 --intermediate 688 --heads 4 --vocab 512 \
        --samples 8 --seq-len 64 --epochs 1 --out /tmp/scale.json
"""

from __future__ import annotations

import argparse
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
from hf_recon_prune.distributed import DataParallel  # noqa: E402
from hf_recon_prune.pruner import Pruner  # noqa: E402

RECIPES = {"lr": ["lr"], "br+gp": ["lr", "br", "gp"], "br+gp+cr": ["lr", "br", "gp", "cr"]}
PAPER_PEAK_GB = {"lr": 3.9, "br+gp": 5.7, "br+gp+cr": 10.6}
GiB = float(1 << 30)


def add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The random model's shape (Llama-2-7B by default) and dtype; ``random_model`` reads these fields."""
    shape = parser.add_argument_group("model shape (Llama-2-7B by default)")
    shape.add_argument("--layers", type=int, default=32)
    shape.add_argument("--hidden", type=int, default=4096)
    shape.add_argument("--intermediate", type=int, default=11008)
    shape.add_argument("--heads", type=int, default=32)
    shape.add_argument("--kv-heads", type=int, default=None, help="key/value heads (grouped-query attention; "
                       "default: --heads, full multi-head attention; Llama-3-70B: 8)")
    shape.add_argument("--vocab", type=int, default=32000)
    shape.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])


def split_recipes(parser: argparse.ArgumentParser, value: str, known) -> list[str]:
    """``--recipes a,b`` as a list, every name checked against ``known`` (a parser error names the bad ones)."""
    recipes = [r.strip() for r in value.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in known]
    if unknown:
        parser.error(f"unknown recipes {unknown}; choose from {list(known)}")
    return recipes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    run = parser.add_argument_group("run")
    run.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated subset of {list(RECIPES)}")
    run.add_argument("--method", default="sparsegpt", choices=["sparsegpt", "wanda", "magnitude"])
    run.add_argument("--samples", type=int, default=256)
    run.add_argument("--seq-len", type=int, default=1024)
    run.add_argument("--epochs", type=int, default=10, help="BR epochs (paper: 10)")
    run.add_argument("--br-batch-size", type=int, default=8)
    run.add_argument("--forward-batch-size", type=int, default=8)
    run.add_argument("--heldout", type=int, default=0, help="held-out windows for the report's error (0: none)")
    run.add_argument("--device", default=None, help="execution device (default: cuda, one per process)")
    run.add_argument("--max-device-memory", default="16GiB", help="the engine's budget on the device")
    run.add_argument("--stream-location", default="cpu", choices=["auto", "device", "cpu", "disk"])
    run.add_argument("--stream-dtype", default=None, choices=[None, "bfloat16", "float16", "float32"])
    run.add_argument("--stream-folder", default=None)
    run.add_argument("--placement", default="cpu", choices=["cpu", "accelerate"],
                     help="cpu: model in RAM, blocks moved for their turn; accelerate: save once to --model-dir and "
                          "load with device_map='auto' and max_memory={gpu: --model-gpu-memory, 'cpu': ...} (on a "
                          "CPU device: max_memory={'cpu': --model-gpu-memory} and the rest offloaded to disk)")
    run.add_argument("--model-dir", default="/tmp/hf-recon-prune-llama7b-random")
    run.add_argument("--model-gpu-memory", default="2GiB", help="max_memory of the GPU when loading (accelerate)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--checkpoint-dir", default=None,
                     help="the package's checkpoints go here (one folder per recipe), and a run resumes from them: a "
                          "recipe too long for one call runs in parts (see --stop-after)")
    run.add_argument("--stop-after", type=float, default=None, metavar="SECONDS",
                     help="with --checkpoint-dir: stop after the first block that ends past SECONDS of pruning (its "
                          "checkpoint is on disk); the next invocation with the same arguments resumes from it")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="benchmarks/results/scale_gpu.json")
    out.add_argument("--markdown", default=None, help="default: --out with .md")
    out.add_argument("--baseline", default=None, help="a one-process JSON of this script, for the speed-up column")
    args = parser.parse_args(argv)
    args.recipes = split_recipes(parser, args.recipes, RECIPES)
    if args.stop_after is not None and not args.checkpoint_dir:
        parser.error("--stop-after needs --checkpoint-dir (the next part resumes from its checkpoints)")
    args.markdown = args.markdown or os.path.splitext(args.out)[0] + ".md"
    return args


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=getattr(args, "kv_heads", None) or args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(4096, args.seq_len), rms_norm_eps=1e-5, tie_word_embeddings=False,
        dtype=args.dtype,
    )


def random_model(args):
    """A Llama model of the shape in ``args``, with random weights (see :func:`random_from_config`)."""
    return random_from_config(llama_config(args), args.dtype, args.seed)


def random_from_config(config, dtype_name: str, seed: int):
    """Build on the meta device (no memory, no init), materialise on the CPU, fill with seeded N(0, 0.02), norms 1.

    With a GPU the numbers are drawn there (a seeded CUDA generator) and copied into the CPU parameters: drawing
    normals on the CPU runs at tens of millions a second, minutes for 32 Llama-2-7B blocks. The values then differ
    from a CPU run's, which neither the time nor the memory of pruning depends on.
    """
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.to_empty(device="cpu")
    fill_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator(device=fill_device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif fill_device.type == "cpu":
                param.normal_(0.0, 0.02, generator=generator)
            else:
                drawn = torch.empty(param.shape, dtype=param.dtype, device=fill_device)
                param.copy_(drawn.normal_(0.0, 0.02, generator=generator))
                del drawn
        # to_empty left the rotary inverse frequencies uninitialised: compute them again.
        rotary = model.model.rotary_emb
        model.model.rotary_emb = type(rotary)(config=model.config)
    return model.eval()


def load_model(args, data_parallel):
    if args.placement == "cpu":
        return random_model(args)
    from transformers import AutoModelForCausalLM

    main = data_parallel is None or data_parallel.is_main
    if main and not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        print(f"saving the random model to {args.model_dir} (once)", flush=True)
        random_model(args).save_pretrained(args.model_dir)
    if data_parallel is not None:
        data_parallel.barrier()
    if torch.device(args.device or "cuda").type == "cpu":
        # CPU smoke test: --model-gpu-memory becomes the RAM budget, the rest of the model goes to disk.
        placement = dict(max_memory={"cpu": args.model_gpu_memory},
                         offload_folder=os.path.join(args.model_dir, f"offload-{os.getpid()}"))
    else:
        gpu = data_parallel.local_rank if data_parallel is not None else 0
        placement = dict(max_memory={gpu: args.model_gpu_memory, "cpu": "1000GiB"})
    return AutoModelForCausalLM.from_pretrained(
        args.model_dir, dtype=getattr(torch, args.dtype), device_map="auto", **placement
    ).eval()


def machine(device: torch.device, world_size: int) -> str:
    if device.type == "cuda":
        return f"{world_size} x {torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU {platform.machine()}, {os.cpu_count()} cores, {world_size} process(es) (torch {torch.__version__})"


def run_recipe(args, recipe: str, data_parallel) -> dict:
    model = load_model(args, data_parallel)
    generator = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (args.samples + args.heldout, args.seq_len), generator=generator)
    from hf_recon_prune.calibration import CalibrationSet

    calibration = CalibrationSet(
        input_ids=ids[: args.samples], is_self_generated=torch.zeros(args.samples, dtype=torch.bool),
        heldout_ids=ids[args.samples:], statistics_mask=torch.ones(args.samples, dtype=torch.bool),
        description={"source": "random tokens", "num_samples": args.samples},
    )
    config = PruningConfig(
        method=args.method, sparsity=0.5, reconstruction=RECIPES[recipe], num_samples=args.samples,
        seq_len=args.seq_len, br_epochs=args.epochs, br_batch_size=args.br_batch_size,
        forward_batch_size=args.forward_batch_size, device=args.device, stream_location=args.stream_location,
        stream_dtype=args.stream_dtype, stream_folder=args.stream_folder, max_device_memory=args.max_device_memory,
        seed=args.seed, track_reconstruction_error=args.heldout > 0,
        checkpoint_dir=os.path.join(args.checkpoint_dir, recipe) if args.checkpoint_dir else None,
    )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    part = _Part(started, args.stop_after)
    pruner = Pruner(model, config, calibration_data=calibration,
                    show_progress=data_parallel is None or data_parallel.is_main, on_block_end=part.block_ended)
    try:
        report = pruner.prune(resume=bool(args.checkpoint_dir))
    except Exception as error:  # the pruner reports the callback's stop as a failure (the model is partly pruned)
        if isinstance(error, _TimeUp) or isinstance(error.__cause__, _TimeUp):
            return part.result(recipe, time.perf_counter() - started)
        raise
    seconds = time.perf_counter() - started
    peaks = report.memory.get("peak_device_bytes_per_window") or []
    blocks = [
        {"index": b.index, "seconds": sum(b.seconds.values()), "stages": dict(b.seconds),
         "error_after": b.error_after.get("calibration")}
        for b in report.blocks
    ]
    result = {
        "recipe": recipe, "reconstruction": RECIPES[recipe], "total_seconds": seconds,
        "seconds_per_block": seconds / max(len(part.blocks), 1),  # the blocks of this part (a resume: the rest)
        "reconstruction_seconds_per_block": report.stage_seconds().get("reconstruction", 0.0) / max(len(blocks), 1),
        "stage_seconds": report.stage_seconds(),
        "peak_gpu_gib": max(peaks) / GiB if peaks else None,
        "peak_gpu_gib_per_window": [p / GiB for p in peaks],
        "peak_host_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "estimate": report.memory.get("estimate"), "blocks": blocks,
        "processes": report.memory.get("data_parallel_processes", 1),
        "complete": True, "blocks_this_part": part.blocks,
    }
    del pruner, report, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


class _TimeUp(Exception):
    """Raised after a block's checkpoint is on disk once the part's time is spent (the next part resumes)."""


class _Part:
    """The blocks this invocation finalised and when (a resumed run's report also lists the blocks it restored)."""

    def __init__(self, started: float, stop_after: float | None):
        self.started, self.stop_after = started, stop_after
        self.blocks: list[dict] = []

    def block_ended(self, index: int, report) -> None:
        block = next((b for b in reversed(report.blocks) if b.index == index), None)
        self.blocks.append({"index": index, "ended_at_seconds": time.perf_counter() - self.started,
                            "stages": dict(block.seconds) if block is not None else {}})
        if self.stop_after is not None and time.perf_counter() - self.started > self.stop_after:
            raise _TimeUp(f"stopped after block {index}")

    def result(self, recipe: str, seconds: float) -> dict:
        return {"recipe": recipe, "reconstruction": RECIPES[recipe], "complete": False, "total_seconds": seconds,
                "blocks_this_part": self.blocks, "seconds_per_block": seconds / max(len(self.blocks), 1),
                "reconstruction_seconds_per_block": 0.0, "peak_gpu_gib": None}


def markdown(results: dict, baseline: dict | None) -> str:
    s = results["settings"]
    lines = [
        f"# Scale benchmark: {s['layers']} Llama-2-7B-shaped blocks (hidden {s['hidden']}, FFN {s['intermediate']}), "
        f"random weights ({s['dtype']})",
        "",
        f"Machine: {results['machine']}. Calibration {s['samples']} x {s['seq_len']} random tokens, {s['method']} 50%, "
        f"BR {s['epochs']} epochs at batch {s['br_batch_size']}; streams on {s['stream_location']}; engine budget "
        f"max_device_memory={s['max_device_memory']}; placement {s['placement']}; {results['processes']} process(es).",
        "",
        "| recipe | peak GPU (GiB) | paper (GB) | estimate (GiB) | s / block | reconstruction s / block |"
        + (" speed-up (reconstruction) |" if baseline else ""),
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if baseline else ""),
    ]
    base = {r["recipe"]: r for r in (baseline or {}).get("runs", [])}
    for r in results["runs"]:
        if not r["complete"]:
            done = [b["index"] for b in r["blocks_this_part"]]
            span = f"{done[0]}–{done[-1]}" if done else "none"
            lines.append(f"| {r['recipe']} (a part: blocks {span}, {r['total_seconds']:.1f} s; resumes) "
                         "| – | – | – | – | – |" + (" – |" if baseline else ""))
            continue
        peak = "–" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.2f}"
        estimate = (r.get("estimate") or {}).get("device_peak")
        row = (f"| {r['recipe']} | {peak} | {PAPER_PEAK_GB.get(r['recipe'], '–')} | "
               f"{'–' if estimate is None else f'{estimate / GiB:.2f}'} | {r['seconds_per_block']:.1f} | "
               f"{r['reconstruction_seconds_per_block']:.1f} |")
        if baseline:
            other = base.get(r["recipe"])
            if other and r["reconstruction_seconds_per_block"] > 0 and other["reconstruction_seconds_per_block"] > 0:
                row += f" {other['reconstruction_seconds_per_block'] / r['reconstruction_seconds_per_block']:.2f}x |"
            else:
                row += " – |"
        lines.append(row)
    lines += ["", "Peak GPU memory is torch.cuda.max_memory_allocated over each window (the largest is shown), "
              "including what the model keeps resident on the GPU; the paper's figures are for the real Llama-2-7B."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    data_parallel = DataParallel.resolve("auto")  # initialises the group under torchrun / accelerate launch
    device = data_parallel.device(args.device) if data_parallel else torch.device(
        args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if data_parallel is not None and args.device is None:
        args.device = str(device)
    processes = data_parallel.world_size if data_parallel else 1
    main_process = data_parallel is None or data_parallel.is_main
    results = {"machine": machine(device, processes), "settings": vars(args), "processes": processes, "runs": []}
    for recipe in args.recipes:
        result = run_recipe(args, recipe, data_parallel)
        results["runs"].append(result)
        if main_process:
            if not result["complete"]:
                print(f"{recipe}: stopped after blocks {[b['index'] for b in result['blocks_this_part']]} "
                      f"({result['total_seconds']:.1f} s); run again to resume", flush=True)
                continue
            peak = "n/a" if result["peak_gpu_gib"] is None else f"{result['peak_gpu_gib']:.2f} GiB"
            print(f"{recipe}: peak GPU {peak}, {result['seconds_per_block']:.1f} s/block "
                  f"(reconstruction {result['reconstruction_seconds_per_block']:.1f} s/block), "
                  f"total {result['total_seconds']:.1f} s", flush=True)
    leaked = sorted({m.split(".")[0] for m in sys.modules} & {"datasets", "evaluate", "gguf"})
    results["optional_modules_imported"] = leaked
    if main_process:
        baseline = None
        if args.baseline:
            with open(args.baseline, encoding="utf-8") as handle:
                baseline = json.load(handle)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2)
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(markdown(results, baseline))
        print(f"wrote {args.out} and {args.markdown}", flush=True)
        if leaked:
            print(f"WARNING: the run imported {leaked}, which the GPU machines do not have", file=sys.stderr)
    if data_parallel is not None:
        data_parallel.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
