"""What full-mode BR's optimizer step costs, and what one fused kernel a weight would save: measured on a block's shapes.

BR's step ends with memory-bound work that the FLOP floor does not count: the gradient hook masks every pruned
linear's gradient (``torch.where``, reading the gradient and the mask and writing a new gradient), then fused Adam
reads and writes the float32 weights and both moments and reads the gradient. ``benchmarks/br_step_profile.py``
measured this at 2.7 ms of a 19.5-ms step on a Llama-2-7B block (H200). This script times that pair (``current``)
against a candidate the package does not use: one function a weight, masking and Adam together, compiled by
``torch.compile`` into one kernel (``fused-masked``), on random weights, gradients and 50 % masks of the given
shapes. It reports the milliseconds of one optimizer step over all weights (median of ``--repeats``, CUDA
synchronised), the bytes each way must move (``current`` 37 bytes a weight: 9 for the masking, 28 for Adam;
``fused-masked`` 29), the bandwidth that implies, and how far the candidate's weights drift from ``current``'s after
``--steps`` steps (float rounding only: same formula).

    python benchmarks/masked_adam.py --shapes 4096x4096,1024x4096,11008x4096,4096x11008 --counts 2,2,2,1 \\
        --out benchmarks/results/masked_adam_7b_h200.json        # a Llama-2-7B block: q,o; k,v as 4096 wide here
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from scale_gpu import machine  # noqa: E402

BETAS = (0.9, 0.999)
EPS = 1e-8


def masked_adam_(param: torch.Tensor, grad: torch.Tensor, keep: torch.Tensor, exp_avg: torch.Tensor,
                 exp_avg_sq: torch.Tensor, step_size: torch.Tensor, bias_correction2_sqrt: torch.Tensor) -> None:
    """One Adam step (no weight decay) of one weight whose gradient is first masked: torch.optim.Adam's formula.
    ``step_size`` = lr / (1 - beta1 ** step), ``bias_correction2_sqrt`` = sqrt(1 - beta2 ** step), as 0-d tensors so
    that a compiled version does not recompile when they change."""
    grad = torch.where(keep, grad, 0.0)
    exp_avg.lerp_(grad, 1.0 - BETAS[0])
    exp_avg_sq.mul_(BETAS[1]).addcmul_(grad, grad, value=1.0 - BETAS[1])
    denom = exp_avg_sq.sqrt() / bias_correction2_sqrt + EPS
    param.sub_(step_size * exp_avg / denom)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008",
                        help="comma-separated OUTxIN weight shapes (default: a Llama-2-7B block's)")
    parser.add_argument("--counts", default="4,2,1", help="how many weights of each shape")
    parser.add_argument("--steps", type=int, default=10, help="steps before the weights are compared")
    parser.add_argument("--repeats", type=int, default=20, help="timed steps (median)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--compile", default="on", choices=["on", "off"],
                        help="compile the candidate ('off': run it eagerly, e.g. on a CPU without a compiler)")
    parser.add_argument("--device", default=None, help="default: cuda if available")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/masked_adam.json")
    args = parser.parse_args(argv)
    args.shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    args.counts = [int(c) for c in args.counts.split(",")]
    if len(args.counts) != len(args.shapes):
        parser.error(f"--counts has {len(args.counts)} entries for {len(args.shapes)} shapes")
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return args


def _problem(args, device: torch.device):
    generator = torch.Generator().manual_seed(args.seed)
    shapes = [shape for shape, count in zip(args.shapes, args.counts) for _ in range(count)]
    keeps = [(torch.rand(shape, generator=generator) >= 0.5).to(device) for shape in shapes]
    weights = [(torch.randn(shape, generator=generator) * 0.02).to(device) * keep for shape, keep in zip(shapes, keeps)]
    grads = [[(torch.randn(shape, generator=generator) * 1e-3).to(device) for shape in shapes]
             for _ in range(3)]  # cycled: each step sees another gradient
    return weights, keeps, grads


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Current:
    """What BR does: masked gradients (the hook's torch.where), then torch.optim.Adam (fused on CUDA)."""

    def __init__(self, weights, keeps, lr: float, device: torch.device):
        self.params = [torch.nn.Parameter(w.clone()) for w in weights]
        self.keeps = keeps
        self.optimizer = torch.optim.Adam(self.params, lr=lr, betas=BETAS, eps=EPS,
                                          fused=True if device.type == "cuda" else None)

    def step(self, grads) -> None:
        for param, keep, grad in zip(self.params, self.keeps, grads):
            param.grad = torch.where(keep, grad, 0.0)
        self.optimizer.step()

    def weights(self) -> list[torch.Tensor]:
        return [p.detach() for p in self.params]


class FusedMasked:
    """The candidate: :func:`masked_adam_` per weight, compiled or not."""

    def __init__(self, weights, keeps, lr: float, device: torch.device, compiled: bool):
        self.params = [w.clone() for w in weights]
        self.keeps = keeps
        self.moments = [(torch.zeros_like(w), torch.zeros_like(w)) for w in weights]
        self.lr, self.count, self.device = lr, 0, device
        self.update: Callable = torch.compile(masked_adam_, fullgraph=True, dynamic=False) if compiled else masked_adam_

    def step(self, grads) -> None:
        self.count += 1
        step_size = torch.tensor(self.lr / (1.0 - BETAS[0] ** self.count), device=self.device)
        correction = torch.tensor((1.0 - BETAS[1] ** self.count) ** 0.5, device=self.device)
        for param, keep, grad, (exp_avg, exp_avg_sq) in zip(self.params, self.keeps, grads, self.moments):
            self.update(param, grad, keep, exp_avg, exp_avg_sq, step_size, correction)

    def weights(self) -> list[torch.Tensor]:
        return self.params


def run(args) -> dict[str, Any]:
    device = torch.device(args.device)
    weights, keeps, grads = _problem(args, device)
    numel = sum(w.numel() for w in weights)
    optimizers = {"current": Current(weights, keeps, args.lr, device),
                  "fused-masked": FusedMasked(weights, keeps, args.lr, device, args.compile == "on")}
    bytes_per_weight = {"current": 9 + 28, "fused-masked": 29}
    for step in range(args.steps):  # the same gradients in the same order for both; compiles on the first step
        for optimizer in optimizers.values():
            optimizer.step(grads[step % len(grads)])
    _sync(device)
    reference = optimizers["current"].weights()
    candidate = optimizers["fused-masked"].weights()
    moved = sum(float((w - r0).abs().sum()) for w, r0 in zip(reference, weights))
    drift = sum(float((c - r).abs().sum()) for c, r in zip(candidate, reference))
    pruned_nonzero = sum(int((c[~k] != 0).sum()) for c, k in zip(candidate, keeps))
    timings = {}
    for name, optimizer in optimizers.items():
        seconds = []
        for repeat in range(args.repeats):
            _sync(device)
            started = time.perf_counter()
            optimizer.step(grads[repeat % len(grads)])
            _sync(device)
            seconds.append(time.perf_counter() - started)
        median = statistics.median(seconds)
        timings[name] = {"ms_per_step": 1e3 * median, "bytes_per_weight": bytes_per_weight[name],
                         "GBps": bytes_per_weight[name] * numel / median / 1e9}
    return {"weights": numel, "timings": timings,
            "relative_drift_after_steps": drift / moved if moved else 0.0,
            "pruned_weights_nonzero": pruned_nonzero, "steps_compared": args.steps}


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    result = {"machine": machine(torch.device(args.device), 1),
              "settings": {k: v for k, v in vars(args).items()}} | result
    for name, timing in result["timings"].items():
        print(f"{name}: {timing['ms_per_step']:.3f} ms a step over {result['weights'] / 1e6:.0f} M weights "
              f"({timing['GBps']:.0f} GB/s at {timing['bytes_per_weight']} bytes a weight)", flush=True)
    print(f"drift of the candidate after {args.steps} steps: {result['relative_drift_after_steps']:.2e} of the "
          f"distance moved; pruned weights not zero: {result['pruned_weights_nonzero']}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
