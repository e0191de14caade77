"""What moving one decoder block onto the GPU and back costs, piece by piece, against its PCIe floor.

The engine's ``placement`` stage (``stage_profile.py``) puts a block's weights on the device for its turn, brings its
keep-masks to the CPU and the final weights back. This times, on one block of a random model (Llama-2-7B's shapes by
default; ``--hidden 8192 --intermediate 28672 --heads 64 --kv-heads 8`` for Llama-3-70B's):

- ``onload`` / ``masks_out`` / ``offload``: the package's own ``BlockPlacement`` and the mask copy, as the engine
  runs them, with plain copies (``offload.PINNED_STAGING = False``) and through its pinned slots (the default);
- the raw copies they are made of: host to device from pageable and from pinned memory, device to host into freshly
  allocated pageable memory, into pageable memory already touched, into pinned memory, and the host-side copies
  between pinned and pageable memory that a pinned staging buffer adds.

The floor is the block's bytes at the pinned copy bandwidth. Each figure is the median of ``--repeats``.

    python benchmarks/placement_copies.py --out benchmarks/results/placement_copies_h200.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scale_gpu import llama_config  # noqa: E402

import hf_recon_prune.offload as offload  # noqa: E402
from hf_recon_prune.offload import BlockPlacement  # noqa: E402


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def one_block(args):
    from transformers import AutoModelForCausalLM

    config = llama_config(args)
    config.num_hidden_layers = 1
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype))
    block = model.model.layers[0]
    block.to_empty(device="cpu")
    with torch.no_grad():
        for param in block.parameters():
            param.fill_(0.01)
    return block


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/placement_copies.json")
    args = parser.parse_args()
    device = torch.device("cuda")

    block = one_block(args)
    tensors = [p.detach() for p in block.parameters()]
    total = sum(t.numel() * t.element_size() for t in tensors)
    numel = sum(t.numel() for t in tensors)
    rows = {}

    on_device = [t.to(device) for t in tensors]
    pinned = [torch.empty_like(t).pin_memory() for t in tensors]
    touched = [torch.empty_like(t).fill_(0) for t in tensors]
    pinned_bool = torch.empty(numel, dtype=torch.bool).pin_memory()
    mask = torch.ones(numel, dtype=torch.bool, device=device)

    rows["h2d_pageable"] = timed(lambda: [t.to(device) for t in tensors], args.repeats)
    rows["h2d_pinned"] = timed(lambda: [g.copy_(p, non_blocking=True) for g, p in zip(on_device, pinned)],
                               args.repeats)
    rows["d2h_fresh_pageable"] = timed(lambda: [g.to("cpu") for g in on_device], args.repeats)
    rows["d2h_touched_pageable"] = timed(lambda: [c.copy_(g) for c, g in zip(touched, on_device)], args.repeats)
    rows["d2h_pinned"] = timed(lambda: [p.copy_(g, non_blocking=True) for p, g in zip(pinned, on_device)],
                               args.repeats)
    rows["host_pageable_to_pinned"] = timed(lambda: [p.copy_(t) for p, t in zip(pinned, tensors)], args.repeats)
    rows["host_pinned_to_fresh"] = timed(lambda: [p.clone() for p in pinned], args.repeats)
    rows["host_pinned_to_touched"] = timed(lambda: [c.copy_(p) for c, p in zip(touched, pinned)], args.repeats)
    rows["masks_d2h_fresh"] = timed(lambda: mask.to("cpu"), args.repeats)
    rows["masks_d2h_pinned"] = timed(lambda: pinned_bool.copy_(mask, non_blocking=True), args.repeats)
    start = time.perf_counter()
    torch.empty(total, dtype=torch.uint8).pin_memory()
    rows["pin_allocation_once"] = time.perf_counter() - start
    del on_device

    for staged in (False, True):  # the package's placement with plain copies, then through its pinned slots
        offload.PINNED_STAGING = staged
        placement = BlockPlacement(device)
        parts = {"onload": [], "masks_out": [], "offload": []}
        for _ in range(args.repeats):
            torch.cuda.synchronize()
            start = time.perf_counter()
            placement.onload(block)
            torch.cuda.synchronize()
            parts["onload"].append(time.perf_counter() - start)
            start = time.perf_counter()
            placement.staging.to_host(mask)
            parts["masks_out"].append(time.perf_counter() - start)
            torch.cuda.synchronize()
            start = time.perf_counter()
            placement.offload(block)
            torch.cuda.synchronize()
            parts["offload"].append(time.perf_counter() - start)
        for name, values in parts.items():
            rows[f"package_{'staged' if staged else 'plain'}_{name}"] = statistics.median(values)
    offload.PINNED_STAGING = True

    bandwidth = total / min(rows["h2d_pinned"], rows["d2h_pinned"])
    floor = 2 * total / bandwidth + numel / bandwidth
    result = {
        "device": torch.cuda.get_device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "block_bytes": total, "block_params": numel, "pinned_bandwidth_GBps": bandwidth / 1e9,
        "floor_s": floor, "seconds": rows,
    }
    for name, seconds in rows.items():
        print(f"{name:28s} {seconds * 1e3:9.1f} ms")
    totals = {kind: sum(v for k, v in rows.items() if k.startswith(f"package_{kind}_")) for kind in ("plain", "staged")}
    result["package_totals_s"] = totals
    print(f"block {total / 2**20:.0f} MiB, pinned {bandwidth / 1e9:.1f} GB/s, floor (in + out + masks) "
          f"{floor * 1e3:.1f} ms, package total: plain copies {totals['plain'] * 1e3:.1f} ms, "
          f"staged {totals['staged'] * 1e3:.1f} ms")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
