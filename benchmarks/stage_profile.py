"""Time every stage of the block engine per block, and compare with the FLOP floor at a measured matmul ceiling.

On a Llama-2-7B-shaped model with random weights (built by ``scale_gpu.random_model``: meta init, seeded normal fill)
and random calibration token ids (256 x 1024 by default), run ``Pruner`` with one or more recipes and read the
per-block stage times that the engine records in ``report.blocks[i].seconds``:

    placement       the block's weights onto the device and back to CPU RAM, its masks out (model in CPU RAM)
    dense_forward   dense block on the dense stream (GP target / error reference)
    statistics      calibration forward with input hooks (Wanda norms, SparseGPT Hessians)
    masks_lr        mask selection (+ the SparseGPT/OBS solve of LR)
    error           the masked block on the sparse stream before BR (error before reconstruction)
    reconstruction  BR epochs (a CR window's time is split over its two blocks)
    propagation     the finished block on the sparse stream (its output is the next block's input)
    setup           (per run) embeddings + capture of block 0's inputs + memory plan: total minus the block stages

FLOP model (analytic; written into the JSON): a block forward over T tokens costs ``T * (2 P + 4 L d)`` with P the
block's linear parameters, L the sequence length and d the hidden size (attention counted as full QK^T and AV, i.e.
not halved for the causal mask); a BR step is forward + backward = 3 forwards; Hessian accumulation is
``2 T d_in^2`` per distinct linear input (q/k/v share one, gate/up share one); the SparseGPT solve is
``out * d_in^2`` (lazy OBS updates) + ``4/3 d_in^3`` (Cholesky, inverse, Cholesky) per linear, in float32. Streams
that live on the CPU cross PCIe once in per forward and once out when the output is kept; the floor of a stage is
``max(compute at the ceiling, bytes at the measured pinned-copy bandwidth)``.

Ceilings are measured on the run's device first: bf16 ``torch.matmul`` of 8192^3 and float32 (no TF32) of 4096^3,
CUDA events, median of repeats; pinned host<->device copy bandwidth of a 512 MiB buffer.

Needs torch, transformers, peft, accelerate; never imports datasets/evaluate/gguf; no network.

GPU (one H200; keep a call under 600 s -- each recipe's JSON/markdown is rewritten as soon as it finishes):
    python benchmarks/stage_profile.py --layers 6 --recipes lr,br+gp --out benchmarks/results/stage_profile.json
CPU smoke test:
    python benchmarks/stage_profile.py --device cpu --layers 2 --hidden 128 --intermediate 344 --heads 4 \\
        --vocab 256 --samples 8 --seq-len 32 --epochs 1 --recipes lr,br+gp,br+gp+cr --out /tmp/stage.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from typing import Any, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

from scale_gpu import add_shape_arguments, machine, random_model, split_recipes  # noqa: E402

from hf_recon_prune import PruningConfig  # noqa: E402
from hf_recon_prune.pruner import Pruner  # noqa: E402

RECIPES = {"none": [], "lr": ["lr"], "br": ["lr", "br"], "br+gp": ["lr", "br", "gp"],
           "br+gp+cr": ["lr", "br", "gp", "cr"]}
PAPER_PEAK_GB = {"lr": 3.9, "br+gp": 5.7, "br+gp+cr": 10.6}
STAGES = ("placement", "dense_forward", "statistics", "masks_lr", "error", "reconstruction", "propagation")
GiB = float(1 << 30)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_shape_arguments(parser)
    run = parser.add_argument_group("run")
    run.add_argument("--recipes", default="lr,br+gp,br+gp+cr", help=f"comma-separated subset of {list(RECIPES)}")
    run.add_argument("--method", default="sparsegpt", choices=["sparsegpt", "wanda", "magnitude"])
    run.add_argument("--pattern", default="unstructured")
    run.add_argument("--samples", type=int, default=256)
    run.add_argument("--seq-len", type=int, default=1024)
    run.add_argument("--epochs", type=int, default=10)
    run.add_argument("--br-batch-size", type=int, default=8)
    run.add_argument("--forward-batch-size", type=int, default=8)
    run.add_argument("--track-error", action="store_true",
                     help="track_reconstruction_error=True (one more dense forward per block when GP is off)")
    run.add_argument("--device", default=None, help="default: cuda if available")
    run.add_argument("--max-device-memory", default="16GiB")
    run.add_argument("--stream-location", default="cpu", choices=["auto", "device", "cpu", "disk"])
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--compile", default="off",
                     help="compile_blocks for BR, comma-separated runs of off, on, auto (auto: compiled or CUDA graphs "
                          "by the window's size); 'both' is off,on")
    run.add_argument("--overlap-copies", default="off", choices=["off", "on", "both"],
                     help="offload.OVERLAP_COPIES (stream rows copied ahead on a side CUDA stream); 'both': off, then on")
    run.add_argument("--br-index", default="device", choices=["device", "host", "both"],
                     help="block_trainer.INDEX_ON_DEVICE with device-resident streams: BR's row order moved to the "
                          "device once an epoch ('device', the default) or each step's index copied from the host "
                          "('host'); 'both': host, then device")
    run.add_argument("--reconstruction-mode", default="full", choices=["full", "lora", "auto"],
                     help="PruningConfig.reconstruction_mode ('auto': full where the window fits the budget, else "
                          "masked LoRA)")
    run.add_argument("--placement-staging", default="on", choices=["off", "on", "both"],
                     help="offload.PINNED_STAGING (blocks and masks cross PCIe through reusable pinned slots); "
                          "'both': off, then on")
    run.add_argument("--overlap-placement", default="on", choices=["off", "on", "both"],
                     help="offload.OVERLAP_PLACEMENT (the next block loaded and the last one written back while the "
                          "device computes); 'both': off, then on")
    run.add_argument("--remask", default="off", choices=["off", "on", "both"],
                     help="strategies.REMASK_AFTER_EVERY_STEP: full-mode BR re-masks every weight after every step "
                          "('on', as before 2026-12-05) or relies on the masked gradient ('off'); 'both': on, then off")
    run.add_argument("--ceiling-size", type=int, default=None, help="matmul size of the ceiling (default 8192, CPU 512)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="benchmarks/results/stage_profile.json")
    out.add_argument("--markdown", default=None, help="default: --out with .md")
    args = parser.parse_args(argv)
    args.recipes = split_recipes(parser, args.recipes, RECIPES)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.markdown = args.markdown or os.path.splitext(args.out)[0] + ".md"
    return args


# ====================================================================================================== ceilings
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(fn, device: torch.device, repeats: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return times


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> dict[str, Any]:
    """Median TFLOP/s of an n x n x n matmul (float32 with TF32 off)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        times = _time_calls(lambda: torch.matmul(a, b, out=c), device, repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    seconds = statistics.median(times)
    del a, b, c
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "median_seconds": seconds,
            "tflops": 2.0 * n**3 / seconds / 1e12, "repeats": repeats}


def copy_bandwidth(device: torch.device, mib: int = 512, repeats: int = 5) -> Optional[dict[str, float]]:
    """Pinned host -> device and device -> host copy bandwidth (GB/s); None off CUDA (streams then never move)."""
    if device.type != "cuda":
        return None
    host = torch.empty(mib << 20, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(mib << 20, dtype=torch.uint8, device=device)
    h2d = statistics.median(_time_calls(lambda: dev.copy_(host, non_blocking=True), device, repeats))
    d2h = statistics.median(_time_calls(lambda: host.copy_(dev, non_blocking=True), device, repeats))
    nbytes = float(host.numel())
    return {"h2d_GBps": nbytes / h2d / 1e9, "d2h_GBps": nbytes / d2h / 1e9, "mib": mib}


# ====================================================================================================== FLOP model
def block_shapes(args) -> dict[str, tuple[int, int]]:
    """(out, in) of every linear of one Llama block."""
    d, f = args.hidden, args.intermediate
    kv = d * (getattr(args, "kv_heads", None) or args.heads) // args.heads  # grouped-query attention: --kv-heads
    return {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d),
            "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}


def flop_model(args, recipe: str) -> dict[str, Any]:
    """FLOPs (and stream bytes crossing PCIe) of each stage for one block in the middle of the model."""
    steps = RECIPES[recipe]
    shapes = block_shapes(args)
    tokens = args.samples * args.seq_len
    params = sum(o * i for o, i in shapes.values())
    forward = tokens * (2.0 * params + 4.0 * args.seq_len * args.hidden)
    hessian = "lr" in steps or args.method == "sparsegpt"
    stats_needed = args.method != "magnitude" or "lr" in steps
    distinct_inputs = [args.hidden, args.hidden, args.hidden, args.intermediate]  # qkv, o, gate/up, down
    hessian_flops = sum(2.0 * tokens * n * n for n in distinct_inputs) if hessian else 0.0
    solve = "lr" in steps or args.method == "sparsegpt"
    solve_flops = sum(o * i * i + 4.0 / 3.0 * i**3 for o, i in shapes.values()) if solve else 0.0
    br, gp, cr = "br" in steps, "gp" in steps, "cr" in steps
    windows_per_block = 2 if cr else 1
    track_dense = args.track_error or gp
    stream_bytes = tokens * args.hidden * torch.finfo(getattr(torch, args.dtype)).bits / 8
    on_host = args.stream_location in ("cpu", "disk") and torch.device(args.device).type == "cuda"
    # number of block forwards of each stage, and stream passes (in, out) over PCIe
    forwards = {
        "placement": 0.0,
        "dense_forward": 1.0 if track_dense else 0.0,
        "statistics": 1.0 if stats_needed else 0.0,
        "masks_lr": 0.0,
        "error": 1.0 if br else 0.0,
        "reconstruction": 3.0 * args.epochs * windows_per_block if br else 0.0,
        "propagation": 1.0 + (1.0 if cr else 0.0),
    }
    if not br and track_dense:
        forwards["propagation"] = 1.0  # the error forward keeps its output
    # without GP, BR's targets come from a dense copy of the block on the sparse stream: one more forward
    if br and not gp:
        forwards["reconstruction"] += 1.0 * windows_per_block
    passes = {  # stream transfers (in + out + reference) per stage, in stream sizes
        "placement": 0.0,
        "dense_forward": 2.0 * forwards["dense_forward"],
        "statistics": 1.0 * forwards["statistics"],
        "masks_lr": 0.0,
        "error": 2.0 * forwards["error"],
        "reconstruction": 2.0 * args.epochs * windows_per_block if br else 0.0,  # inputs + targets each epoch
        "propagation": 2.0 * forwards["propagation"] + (1.0 if track_dense else 0.0),
    }
    # the block's weights onto the device and back (the model lives in CPU RAM), and its masks (bool) out
    weight_bytes = params * (2.0 * torch.finfo(getattr(torch, args.dtype)).bits / 8 + 1.0)
    stages = {}
    for stage in STAGES:
        bf16 = forwards[stage] * forward + (hessian_flops if stage == "statistics" else 0.0)
        fp32 = solve_flops if stage == "masks_lr" else 0.0
        traffic = weight_bytes if stage == "placement" else passes[stage] * stream_bytes
        stages[stage] = {"forwards": forwards[stage], "flops_lowp": bf16, "flops_fp32": fp32,
                         "pcie_bytes": traffic if torch.device(args.device).type == "cuda" and
                         (on_host or stage == "placement") else 0.0}
    return {"tokens": tokens, "block_linear_params": params, "forward_flops": forward, "hessian_flops": hessian_flops,
            "solve_flops": solve_flops, "stream_bytes": stream_bytes, "streams_cross_pcie": on_host, "stages": stages}


def stage_floor(entry: dict[str, float], ceilings: dict[str, Any]) -> float:
    compute = entry["flops_lowp"] / (ceilings["lowp"]["tflops"] * 1e12) + entry["flops_fp32"] / (
        ceilings["fp32"]["tflops"] * 1e12)
    bandwidth = ceilings.get("copy")
    transfer = entry["pcie_bytes"] / (min(bandwidth["h2d_GBps"], bandwidth["d2h_GBps"]) * 1e9) if bandwidth else 0.0
    return max(compute, transfer)


# ====================================================================================================== run
def run_recipe(args, recipe: str, ceilings: dict[str, Any], compiled=False, overlap: bool = False,
               index_on_device: bool = True, staged: bool = True, overlapped_placement: bool = True,
               remask: bool = False) -> dict[str, Any]:
    import hf_recon_prune.offload as offload
    import hf_recon_prune.reconstruction.block_trainer as block_trainer
    import hf_recon_prune.reconstruction.strategies as strategies

    from hf_recon_prune.calibration import CalibrationSet

    device = torch.device(args.device)
    started_build = time.perf_counter()
    model = random_model(args)
    build_seconds = time.perf_counter() - started_build
    ids = torch.randint(0, args.vocab, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(args.seed + 1))
    calibration = CalibrationSet(
        input_ids=ids, is_self_generated=torch.zeros(args.samples, dtype=torch.bool),
        heldout_ids=ids.new_zeros((0, args.seq_len)), statistics_mask=torch.ones(args.samples, dtype=torch.bool),
        description={"source": "random tokens", "num_samples": args.samples},
    )
    sparsity = 0.5 if args.pattern == "unstructured" else 1.0 - int(args.pattern.split(":")[0]) / int(args.pattern.split(":")[1])
    config = PruningConfig(
        method=args.method, sparsity=sparsity, pattern=args.pattern, reconstruction=RECIPES[recipe],
        num_samples=args.samples, seq_len=args.seq_len, br_epochs=args.epochs, br_batch_size=args.br_batch_size,
        forward_batch_size=args.forward_batch_size, device=args.device, stream_location=args.stream_location,
        max_device_memory=args.max_device_memory if device.type == "cuda" else None, seed=args.seed,
        track_reconstruction_error=args.track_error, heldout_fraction=0.0, compile_blocks=compiled,
        reconstruction_mode=args.reconstruction_mode,
    )
    _sync(device)
    started = time.perf_counter()
    def block_done(index: int, report) -> None:  # a run cut short by a time limit still shows how far it got
        print(f"  block {index} done at {time.perf_counter() - started:.1f} s", flush=True)

    switches = {(offload, "OVERLAP_COPIES"): overlap, (block_trainer, "INDEX_ON_DEVICE"): index_on_device,
                (offload, "PINNED_STAGING"): staged, (offload, "OVERLAP_PLACEMENT"): overlapped_placement,
                (strategies, "REMASK_AFTER_EVERY_STEP"): remask}
    previous = {key: getattr(*key) for key in switches}
    for (module, name), value in switches.items():
        setattr(module, name, value)
    try:
        report = Pruner(model, config, calibration_data=calibration, show_progress=False,
                        on_block_end=block_done).prune()
    finally:
        for (module, name), value in previous.items():
            setattr(module, name, value)
    _sync(device)
    seconds = time.perf_counter() - started
    model_flops = flop_model(args, recipe)
    per_block = [dict(b.seconds) for b in report.blocks]
    block_sum = sum(sum(s.values()) for s in per_block)
    # With CR a window's time is split over its two blocks, so the first and last block carry half a window and
    # only the interior blocks show the steady state of a 32-block run (a full window each): take medians over them.
    steady = per_block[1:-1] if "cr" in RECIPES[recipe] and len(per_block) >= 3 else per_block
    stages = {}
    floor_per_block = 0.0
    for stage in STAGES:
        values = [s.get(stage, 0.0) for s in steady]
        median = statistics.median(values) if values else 0.0
        entry = model_flops["stages"][stage]
        floor = stage_floor(entry, ceilings)
        floor_per_block += floor
        flops = entry["flops_lowp"] + entry["flops_fp32"]
        ceiling = ceilings["fp32" if entry["flops_fp32"] and not entry["flops_lowp"] else "lowp"]["tflops"]
        achieved = flops / median / 1e12 if median > 0 and flops else None
        stages[stage] = {
            "median_seconds_per_block": median, "total_seconds": sum(s.get(stage, 0.0) for s in per_block),
            "flops_per_block": flops, "tflops": achieved,
            "percent_of_ceiling": None if achieved is None else 100.0 * achieved / ceiling,
            "floor_seconds_per_block": floor,
            "ratio_to_floor": median / floor if floor > 0 and median > 0 else None,
        }
    peaks = report.memory.get("peak_device_bytes_per_window") or []
    result = {
        "recipe": recipe + {True: " compiled", False: "", "auto": " compile auto"}[compiled]
        + (" overlapped copies" if overlap else "") + ("" if index_on_device else " host index")
        + ("" if staged else " plain placement copies") + ("" if overlapped_placement else " placement in turn")
        + (" re-masked every step" if remask else ""),
        "reconstruction": RECIPES[recipe], "compile_blocks": compiled, "overlap_copies": overlap,
        "br_index_on_device": index_on_device, "placement_staging": staged, "remask_after_every_step": remask,
        "overlap_placement": (report.memory.get("estimate") or {}).get("overlap_placement"),
        "br_executions": sorted({c.get("execution") for b in report.blocks for c in b.br_choices}),
        "method": args.method, "pattern": args.pattern,
        "total_seconds": seconds, "model_build_seconds": build_seconds,
        "setup_seconds": max(seconds - block_sum, 0.0),
        "seconds_per_block_median": statistics.median([sum(s.values()) for s in steady]) if steady else None,
        "blocks_in_median": len(steady),
        "floor_seconds_per_block": floor_per_block,
        "stages": stages,
        "projected_seconds_32_blocks": None,
        "peak_gpu_gib": max(peaks) / GiB if peaks else None,
        "peak_gpu_gib_per_window": [p / GiB for p in peaks],
        "paper_peak_gb": PAPER_PEAK_GB.get(recipe),
        "memory_estimate": report.memory.get("estimate"),
        "blocks": [{"index": b.index, "seconds": dict(b.seconds), "error_before": b.error_before.get("calibration"),
                    "error_after": b.error_after.get("calibration"),
                    "train_losses": b.train_losses} for b in report.blocks],
        "flop_model": model_flops,
        "warnings": list(report.warnings),
    }
    if result["seconds_per_block_median"] is not None:
        result["ratio_to_floor"] = result["seconds_per_block_median"] / floor_per_block if floor_per_block else None
        # The blocks run, then the rest at the steady median: one-off costs (setup, compiling) count once.
        remaining = max(32 - len(per_block), 0)
        result["projected_seconds_32_blocks"] = seconds + remaining * result["seconds_per_block_median"]
    del report, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _f(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    s, c = results["settings"], results["ceilings"]
    copy = c.get("copy")
    lines = [
        f"# Stage profile: {s['layers']} Llama-shaped blocks (hidden {s['hidden']}, FFN {s['intermediate']}), "
        f"random weights ({s['dtype']})",
        "",
        f"Machine: {results['machine']}. Calibration {s['samples']} x {s['seq_len']} random tokens; {s['method']} "
        f"{s['pattern']}; BR {s['epochs']} epochs at batch {s['br_batch_size']}; forward batch {s['forward_batch_size']}; "
        f"streams on {s['stream_location']}.",
        f"Ceilings: {c['lowp']['dtype']} matmul {c['lowp']['n']}^3 {c['lowp']['tflops']:.3g} TFLOP/s, float32 "
        f"{c['fp32']['n']}^3 {c['fp32']['tflops']:.3g} TFLOP/s"
        + (f", pinned copies H2D {copy['h2d_GBps']:.0f} / D2H {copy['d2h_GBps']:.0f} GB/s." if copy else "."),
        "",
    ]
    for r in results["runs"]:
        lines += [
            f"## {r['recipe']} ({'+'.join(r['reconstruction']) or 'masks only'})",
            "",
            f"Total {r['total_seconds']:.1f} s for {s['layers']} blocks (setup {r['setup_seconds']:.1f} s); median "
            f"{_f(r['seconds_per_block_median'], '.2f')} s/block against a floor of {r['floor_seconds_per_block']:.2f} s "
            f"(ratio {_f(r.get('ratio_to_floor'), '.2f')}); projected 32 blocks "
            f"{_f(r['projected_seconds_32_blocks'], '.0f')} s. Peak GPU {_f(r['peak_gpu_gib'], '.2f')} GiB "
            f"(paper {r['paper_peak_gb'] or '–'} GB).",
            "",
            "| stage | s / block (median) | TFLOP / block | TFLOP/s | % of ceiling | floor s / block | x floor |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for stage, e in r["stages"].items():
            if not e["total_seconds"] and not e["flops_per_block"]:
                continue
            lines.append(
                f"| {stage} | {e['median_seconds_per_block']:.3f} | {e['flops_per_block'] / 1e12:.3g} | "
                f"{_f(e['tflops'], '.3g')} | {_f(e['percent_of_ceiling'], '.0f')} | {e['floor_seconds_per_block']:.3f} | "
                f"{_f(e['ratio_to_floor'], '.2f')} |")
        lines.append("")
    lines += [
        "FLOPs are analytic (see the script's docstring); masks_lr is float32 and measured against the float32 "
        "ceiling; the floor of a stage is the larger of its compute at the ceiling and its stream traffic at the "
        "pinned-copy bandwidth. Peak GPU is torch.cuda.max_memory_allocated per window.",
    ]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], args) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    with open(args.markdown, "w", encoding="utf-8") as handle:
        handle.write(markdown(results))


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    n = args.ceiling_size or (8192 if device.type == "cuda" else 512)
    lowp = getattr(torch, args.dtype) if args.dtype != "float32" else torch.bfloat16
    ceilings = {"lowp": matmul_ceiling(device, lowp, n), "fp32": matmul_ceiling(device, torch.float32, max(n // 2, 64)),
                "copy": copy_bandwidth(device)}
    print(f"ceilings: {ceilings['lowp']['tflops']:.1f} TFLOP/s {ceilings['lowp']['dtype']}, "
          f"{ceilings['fp32']['tflops']:.1f} TFLOP/s float32, copies {ceilings['copy']}", flush=True)
    results = {"machine": machine(device, 1), "settings": vars(args), "ceilings": ceilings, "runs": []}
    switch = {"off": [False], "on": [True], "both": [False, True]}
    compile_settings = [{"off": False, "on": True, "auto": "auto"}[c] for c in
                        ("off,on" if args.compile == "both" else args.compile).split(",")]
    index_settings = {"device": [True], "host": [False], "both": [False, True]}[args.br_index]
    remask_settings = {"off": [False], "on": [True], "both": [True, False]}[args.remask]
    runs = [(r, c, o, i, p, m, k) for r in args.recipes for c in compile_settings for o in switch[args.overlap_copies]
            for i in index_settings for p in switch[args.placement_staging] for m in switch[args.overlap_placement]
            for k in remask_settings]
    for recipe, compiled, overlap, index_on_device, staged, overlapped_placement, remask in runs:
        result = run_recipe(args, recipe, ceilings, compiled, overlap, index_on_device, staged, overlapped_placement,
                            remask)
        results["runs"].append(result)
        stage_text = ", ".join(f"{k} {v['median_seconds_per_block']:.2f}" for k, v in result["stages"].items()
                               if v["total_seconds"])
        print(f"{result['recipe']}: {result['total_seconds']:.1f} s, {_f(result['seconds_per_block_median'], '.2f')} s/block "
              f"(floor {result['floor_seconds_per_block']:.2f}; {stage_text}), peak GPU "
              f"{_f(result['peak_gpu_gib'], '.2f')} GiB", flush=True)
        results["optional_modules_imported"] = sorted({m.split(".")[0] for m in sys.modules} & {"datasets", "evaluate", "gguf"})
        write(results, args)
    print(f"wrote {args.out} and {args.markdown}", flush=True)
    if results.get("optional_modules_imported"):
        print(f"WARNING: imported {results['optional_modules_imported']}, which the GPU machines do not have",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
