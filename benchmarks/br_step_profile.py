"""Where one step of block-wise reconstruction spends its time, by torch.profiler, on a block of a given shape.

One decoder block with random weights (SmolLM2-135M's shape by default) and 50 % random masks is trained by
``reconstruct_window`` on random inputs and targets held on the device, the way the engine calls it, for each
``--compile`` setting: once untimed (the first window of a process pays CUDA's start-up), then 1 epoch and
``--epochs`` epochs, timed and then traced by the profiler. The difference of the two runs is the steady cost of a
step (the window's set-up and captures cancel out): its wall time, the GPU's busy time (the kernels' durations,
graph replays included) and the kernels launched; the tables list the long run's kernels and operators with the
most time. A step far above its GPU time is bound by the host (launches, Python), a step near it by the kernels.

The GPU time of a step is also split by kind of kernel (:data:`KERNEL_KINDS`: matrix products, attention, the
optimizer, masking, copies and casts, fused compiled kernels, reductions, other element-wise), and the matrix
products' share is set against their FLOPs: what a step would take if every kernel but the matrix products were
free, and how fast those run. ``--remask both`` runs full mode's old re-masking after every step
(``strategies.REMASK_AFTER_EVERY_STEP``) and the current way side by side.

    python benchmarks/br_step_profile.py --compile auto,off --out benchmarks/results/br_step_profile_smollm2_shape_h200.json
    python benchmarks/br_step_profile.py --hidden 4096 --intermediate 11008 --heads 32 --kv-heads 32 --vocab 32000 \
        --compile on --remask both --out benchmarks/results/br_step_profile_7b_shape_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
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

#: Kinds of CUDA kernel, by a pattern of the kernel's name, first match wins (attention before matrix products:
#: flash-attention kernels are built on CUTLASS too; compiled kernels before the rest, whatever they fused).
KERNEL_KINDS = (
    ("attention", r"flash|fmha|attention|attn|sdpa"),
    ("matrix products", r"gemm|nvjet|cutlass|xmma|cublas|sm90_|sm80_|matmul"),
    ("compiled (fused)", r"triton"),
    ("optimizer", r"adam|multi_tensor"),
    ("masking", r"masked_fill|where"),
    ("copies and casts", r"copy|memcpy|memset|cast|fill"),
    ("reductions", r"reduce"),
)
OTHER_KIND = "other element-wise"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    parser.set_defaults(layers=1, **SMOLLM2)
    run = parser.add_argument_group("run")
    run.add_argument("--rows", type=int, default=256, help="calibration rows of the window")
    run.add_argument("--seq-len", type=int, default=1024)
    run.add_argument("--br-batch-size", type=int, default=8)
    run.add_argument("--epochs", type=int, default=3, help="epochs of the long run (the short one has 1)")
    run.add_argument("--compile", default="auto,off", help="compile_blocks settings to profile: off, on, auto")
    run.add_argument("--remask", default="off", choices=["off", "on", "both"],
                     help="strategies.REMASK_AFTER_EVERY_STEP: full mode re-masks every weight after every step "
                          "('on', as before 2026-12-05) or relies on the masked gradient ('off'); 'both': on, then off")
    run.add_argument("--device", default=None, help="default: cuda if available")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--top", type=int, default=15, help="operators listed per table")
    run.add_argument("--out", default="benchmarks/results/br_step_profile.json")
    args = parser.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.compile = [{"off": False, "on": True, "auto": "auto"}[c.strip()] for c in args.compile.split(",")]
    args.remask = {"off": [False], "on": [True], "both": [True, False]}[args.remask]
    return args


def is_kernel(event) -> bool:
    """A kernel (or memcpy/memset) that ran on the device. Not a user annotation: ``record_function`` regions such
    as ``Optimizer.step#Adam.step`` also come as CUDA events, spanning the kernels they hold, and counting them
    too would count those kernels twice (this script did until 2026-12-05, so earlier "GPU busy" figures include
    the optimizer's span once more)."""
    return (getattr(event, "device_type", None) == torch.autograd.DeviceType.CUDA
            and not getattr(event, "is_user_annotation", False)
            and not event.name.startswith("Optimizer."))  # torch versions without the flag


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, pattern in KERNEL_KINDS if re.search(pattern, lowered)), OTHER_KIND)


def matmul_flops_per_step(block, tokens: int) -> float:
    """FLOPs of the linears' matrix products in one training step over ``tokens`` tokens: forward, weight gradient
    and input gradient (2 each per weight and token), less the input gradients of the layers that read the block's
    first normalised input (attention's q, k, v projections): nothing before them trains, so autograd skips those."""
    flops = 0.0
    for name, module in block.named_modules():
        if isinstance(module, torch.nn.Linear):
            skipped_input_gradient = name.rsplit(".", 1)[-1] in ("q_proj", "k_proj", "v_proj")
            flops += (4.0 if skipped_input_gradient else 6.0) * tokens * module.weight.numel()
    return flops


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


def _settings(args, compiled, epochs: int) -> BlockTrainingSettings:
    config = PruningConfig(br_epochs=epochs, br_batch_size=args.br_batch_size, br_lr=1e-3, compile_blocks=compiled,
                           seed=args.seed, reconstruction=["lr", "br", "gp"])
    return BlockTrainingSettings.from_config(config)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _event_rows(events, key: str, top: int) -> list[dict[str, Any]]:
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    return [{"name": e.key, "calls": e.count, "device_us": getattr(e, "device_time_total", 0.0),
             "host_us": e.self_cpu_time_total} for e in rows]


def profile(args, compiled, device: torch.device, remask: bool = False) -> dict[str, Any]:
    """Runs of 1 and of ``args.epochs`` epochs, timed and traced: their difference is the steady cost of a step,
    without the window's set-up, its first step and its captures, which both runs pay once."""
    import hf_recon_prune.reconstruction.strategies as strategies

    previous = strategies.REMASK_AFTER_EVERY_STEP
    strategies.REMASK_AFTER_EVERY_STEP = remask
    try:
        return _profile(args, compiled, device) | {"remask_after_every_step": remask}
    finally:
        strategies.REMASK_AFTER_EVERY_STEP = previous


def _profile(args, compiled, device: torch.device) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity

    block, masks, kwargs, inputs, targets = _window(args, device)
    original = {name: p.detach().clone() for name, p in block.named_parameters()}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def train(epochs: int):
        with torch.no_grad():  # every run starts from the same weights
            for name, p in block.named_parameters():
                p.copy_(original[name])
        settings = _settings(args, compiled, epochs)
        return reconstruct_window([block], masks, inputs, targets, [kwargs[0]], settings, device)

    def timed(epochs: int) -> tuple[float, Any]:
        _sync(device)
        started = time.perf_counter()
        result = train(epochs)
        _sync(device)
        return time.perf_counter() - started, result

    def traced(epochs: int):
        with torch.profiler.profile(activities=activities) as prof:
            result = train(epochs)
            _sync(device)
        kernels = [e for e in prof.events() if is_kernel(e)]
        return prof, kernels, result

    train(1)  # untimed: start-up, the first captures or compilation
    short_seconds, short = timed(1)
    long_seconds, long = timed(args.epochs)
    _, short_kernels, _ = traced(1)
    prof, long_kernels, _ = traced(args.epochs)
    steps = long.num_steps - short.num_steps
    busy = sum(e.device_time for e in long_kernels) - sum(e.device_time for e in short_kernels)
    by_kind = {}
    for sign, kernels in ((1.0, long_kernels), (-1.0, short_kernels)):
        for event in kernels:
            kind = kernel_kind(event.name)
            by_kind[kind] = by_kind.get(kind, 0.0) + sign * event.device_time / 1e3 / max(steps, 1)
    flops = matmul_flops_per_step(block, args.br_batch_size * args.seq_len)
    matmul_ms = by_kind.get("matrix products", 0.0)
    return {
        "compile_blocks": compiled, "execution": long.execution, "steps": long.num_steps,
        "steady_steps": steps,
        "wall_ms_per_step": 1e3 * (long_seconds - short_seconds) / max(steps, 1),
        "wall_ms_per_step_with_setup": 1e3 * long_seconds / max(long.num_steps, 1),
        "window_setup_ms": 1e3 * (short_seconds - (long_seconds - short_seconds) / max(steps, 1) * short.num_steps),
        "gpu_busy_ms_per_step": busy / 1e3 / max(steps, 1),
        "kernels_per_step": (len(long_kernels) - len(short_kernels)) / max(steps, 1),
        "gpu_ms_per_step_by_kind": dict(sorted(by_kind.items(), key=lambda item: -item[1])),
        "matmul_flops_per_step": flops,
        "matmul_tflops": flops / matmul_ms / 1e9 if matmul_ms > 0 else None,
        "top_device_ops": _event_rows(prof.key_averages(), "device_time_total", args.top),
        "top_host_ops": _event_rows(prof.key_averages(), "self_cpu_time_total", args.top),
        "kernel_names_by_time": _kernel_table(long_kernels, args.top),
    }


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
        lines += [f"## compile_blocks={run['compile_blocks']!r} ({run['execution']}), re-masking after every step "
                  f"{'on' if run.get('remask_after_every_step') else 'off'}", "",
                  f"Steady state over {run['steady_steps']} steps (a run of {run['steps']} steps less one of "
                  f"{run['steps'] - run['steady_steps']}): {run['wall_ms_per_step']:.2f} ms a step, GPU busy "
                  f"{run['gpu_busy_ms_per_step']:.2f} ms a step, {run['kernels_per_step']:.0f} kernels a step; the "
                  f"window's set-up (captures included) {run['window_setup_ms']:.0f} ms. Kernels below: the "
                  f"{run['steps']}-step run.", "",
                  "| kind of kernel | GPU ms / step | share |", "|---|---:|---:|"]
        busy = run["gpu_busy_ms_per_step"] or 1.0
        lines += [f"| {kind} | {ms:.3f} | {100.0 * ms / busy:.0f} % |" for kind, ms in run["gpu_ms_per_step_by_kind"].items()]
        if run.get("matmul_tflops"):
            lines += ["", f"Matrix products: {run['matmul_flops_per_step'] / 1e12:.2f} TFLOP a step at "
                          f"{run['matmul_tflops']:.0f} TFLOP/s."]
        lines += ["", "| kernel | calls | total µs | median µs |", "|---|---:|---:|---:|"]
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
        for remask in args.remask:
            run = profile(args, compiled, device, remask)
            results["runs"].append(run)
            kinds = ", ".join(f"{kind} {ms:.2f}" for kind, ms in run["gpu_ms_per_step_by_kind"].items())
            print(f"compile_blocks={compiled!r} ({run['execution']}), remask {remask}: {run['wall_ms_per_step']:.2f} "
                  f"ms/step, GPU busy {run['gpu_busy_ms_per_step']:.2f} ms/step ({kinds}), set-up "
                  f"{run['window_setup_ms']:.0f} ms, {run['kernels_per_step']:.0f} kernels/step", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    with open(os.path.splitext(args.out)[0] + ".md", "w", encoding="utf-8") as handle:
        handle.write(markdown(results))
    print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
