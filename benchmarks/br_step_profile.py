"""Where one step of block-wise reconstruction spends its time, by torch.profiler, on a block of a given shape.

One decoder block with random weights (SmolLM2-135M's shape by default) and 50 % random masks is trained by
``reconstruct_window`` on random inputs and targets held on the device, the way the engine calls it, once untimed
(the first window of a process pays CUDA's start-up and the captures) and once under the profiler, for each
``--compile`` setting. For each it writes the wall time per step, the GPU's busy time per step (the kernels'
durations, summed over the steps, graph replays included), the kernels launched per step and the operators with
the most device and host time: a step far above its GPU time is bound by the host (launches, Python), a step near
it by the kernels themselves.

    python benchmarks/br_step_profile.py --compile auto,off --out benchmarks/results/br_step_profile_smollm2_shape_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scale_gpu import add_shape_arguments, machine, random_model  # noqa: E402

from hf_recon_prune import PruningConfig  # noqa: E402
from hf_recon_prune.architectures import prunable_linears, resolve_layout  # noqa: E402
from hf_recon_prune.capture import capture_block_kwargs  # noqa: E402
from hf_recon_prune.reconstruction import BlockTrainingSettings, reconstruct_window  # noqa: E402

SMOLLM2 = dict(hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    parser.set_defaults(layers=1, **SMOLLM2)
    run = parser.add_argument_group("run")
    run.add_argument("--rows", type=int, default=64, help="calibration rows of the window")
    run.add_argument("--seq-len", type=int, default=1024)
    run.add_argument("--br-batch-size", type=int, default=8)
    run.add_argument("--epochs", type=int, default=2)
    run.add_argument("--compile", default="auto,off", help="compile_blocks settings to profile: off, on, auto")
    run.add_argument("--device", default=None, help="default: cuda if available")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--top", type=int, default=15, help="operators listed per table")
    run.add_argument("--out", default="benchmarks/results/br_step_profile.json")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.compile = [{"off": False, "on": True, "auto": "auto"}[c.strip()] for c in args.compile.split(",")]
    return args


def _window(args, device: torch.device):
    """The block on the device, its captured keyword arguments, random 50 % masks, inputs and targets."""
    model = random_model(args).eval()
    layout = resolve_layout(model)
    block = layout.blocks[0].to(device)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    masks = {layer: (torch.rand(layer.weight.shape, generator=generator) >= 0.5).to(device)
             for layer in prunable_linears(block).values()}
    ids = torch.randint(0, args.vocab, (1, args.seq_len), generator=generator)
    layout.base_model.to(device)
    kwargs = capture_block_kwargs(layout.base_model, [block], ids, device)
    dtype = next(block.parameters()).dtype
    shape = (args.rows, args.seq_len, args.hidden)
    inputs = torch.randn(shape, generator=generator).to(device, dtype)
    targets = torch.randn(shape, generator=generator).to(device, dtype)
    return block, masks, kwargs, inputs, targets


def _settings(args, compiled) -> BlockTrainingSettings:
    config = PruningConfig(br_epochs=args.epochs, br_batch_size=args.br_batch_size, br_lr=1e-3, compile_blocks=compiled,
                           seed=args.seed, reconstruction=["lr", "br", "gp"])
    return BlockTrainingSettings.from_config(config)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _event_rows(events, key: str, top: int) -> list[dict[str, Any]]:
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    return [{"name": e.key, "calls": e.count, "device_us": getattr(e, "device_time_total", 0.0),
             "host_us": e.self_cpu_time_total} for e in rows]


def profile(args, compiled, device: torch.device) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity

    block, masks, kwargs, inputs, targets = _window(args, device)
    settings = _settings(args, compiled)
    original = {name: p.detach().clone() for name, p in block.named_parameters()}

    def train():
        with torch.no_grad():  # every run starts from the same weights
            for name, p in block.named_parameters():
                p.copy_(original[name])
        return reconstruct_window([block], masks, inputs, targets, [kwargs[0]], settings, device)

    train()  # untimed: start-up, the first captures or compilation
    _sync(device)
    started = time.perf_counter()
    untraced = train()
    _sync(device)
    untraced_seconds = time.perf_counter() - started
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        traced = train()
        _sync(device)
    steps = untraced.num_steps
    kernels = [e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
    busy_us = sum(e.device_time for e in kernels) if kernels else 0.0
    averages = prof.key_averages()
    result = {
        "compile_blocks": compiled, "execution": untraced.execution, "steps": steps,
        "wall_ms_per_step": 1e3 * untraced_seconds / max(steps, 1),
        "wall_ms_per_step_traced": 1e3 * traced.seconds / max(traced.num_steps, 1),
        "gpu_busy_ms_per_step": busy_us / 1e3 / max(traced.num_steps, 1),
        "kernels_per_step": len(kernels) / max(traced.num_steps, 1),
        "top_device_ops": _event_rows(averages, "device_time_total", args.top),
        "top_host_ops": _event_rows(averages, "self_cpu_time_total", args.top),
        "kernel_names_by_time": _kernel_table(kernels, args.top),
    }
    return result


def _kernel_table(kernels, top: int) -> list[dict[str, Any]]:
    totals: dict[str, list[float]] = {}
    for event in kernels:
        totals.setdefault(event.name, []).append(event.device_time)
    rows = sorted(totals.items(), key=lambda item: sum(item[1]), reverse=True)[:top]
    return [{"kernel": name[:120], "calls": len(times), "total_us": sum(times),
             "median_us": statistics.median(times)} for name, times in rows]


def markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [f"# BR step profile: one block (hidden {s['hidden']}, FFN {s['intermediate']}, {s['heads']} heads, "
             f"{s['kv_heads'] or s['heads']} KV heads, {s['dtype']})", "",
             f"Machine: {results['machine']}. {s['rows']} rows of {s['seq_len']} tokens, batch {s['br_batch_size']}, "
             f"{s['epochs']} epochs, bf16 autocast where the device has it.", ""]
    for run in results["runs"]:
        lines += [f"## compile_blocks={run['compile_blocks']!r} ({run['execution']})", "",
                  f"{run['steps']} steps: {run['wall_ms_per_step']:.2f} ms a step untraced "
                  f"({run['wall_ms_per_step_traced']:.2f} traced), GPU busy {run['gpu_busy_ms_per_step']:.2f} ms a "
                  f"step, {run['kernels_per_step']:.0f} kernels a step.", "",
                  "| kernel | calls | total µs | median µs |", "|---|---:|---:|---:|"]
        lines += [f"| `{k['kernel']}` | {k['calls']} | {k['total_us']:.0f} | {k['median_us']:.1f} |"
                  for k in run["kernel_names_by_time"]]
        lines += ["", "| operator (host time) | calls | host µs | device µs |", "|---|---:|---:|---:|"]
        lines += [f"| `{o['name'][:80]}` | {o['calls']} | {o['host_us']:.0f} | {o['device_us']:.0f} |"
                  for o in run["top_host_ops"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    results = {"machine": machine(device, 1), "settings": {k: v for k, v in vars(args).items()}, "runs": []}
    for compiled in args.compile:
        run = profile(args, compiled, device)
        results["runs"].append(run)
        print(f"compile_blocks={compiled!r} ({run['execution']}): {run['wall_ms_per_step']:.2f} ms/step, GPU busy "
              f"{run['gpu_busy_ms_per_step']:.2f} ms/step, {run['kernels_per_step']:.0f} kernels/step", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    with open(os.path.splitext(args.out)[0] + ".md", "w", encoding="utf-8") as handle:
        handle.write(markdown(results))
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
