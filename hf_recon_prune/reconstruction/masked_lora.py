"""LoRA adapters that respect a pruning mask, built on peft.

For a pruned ``nn.Linear`` with weight ``W`` and keep-mask ``M`` (True = kept), the adapted layer computes

    y = x @ (M * (W + s * B @ A)).T + bias,        s = lora_alpha / rank

so the low-rank update can never revive a pruned weight, and merging writes exactly ``M * (W + s * B @ A)`` into
``W``: the merged layer is identical to the adapted one and keeps the mask.

The adapters are created by peft itself: ``LoraModel`` (what ``peft.inject_adapter_in_model`` uses) with a
``LoraConfig`` whose custom-module dispatch (``LoraConfig._register_custom_module({nn.Linear: MaskedLoraLinear})``,
experimental in peft) maps ``nn.Linear`` to :class:`MaskedLoraLinear`, a subclass of peft's ``lora.Linear``. Only the
forward and the delta weight are changed; initialisation (``A`` Kaiming-uniform, ``B = 0``, so the adapted layer
initially equals the masked layer), device placement, merging and unloading are peft's. Unloading puts the original
``nn.Linear`` objects back into their parents, so dictionaries keyed by those modules (the masks) stay valid.

peft's dispatch does not pass anything but the target module and the config to the layer class, so the mask is given
to every created layer right after injection (:meth:`MaskedLoraLinear.set_prune_mask`); a layer without a mask
refuses to run.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from peft.tuners.lora import LoraLayer, LoraModel
from torch import nn

__all__ = [
    "MaskedLoraLinear",
    "MaskedLoraHandle",
    "attach_masked_lora",
    "merge_masked_lora",
    "unload_masked_lora",
    "has_lora_layers",
]

ADAPTER_NAME = "default"


class MaskedLoraLinear(PeftLoraLinear):
    """peft ``lora.Linear`` whose effective weight is ``prune_mask * (W + sum_adapters s * B @ A)``.

    Plain LoRA only: lora dropout, lora_bias and LoRA variants (DoRA, ...) are refused because the masked product
    is computed on the weight, not on the activations. The mask is a non-persistent buffer ``prune_mask``.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        if config.lora_dropout:
            raise ValueError("MaskedLoraLinear needs lora_dropout=0: the mask is applied to the merged weight.")
        if config.lora_bias:
            raise ValueError("MaskedLoraLinear does not support lora_bias=True.")
        if config.fan_in_fan_out:
            raise ValueError("MaskedLoraLinear targets nn.Linear only (fan_in_fan_out=False).")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        if self.lora_variant:
            raise ValueError(f"MaskedLoraLinear supports plain LoRA only, not {sorted(self.lora_variant)}.")
        self.register_buffer("prune_mask", None, persistent=False)

    # ------------------------------------------------------------------ mask
    def set_prune_mask(self, mask: torch.Tensor) -> None:
        weight = self.get_base_layer().weight
        if tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
        self.prune_mask = mask.to(device=weight.device, dtype=torch.bool)

    def _mask(self) -> torch.Tensor:
        if self.prune_mask is None:
            raise RuntimeError("MaskedLoraLinear has no prune_mask; attach it with attach_masked_lora().")
        return self.prune_mask

    # ------------------------------------------------------------------ weights
    def _raw_delta(self, adapter: str) -> torch.Tensor:
        """peft's unmasked ``s * B @ A``."""
        return super().get_delta_weight(adapter)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The masked update ``M * s * B @ A``; peft's merge adds it to ``W`` (see :meth:`merge`)."""
        return self._raw_delta(adapter) * self._mask()

    def effective_weight(self) -> torch.Tensor:
        """``M * (W + sum over active adapters of s * B @ A)``: the weight the forward uses (differentiable)."""
        weight = self.get_base_layer().weight
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                weight = weight + self._raw_delta(adapter).to(weight.dtype)
        return weight * self._mask()

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """peft's merge (``W += M * s * B @ A``), then pruned entries set to exactly zero.

        For a masked ``W`` this writes exactly ``M * (W + s * B @ A)``, bit for bit the weight the forward used: kept
        entries get ``W + s*B@A`` (the same float operation as in :meth:`effective_weight`), pruned entries 0.
        """
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        base = self.get_base_layer()
        base.weight.data.masked_fill_(~self._mask(), 0)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise NotImplementedError("MaskedLoraLinear does not support mixed-adapter batches (adapter_names).")
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        if self.merged:
            return base(x, *args, **kwargs)
        return F.linear(x, self.effective_weight(), base.bias)

    def __repr__(self) -> str:
        return "masked_" + super().__repr__()


@dataclass
class MaskedLoraHandle:
    """What :func:`attach_masked_lora` created: the peft tuner and the adapted layers by ``"<block>.<name>"``."""

    container: nn.ModuleList
    tuner: Optional[LoraModel]
    layers: dict[str, MaskedLoraLinear] = field(default_factory=dict)
    active: bool = True

    def parameters(self) -> list[nn.Parameter]:
        """The adapter parameters (every lora_A / lora_B weight)."""
        params: list[nn.Parameter] = []
        for layer in self.layers.values():
            for module_dict in (layer.lora_A, layer.lora_B):
                for module in module_dict.values():
                    params.extend(module.parameters())
        return params


def _as_blocks(block_or_blocks: Union[nn.Module, Sequence[nn.Module]]) -> list[nn.Module]:
    if isinstance(block_or_blocks, nn.Module) and not isinstance(block_or_blocks, nn.ModuleList):
        return [block_or_blocks]
    return list(block_or_blocks)


def attach_masked_lora(
    block_or_blocks: Union[nn.Module, Sequence[nn.Module]],
    masks: Mapping[nn.Linear, torch.Tensor],
    rank: int,
    alpha: float,
    target_patterns: Optional[Iterable[str]] = None,
    seed: Optional[int] = None,
) -> MaskedLoraHandle:
    """Wrap every pruned ``nn.Linear`` of the block(s) (a key of ``masks``) in a :class:`MaskedLoraLinear`.

    ``target_patterns``: optional regexes (``re.search``) over a layer's name *within its block*, e.g.
    ``"self_attn\\."``; ``None`` adapts every pruned linear. ``seed``: when given, the adapter initialisation draws
    from ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``, so it is reproducible and the global RNG state
    is left untouched. Only the adapters require grad afterwards (peft freezes the rest of the blocks; the caller
    decides what else to train). Returns a handle for :func:`merge_masked_lora` / :func:`unload_masked_lora`; when no
    layer matches, nothing is attached and the handle has no layers.
    """
    blocks = _as_blocks(block_or_blocks)
    container = nn.ModuleList(blocks)  # a plain parent for peft; the blocks do not know about it
    patterns = [re.compile(p) for p in (target_patterns or [])]
    names: dict[str, nn.Linear] = {}
    for b, block in enumerate(blocks):
        for name, module in block.named_modules():
            if isinstance(module, LoraLayer):
                raise ValueError(f"block {b} already contains a LoRA layer at {name!r}")
            if module in masks:
                if not isinstance(module, nn.Linear):
                    raise TypeError(f"masked module {name!r} is {type(module).__name__}, not nn.Linear")
                if patterns and not any(p.search(name) for p in patterns):
                    continue
                names[f"{b}.{name}"] = module
    if not names:
        return MaskedLoraHandle(container=container, tuner=None, layers={}, active=False)

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,
        # exact names of the chosen layers inside the container (peft uses re.fullmatch on a string)
        target_modules="|".join(re.escape(name) for name in names),
    )
    config._register_custom_module({nn.Linear: MaskedLoraLinear})

    device = next(iter(names.values())).weight.device
    if seed is None:
        tuner = LoraModel(container, config, ADAPTER_NAME)
    else:
        with _seeded(seed, device):
            tuner = LoraModel(container, config, ADAPTER_NAME)

    layers: dict[str, MaskedLoraLinear] = {}
    for name, linear in names.items():
        layer = container.get_submodule(name)
        if not isinstance(layer, MaskedLoraLinear) or layer.get_base_layer() is not linear:
            unload_masked_lora(MaskedLoraHandle(container=container, tuner=tuner, layers={}, active=True))
            raise RuntimeError(f"peft did not wrap {name!r} in MaskedLoraLinear (got {type(layer).__name__})")
        layer.set_prune_mask(masks[linear])
        layers[name] = layer
    return MaskedLoraHandle(container=container, tuner=tuner, layers=layers, active=True)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device):
    """Seed the CPU generator (peft creates the adapters on the CPU, then moves them) and the generator of ``device``
    when it is a CUDA device, restoring both afterwards. Unlike ``torch.manual_seed`` this leaves every other GPU's
    generator alone."""
    cuda_index = None
    if device.type == "cuda":
        cuda_index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.random.fork_rng(devices=[] if cuda_index is None else [cuda_index], device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if cuda_index is not None:
            torch.cuda.default_generators[cuda_index].manual_seed(seed)
        yield


def merge_masked_lora(handle: MaskedLoraHandle) -> None:
    """Masked merge (``W <- M * (W + s * B @ A)``) and removal of every peft module: the blocks hold plain
    ``nn.Linear`` modules again (the original objects), with the mask intact."""
    _unload(handle, merge=True)


def unload_masked_lora(handle: MaskedLoraHandle) -> None:
    """Remove the adapters without merging them (the base weights are left as they are)."""
    _unload(handle, merge=False)


def _unload(handle: MaskedLoraHandle, merge: bool) -> None:
    if not handle.active:
        return
    if handle.tuner is not None:
        with torch.no_grad():
            if merge:
                handle.tuner.merge_and_unload()
            else:
                handle.tuner.unload()
    handle.active = False
    leftover = [name for name, module in handle.container.named_modules() if isinstance(module, LoraLayer)]
    if leftover:
        raise RuntimeError(f"peft layers left in the blocks after unloading: {leftover}")


def has_lora_layers(module: nn.Module) -> bool:
    """True if any peft LoRA layer is inside ``module``."""
    return any(isinstance(m, LoraLayer) for m in module.modules())
