"""What can be pruned in a decoder block, seen as matrices: linears, fused expert parameters, GPT-2 ``Conv1D``.

A :class:`PrunableWeight` is one parameter that the engine masks and that block-wise reconstruction trains, with a
keep-mask of the parameter's own shape. It is pruned as one or more :class:`MatrixUnit`: 2-D views ``[out, in]`` of
the parameter, each pruned as if it were its own ``nn.Linear`` (its own statistics, its own N:M groups along its
input axis). The units of a weight are:

* a plain ``nn.Linear``: the whole weight;
* a fused projection (Phi-3's ``qkv_proj``, ``gate_up_proj``): one unit per projection, as the family's row split
  in ``architectures.FUSED_PROJECTIONS`` says, all reading the layer's input statistics;
* GPT-2's ``Conv1D`` (weight stored ``[in, out]``): the transposed weight;
* a fused experts module of transformers 5 (``gate_up_proj`` / ``up_proj`` / ``down_proj`` of shape
  ``[experts, out, in]``, or ``[experts, in, out]`` when the module says ``is_transposed``): one unit per expert and
  projection (an expert's gate and up rows are two units), with statistics from the tokens routed to that expert
  (``experts.py``).

Routers stay dense unless an ``include_modules`` pattern names them (``architectures.ROUTER_PATTERNS``); biases and
norms are never masked. Whatever a block holds that is none of the above is reported by
:func:`unprunable_parameters`, so that the report never claims more than was pruned.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.utils import parametrize

from .architectures import ROUTER_PATTERNS, fused_projection_rows
from .experts import ExpertsLayout, fused_experts_layout

__all__ = ["MatrixUnit", "PrunableWeight", "prunable_weights", "unprunable_parameters", "KINDS"]

#: What a prunable weight can be; ``matrix`` is a 2-D parameter of another module (a router named by include).
KINDS = ("linear", "conv1d", "experts", "matrix")

Rows = Optional[slice]


@dataclass(eq=False)
class MatrixUnit:
    """One ``[out, in]`` matrix of a :class:`PrunableWeight`, pruned as one linear layer.

    ``weight`` is a view into the parameter (writes go through); ``statistics`` names the input statistics it reads
    (units reading the same input share them, and a shared Hessian is factored once).
    """

    name: str
    owner: "PrunableWeight"
    expert: Optional[int]
    rows: Rows
    statistics: str

    @property
    def weight(self) -> torch.Tensor:
        return self.owner.matrix(self.owner.weight.data, self.expert, self.rows)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def select(self, mask: torch.Tensor) -> torch.Tensor:
        """The part of a parameter-shaped ``mask`` that this unit covers (a view)."""
        return self.owner.matrix(mask, self.expert, self.rows)


@dataclass(eq=False)
class PrunableWeight:
    """One parameter the engine masks, and the matrices it is pruned as (see the module docstring)."""

    name: str  # relative to the block, e.g. "self_attn.q_proj" or "mlp.experts.gate_up_proj"
    module: nn.Module
    param_name: str
    kind: str
    transposed: bool = False  # stored [..., in, out]
    units: list[MatrixUnit] = field(default_factory=list)
    experts_module: Optional[str] = None  # for kind "experts": the name of the experts module in the block

    @property
    def weight(self) -> nn.Parameter:
        """The parameter itself, also while a masked delta parametrizes it (``reconstruction/masked_delta.py``)."""
        if parametrize.is_parametrized(self.module, self.param_name):
            return self.module.parametrizations[self.param_name].original
        return getattr(self.module, self.param_name)

    @property
    def parameter_name(self) -> str:
        """The parameter's name inside the block ("self_attn.q_proj.weight", "mlp.experts.gate_up_proj"), as
        ``unprunable_parameters`` names the parameters left dense."""
        return self.name if self.name.rpartition(".")[2] == self.param_name else f"{self.name}.{self.param_name}"

    @property
    def key(self) -> Union[nn.Module, "PrunableWeight"]:
        """What masks are keyed by: the ``nn.Linear`` itself (peft's LoRA adapts it), else this object."""
        return self.module if self.kind == "linear" else self

    @property
    def is_whole(self) -> bool:
        """A single unit that is the parameter itself (no split, no transpose): its mask needs no assembling."""
        return len(self.units) == 1 and self.units[0].rows is None and not self.transposed and self.weight.dim() == 2

    def matrix(self, tensor: torch.Tensor, expert: Optional[int], rows: Rows) -> torch.Tensor:
        view = tensor if expert is None else tensor[expert]
        if self.transposed:
            view = view.T
        return view if rows is None else view[rows]

    def __repr__(self) -> str:
        return f"PrunableWeight({self.name!r}, kind={self.kind!r}, shape={tuple(self.weight.shape)})"


# Weights are made once per parameter and reused: masks are keyed by them across the calls of one run.
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _cached(module: nn.Module, key: tuple, make) -> PrunableWeight:
    per_module = _CACHE.setdefault(module, {})
    if key not in per_module:
        per_module[key] = make()
    return per_module[key]


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None \
        and module.weight.dim() == 2 and hasattr(module, "nf")


def _matches(name: str, patterns: Optional[Sequence[str]]) -> bool:
    return bool(patterns) and any(re.search(p, name) for p in patterns)


def is_router(name: str) -> bool:
    return any(re.search(p, name) for p in ROUTER_PATTERNS)


def _linear_weight(name: str, module: nn.Module, kind: str, family_config) -> PrunableWeight:
    transposed = kind == "conv1d"
    weight = PrunableWeight(name, module, "weight", kind, transposed=transposed)
    splits = fused_projection_rows(family_config, name, module.weight.shape[1 if transposed else 0])
    if splits:
        weight.units = [MatrixUnit(f"{name}.{part}", weight, None, rows, name) for part, rows in splits]
    else:
        weight.units = [MatrixUnit(name, weight, None, None, name)]
    return weight


def _experts_weights(name: str, module: nn.Module, layout: ExpertsLayout) -> list[PrunableWeight]:
    weights = []
    for param_name, role in ((layout.up_name, "in"), (layout.down_name, "mid")):
        weight = PrunableWeight(f"{name}.{param_name}", module, param_name, "experts", transposed=layout.transposed,
                                experts_module=name)
        parts = layout.gate_up_rows() if param_name == layout.up_name and layout.gated else [(None, None)]
        for expert in range(layout.num_experts):
            stats = f"{name}[{expert}].{role}"
            for part, rows in parts:
                suffix = f".{part}" if part else ""
                weight.units.append(MatrixUnit(f"{weight.name}[{expert}]{suffix}", weight, expert, rows, stats))
        weights.append(weight)
    return weights


def _router_weight(name: str, module: nn.Module) -> Optional[PrunableWeight]:
    param = getattr(module, "weight", None)
    if not isinstance(param, nn.Parameter) or param.dim() != 2:
        return None
    weight = PrunableWeight(name, module, "weight", "matrix")
    weight.units = [MatrixUnit(name, weight, None, None, name)]
    return weight


def prunable_weights(block: nn.Module, include: Optional[Sequence[str]] = None,
                     exclude: Optional[Sequence[str]] = None, family_config=None) -> dict[str, PrunableWeight]:
    """The block's prunable weights by name, filtered by ``include`` / ``exclude`` regexes (``re.search`` on the
    weight's name). Routers are left out unless an ``include`` pattern names them."""
    found: dict[str, PrunableWeight] = {}
    for name, module in block.named_modules():
        if isinstance(module, nn.Linear) or _is_conv1d(module):
            kind = "linear" if isinstance(module, nn.Linear) else "conv1d"
            candidates = [_cached(module, ("linear", name), lambda: _linear_weight(name, module, kind, family_config))]
        elif (layout := fused_experts_layout(module)) is not None:
            candidates = _cached(module, ("experts", name), lambda: _experts_weights(name, module, layout))
        elif name and is_router(name) and _matches(name, include):
            router = _cached(module, ("router", name), lambda: _router_weight(name, module))
            candidates = [router] if router is not None else []
        else:
            continue
        for weight in candidates:
            if is_router(weight.name) and not _matches(weight.name, include):
                continue
            if include and not _matches(weight.name, include):
                continue
            if _matches(weight.name, exclude):
                continue
            found[weight.name] = weight
    return found


def unprunable_parameters(block: nn.Module, weights: dict[str, PrunableWeight]) -> dict[str, str]:
    """Every parameter of ``block`` that is not pruned, by name, with why: ``"router"``, ``"bias"``,
    ``"norm or vector"`` (1-D), ``"excluded"`` (a prunable kind filtered out by the config) or ``"unsupported"``
    (a matrix the engine has no way to prune, e.g. a convolution or a state-space parameter)."""
    pruned = {id(w.weight) for w in weights.values()}
    reasons: dict[str, str] = {}
    for name, param in block.named_parameters():
        if id(param) in pruned:
            continue
        owner_name, _, attribute = name.rpartition(".")
        owner = block.get_submodule(owner_name) if owner_name else block
        if is_router(owner_name) or is_router(name):
            reasons[name] = "router"
        elif attribute == "bias" or attribute.endswith("_bias"):
            reasons[name] = "bias"
        elif param.dim() < 2:
            reasons[name] = "norm or vector"
        elif isinstance(owner, nn.Linear) or _is_conv1d(owner) or fused_experts_layout(owner) is not None:
            reasons[name] = "excluded"
        else:
            reasons[name] = "unsupported"
    return reasons
