"""Where each model family keeps its decoder blocks: the only place with family knowledge.

The engine needs three things from a causal LM: the ordered list of decoder blocks, the base model that runs the
embeddings (and computes the per-forward keyword arguments the blocks receive), and the prunable linear layers of a
block. Families that keep their blocks in a known place are listed in ``KNOWN_BLOCK_PATHS``; any other model is
handled by the generic fallback, which looks for the ``nn.ModuleList`` of the model's ``_no_split_modules`` class.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from torch import nn

# model_type -> attribute path of the decoder blocks, from the *ForCausalLM module.
KNOWN_BLOCK_PATHS: dict[str, str] = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "mixtral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "gemma": "model.layers",
    "gemma2": "model.layers",
    "gemma3_text": "model.layers",
    "phi3": "model.layers",
    "olmo2": "model.layers",
    "granite": "model.layers",
    "opt": "model.decoder.layers",
    "gpt_neox": "gpt_neox.layers",
}


class UnsupportedModelError(ValueError):
    pass


@dataclass
class DecoderLayout:
    family: str
    blocks: nn.ModuleList
    blocks_path: str
    base_model: nn.Module  # runs embeddings -> blocks -> final norm, without the LM head


def _get_path(root: nn.Module, path: str) -> Optional[nn.Module]:
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _find_block_list(model: nn.Module) -> Optional[tuple[str, nn.ModuleList]]:
    block_classes = set(getattr(model, "_no_split_modules", None) or [])
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if all(type(child).__name__ in block_classes for child in module):
                return name, module
    return None


def resolve_layout(model: nn.Module) -> DecoderLayout:
    """Locate the decoder blocks of a Hugging Face causal LM, or raise naming the model class."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    path = KNOWN_BLOCK_PATHS.get(model_type)
    blocks = _get_path(model, path) if path else None
    if not isinstance(blocks, nn.ModuleList):
        found = _find_block_list(model)
        if found is None:
            raise UnsupportedModelError(
                f"{type(model).__name__} (model_type={model_type!r}) is not supported: no list of decoder blocks was "
                f"found (known families: {sorted(KNOWN_BLOCK_PATHS)}). Please open an issue with the model id."
            )
        path, blocks = found
    base_model = getattr(model, "base_model", model)
    if base_model is model or not isinstance(base_model, nn.Module):
        raise UnsupportedModelError(f"{type(model).__name__} has no base model to run the embeddings with")
    if not prunable_linears(blocks[0]):
        raise UnsupportedModelError(
            f"{type(model).__name__}: its decoder blocks ({type(blocks[0]).__name__}) contain no torch.nn.Linear "
            "layers to prune (GPT-2 style Conv1D layers are not supported)."
        )
    return DecoderLayout(family=model_type or "generic", blocks=blocks, blocks_path=path, base_model=base_model)


def prunable_linears(
    block: nn.Module, include: Optional[list[str]] = None, exclude: Optional[list[str]] = None
) -> dict[str, nn.Linear]:
    """The block's nn.Linear layers (names relative to the block), filtered by include/exclude regexes (re.search)."""
    layers = {}
    for name, module in block.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if include and not any(re.search(p, name) for p in include):
            continue
        if exclude and any(re.search(p, name) for p in exclude):
            continue
        layers[name] = module
    return layers
