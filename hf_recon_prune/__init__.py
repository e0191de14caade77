"""hf-recon-prune: post-training pruning of Hugging Face causal LMs with reconstruction error minimization."""

from ._version import __version__
from .config import PruningConfig
from .methods import register_criterion

__all__ = ["PruningConfig", "register_criterion", "Pruner", "PruneReport", "perplexity", "evaluate", "compare", "EvalResults",
           "evaluate_zero_shot", "__version__"]


def __getattr__(name):
    # Lazy so that `import hf_recon_prune` stays cheap and PruningConfig works without loading the engine.
    if name == "Pruner":
        from .pruner import Pruner

        return Pruner
    if name == "PruneReport":
        from .report import PruneReport

        return PruneReport
    if name in ("perplexity", "evaluate", "compare", "EvalResults"):
        from . import evaluation

        return getattr(evaluation, name)
    if name in ("evaluate_zero_shot", "PAPER_TASKS"):
        from . import zero_shot

        return getattr(zero_shot, name)
    if name == "generate_self_calibration":
        from .calibration import generate_self_calibration

        return generate_self_calibration
    raise AttributeError(f"module 'hf_recon_prune' has no attribute {name!r}")
