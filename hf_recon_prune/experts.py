"""Fused mixture-of-experts modules of transformers 5: their layout, and statistics from the tokens routed to each
expert.

transformers 5 stores a block's routed experts as 3-D parameters on one ``...Experts`` module and describes their
layout with the attributes its ``use_experts_implementation`` decorator sets: ``has_gate`` (``gate_up_proj``, else
``up_proj``), ``is_transposed`` (``[experts, in, out]`` instead of ``[experts, out, in]``), ``is_concatenated``
(gate rows then up rows, else interleaved), ``has_bias`` (``gate_up_proj_bias`` / ``down_proj_bias``), plus the
module's own ``_apply_gate`` or ``act_fn``. :func:`fused_experts_layout` reads exactly these, so no model family is
named here; a module without them is read from its parameter shapes.

:class:`ExpertsRecorder` hooks an experts module during the statistics pass. From the module's inputs (the tokens
entering it, each token's top-k expert ids and routing weights) it recomputes, expert by expert and batched over
that expert's tokens, the input of the up projection and the input of the down projection, and adds them to that
expert's statistics. On the first batch it also recomputes the module's output and compares it with the module's
own: a layout that this generic computation does not reproduce is refused by name instead of pruned on wrong
statistics.

An expert that receives fewer routed tokens than ``min_tokens`` gets statistics from *every* token entering the
module instead (as llm-compressor's ``moe_calibrate_all_experts`` does for all experts): a second pass records only
those experts, and the report names them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .criteria.statistics import InputStatistics

__all__ = ["ExpertsLayout", "fused_experts_layout", "ExpertsRecorder", "UnsupportedExpertsError"]

_UP_NAMES = ("gate_up_proj", "up_proj")


class UnsupportedExpertsError(ValueError):
    pass


@dataclass(frozen=True)
class ExpertsLayout:
    up_name: str  # "gate_up_proj" (gated) or "up_proj"
    down_name: str
    gated: bool
    transposed: bool
    concatenated: bool
    up_bias: Optional[str]
    down_bias: Optional[str]
    num_experts: int
    intermediate: int  # the down projection's input features

    def gate_up_rows(self) -> list[tuple[str, slice]]:
        """The gate and up rows of a gated expert's ``[2 * intermediate, in]`` matrix."""
        if self.concatenated:
            return [("gate", slice(0, self.intermediate)), ("up", slice(self.intermediate, 2 * self.intermediate))]
        return [("gate", slice(0, None, 2)), ("up", slice(1, None, 2))]


def _parameter(module: nn.Module, name: str) -> Optional[nn.Parameter]:
    param = module._parameters.get(name)
    return param if isinstance(param, nn.Parameter) or isinstance(param, torch.Tensor) else None


def fused_experts_layout(module: nn.Module) -> Optional[ExpertsLayout]:
    """The layout of a fused experts module, or None when ``module`` is not one (it needs a 3-D ``down_proj`` and a
    3-D ``gate_up_proj`` or ``up_proj`` of its own)."""
    down = _parameter(module, "down_proj")
    up_name = next((n for n in _UP_NAMES if _parameter(module, n) is not None), None)
    if down is None or up_name is None or down.dim() != 3 or _parameter(module, up_name).dim() != 3:
        return None
    up = _parameter(module, up_name)
    transposed = getattr(module, "is_transposed", None)
    if transposed is None:  # [E, out, in]: up's input is the hidden size, which is down's output
        transposed = up.shape[2] != down.shape[1] and up.shape[1] == down.shape[2]
    gated = bool(getattr(module, "has_gate", up_name == "gate_up_proj"))
    intermediate = down.shape[1] if transposed else down.shape[2]

    def bias(name: str) -> Optional[str]:
        return f"{name}_bias" if _parameter(module, f"{name}_bias") is not None else None

    return ExpertsLayout(up_name, "down_proj", gated, bool(transposed), bool(getattr(module, "is_concatenated", True)),
                         bias(up_name), bias("down_proj"), int(down.shape[0]), int(intermediate))


def _matrix(param: torch.Tensor, expert: int, transposed: bool) -> torch.Tensor:
    return param[expert].T if transposed else param[expert]


def _routing_arguments(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(tokens [T, d], top-k expert ids [T, k], routing weights [T, k]) from an experts module's call, whatever
    the family names them."""
    tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
    ids = next((t for t in tensors if not t.is_floating_point()), None)
    floats = [t for t in tensors if t.is_floating_point()]
    if ids is None or len(floats) < 2:
        raise UnsupportedExpertsError("an experts module was called without (hidden states, expert ids, weights)")
    hidden = floats[0]
    weights = next(t for t in floats[1:] if t.shape == ids.shape)
    return hidden.reshape(-1, hidden.shape[-1]), ids.reshape(-1, ids.shape[-1]), weights.reshape(ids.shape[0], -1)


class ExpertsRecorder:
    """Per-expert input statistics of one fused experts module (see the module docstring).

    ``stats["in"][e]`` holds the inputs of expert ``e``'s up (gate_up) projection, ``stats["mid"][e]`` those of its
    down projection; ``token_counts[e]`` the tokens routed to it (this process). ``record`` says which of the two
    are needed (a projection the config excludes needs none). With ``all_token_experts`` only those experts are
    recorded, each from every token.
    """

    def __init__(self, name: str, module: nn.Module, layout: ExpertsLayout, hessian: bool,
                 record: tuple[str, ...] = ("in", "mid"), all_token_experts: Optional[list[int]] = None):
        self.name, self.module, self.layout, self.record = name, module, layout, record
        device = getattr(module, layout.down_name).device
        sizes = {"in": getattr(module, layout.up_name).shape[1 if layout.transposed else 2],
                 "mid": layout.intermediate}
        self.stats = {role: [InputStatistics(sizes[role], device, hessian) for _ in range(layout.num_experts)]
                      for role in ("in", "mid")}
        self.token_counts = torch.zeros(layout.num_experts, dtype=torch.float64)
        self.all_token_experts = all_token_experts
        self._verified = False
        self._handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def unique_stats(self) -> list[InputStatistics]:
        return [s for role in self.record for s in self.stats[role]]

    @torch.no_grad()
    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        hidden, ids, weights = _routing_arguments(args, kwargs)
        layout = self.layout
        flat = ids.reshape(-1)
        valid = flat < layout.num_experts  # expert-parallel sentinels point past the last expert
        counts = torch.bincount(flat[valid], minlength=layout.num_experts)
        order = torch.argsort(torch.where(valid, flat, layout.num_experts), stable=True)
        tokens, slots = order // ids.shape[1], order % ids.shape[1]
        per_expert = counts.tolist()  # one host sync per batch: the split sizes
        self.token_counts += counts.to(self.token_counts.dtype).cpu()
        verify = not self._verified and self.all_token_experts is None
        check = torch.zeros_like(hidden, dtype=torch.float32) if verify else None
        start = 0
        for expert, count in enumerate(per_expert):
            routed = tokens[start:start + count]
            slot = slots[start:start + count]
            start += count
            if self.all_token_experts is not None:
                if expert in self.all_token_experts:
                    self._add(expert, hidden, want_output=False)
                continue
            if count == 0:
                continue
            result = self._add(expert, hidden[routed], want_output=check is not None)
            if check is not None:
                check.index_add_(0, routed, result.float() * weights[routed, slot, None].float())
        if check is not None:
            self._verify(check, output)

    def _add(self, expert: int, x: torch.Tensor, want_output: bool) -> Optional[torch.Tensor]:
        mid = self._up(expert, x)
        if "in" in self.record:
            self.stats["in"][expert].add(x)
        if "mid" in self.record:
            self.stats["mid"][expert].add(mid)
        return self._down(expert, mid) if want_output else None

    def _up(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        module, layout = self.module, self.layout
        weight = _matrix(getattr(module, layout.up_name), expert, layout.transposed)
        projected = x.to(weight.dtype) @ weight.T
        if layout.up_bias:
            projected = projected + getattr(module, layout.up_bias)[expert]
        if not layout.gated:
            return module.act_fn(projected)
        if hasattr(module, "_apply_gate"):
            return module._apply_gate(projected)
        gate, up = projected.chunk(2, dim=-1)
        return module.act_fn(gate) * up

    def _down(self, expert: int, mid: torch.Tensor) -> torch.Tensor:
        module, layout = self.module, self.layout
        out = mid @ _matrix(getattr(module, layout.down_name), expert, layout.transposed).T
        if layout.down_bias:
            out = out + getattr(module, layout.down_bias)[expert]
        if getattr(module, "has_post_expert_norm", False):
            out = module.post_expert_norm(out)
        return out

    def _verify(self, recomputed: torch.Tensor, output) -> None:
        actual = output[0] if isinstance(output, tuple) else output
        actual = actual.reshape(recomputed.shape).float()
        scale = actual.abs().max().clamp_min(1e-6)
        error = float((recomputed - actual).abs().max() / scale)
        tolerance = 1e-3 if actual.dtype == torch.float32 and self.module.down_proj.dtype == torch.float32 else 3e-2
        if error > tolerance:
            raise UnsupportedExpertsError(
                f"{self.name} ({type(self.module).__name__}): the per-expert computation of its statistics does not "
                f"reproduce the module's output (relative error {error:.2e} > {tolerance:g}), so its experts cannot "
                f"be pruned on correct statistics. Leave them dense with exclude_modules=[{self.name!r}] or use "
                "method='magnitude', and please open an issue naming the model."
            )
        self._verified = True


def experts_needing_fallback(token_counts: torch.Tensor, min_tokens: int) -> list[int]:
    """The experts routed fewer than ``min_tokens`` calibration tokens (global counts)."""
    return [e for e, n in enumerate(token_counts.tolist()) if n < min_tokens]
