"""The one table of pruning criteria: a method name (``PruningConfig.method``) -> its ``Criterion``.

Config validation, the engine, the memory estimate, the model card and the CLI all read this table; a criterion's
name appears nowhere else. Built-in criteria are imported when first asked for, so reading the config stays light.

Add a criterion from your own code, in the spirit of transformers' ``register_quantizer``::

    from hf_recon_prune import register_criterion

    @register_criterion("abs-times-row-mean")
    class AbsTimesRowMean:
        def scores(self, weight, statistics):      # a tensor of weight's shape; higher means keep
            return weight.abs() * weight.abs().mean(dim=1, keepdim=True)

    PruningConfig(method="abs-times-row-mean", ...)

A class with only ``scores`` is completed with ``criteria.base.Criterion`` (masks, N:M, LR, kept zeros); subclass
``Criterion`` to set ``statistics`` ("none", "norms", "hessian"), ``label``, ``description`` or ``validate``, or to
override ``prune`` itself as SparseGPT does.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Optional, Union

DEFAULT_METHOD = "sparsegpt"

#: Built-in criteria: name -> (module, class), imported on first use.
_BUILT_IN = {
    "magnitude": (".criteria.magnitude", "MagnitudeCriterion"),
    "wanda": (".criteria.wanda", "WandaCriterion"),
    DEFAULT_METHOD: (".criteria.sparsegpt_criterion", "SparseGPTCriterion"),
}
_REGISTERED: dict[str, Any] = {}


def available_criteria() -> tuple[str, ...]:
    """Every method name ``PruningConfig.method`` accepts, built-in first."""
    return tuple(_BUILT_IN) + tuple(name for name in _REGISTERED if name not in _BUILT_IN)


def get_criterion(name: str):
    """The ``Criterion`` registered as ``name``; ValueError naming the allowed ones otherwise."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if not isinstance(name, str) or name not in _BUILT_IN:
        allowed = ", ".join(map(repr, available_criteria()))
        shown = repr(name) if len(repr(name)) <= 200 else repr(name)[:200] + "..."
        raise ValueError(f"PruningConfig.method={shown} is not allowed; allowed: {allowed} (or a name registered "
                         "with hf_recon_prune.register_criterion).")
    module, attribute = _BUILT_IN[name]
    criterion = _complete(getattr(importlib.import_module(module, __package__), attribute), name)()
    _REGISTERED[name] = criterion
    return criterion


def register_criterion(name: str, criterion: Optional[type] = None, *, replace: bool = False
                       ) -> Union[type, Callable[[type], type]]:
    """Register a criterion class under ``name`` (as a decorator, or called with the class); returns the class.

    The class needs a ``scores(self, weight, statistics)`` method, or a ``prune`` of its own; it is instantiated
    once, without arguments. Registering a name that exists raises ValueError unless ``replace=True``.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"register_criterion(name={name!r}): the name must be a non-empty string")

    def register(cls: type) -> type:
        if not isinstance(cls, type):
            raise TypeError(f"register_criterion({name!r}) takes a class, got {type(cls).__name__}")
        if not replace and name in available_criteria():
            raise ValueError(f"a criterion named {name!r} is registered already; pass replace=True to replace it")
        _REGISTERED[name] = _complete(cls, name)()
        return cls

    return register if criterion is None else register(criterion)


def unregister_criterion(name: str) -> None:
    """Remove a criterion registered with ``register_criterion`` (built-in ones come back on the next lookup)."""
    _REGISTERED.pop(name, None)


def _complete(cls: type, name: str) -> type:
    """``cls`` as a Criterion: a plain class with ``scores`` gets the base class's masks, N:M, LR and validation."""
    from .criteria.base import STATISTICS, Criterion

    full = cls if issubclass(cls, Criterion) else type(cls.__name__, (cls, Criterion), {})
    statistics = getattr(full, "statistics", "none")
    if statistics not in STATISTICS:
        raise ValueError(f"criterion {name!r}: statistics={statistics!r} is not allowed; allowed: "
                         + ", ".join(map(repr, STATISTICS)))
    full.name = name
    if full.label is None:
        full.label = name
    if full.description is None:
        full.description = ((cls.__doc__ or "").strip().splitlines() or [name])[0]
    return full


def prune_linear(layer: Any, method: str, request: Any):
    """Prune one ``nn.Linear`` in place with the criterion ``method``; returns a ``LayerPruneResult``."""
    return get_criterion(method).prune(layer, request)
