"""PruningConfig: every choice of a pruning run, validated at construction and serialisable into config.json."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ._version import __version__
from .methods import DEFAULT_METHOD, get_criterion

logger = logging.getLogger(__name__)

#: The reconstruction techniques ``reconstruction=[...]`` takes: the one table of them (the model card reads its
#: titles and explanations; ``reconstruction/plan.py`` decides what they mean for a run).
TECHNIQUES = {
    "lr": ("Layer-wise reconstruction (LR)",
           "once a linear layer's mask is chosen, its kept weights are updated (SparseGPT's OBS update) so that the "
           "layer reproduces its dense output on the calibration inputs."),
    "br": ("Block-wise reconstruction (BR)",
           "the kept weights of each decoder block are trained with Adam, masks held fixed, to minimise the mean "
           "squared error between the pruned block's output and the dense target on the calibration samples."),
    "gp": ("Global propagation (GP)",
           "BR's target is the dense model's own activation at that depth, computed from the dense input stream, "
           "so each block also corrects errors accumulated in the blocks before it."),
    "cr": ("Cross-block reconstruction (CR)",
           "BR trains windows of two adjacent blocks together, sliding by one block, so every block is optimised "
           "against a target one block further downstream (by default as in the authors' code, with a single-block "
           "window at both ends, so that every block is trained twice)."),
}
RECONSTRUCTIONS = tuple(TECHNIQUES)
TRAINED_MODES = ("full", "lora")  # what a window trains (reconstruction/strategies.py)
RECONSTRUCTION_MODES = TRAINED_MODES + ("auto",)  # auto: full if a window fits the budget, else lora (memory.py)
SELF_SAMPLE_USES = ("reconstruction", "all")
STREAM_LOCATIONS = ("auto", "device", "cpu", "disk")
DATA_PARALLEL_MODES = ("auto", "off")
AUTOCAST_DTYPES = ("auto", "bfloat16", "float16", "float32")
#: The CR window schedules (``reconstruction/schedule.py`` builds them): "authors" = (0,), (0,1), ..., (n-2,n-1),
#: (n-1,); "sliding" = (0,1), (1,2), ..., (n-2,n-1).
CR_SCHEDULES = ("authors", "sliding")
SPARSITY_PROFILES = ("uniform", "owl")
CONFIG_KEY = "pruning_config"

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_nm(pattern: str) -> Optional[tuple[int, int]]:
    """Return (N, M) for an "N:M" pattern, None for "unstructured"; raise ValueError on anything else."""
    if pattern == "unstructured":
        return None
    match = _NM_RE.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(
            f"PruningConfig.pattern={_short_repr(pattern)} is not understood; allowed: 'unstructured' or 'N:M' with "
            "integers 0 < N < M, e.g. '2:4' or '4:8'."
        )
    try:
        n, m = int(match.group(1)), int(match.group(2))
    except ValueError:  # more digits than int() converts
        raise ValueError(f"PruningConfig.pattern={_short_repr(pattern)} has numbers too large for an N:M pattern; "
                         "allowed: 'unstructured' or 'N:M' such as '2:4'.") from None
    if not 0 < n < m:
        raise ValueError(
            f"PruningConfig.pattern={pattern!r} is impossible: N:M keeps N of every M consecutive weights, "
            "so it needs 0 < N < M (e.g. '2:4')."
        )
    return n, m


def _short_repr(value: Any, limit: int = 200) -> str:
    """repr() for messages: cut to ``limit`` characters, and safe for values repr() fails on (a deeply nested list, an
    int with more digits than Python prints)."""
    try:
        text = repr(value)
    except (ValueError, RecursionError, OverflowError):
        size = f" of {value.bit_length()} bits" if isinstance(value, int) else ""
        text = f"<{type(value).__name__}{size} that cannot be printed>"
    return text if len(text) <= limit else text[:limit] + f"...<{len(text) - limit} more characters>"


def _bad(field_name: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"PruningConfig.{field_name}={_short_repr(value)} is not allowed; allowed: {allowed}.")


def _is_inf(value: Any) -> bool:
    """math.isinf that treats an int too large for a float as infinite instead of raising OverflowError."""
    try:
        return math.isinf(value)
    except OverflowError:
        return True


#: Integer fields hold 64-bit values (sizes, counts, seeds that reach torch); anything larger is refused up front.
_INT_RANGE = (-(2**63), 2**63)


@dataclass
class PruningConfig:
    """How to prune and reconstruct a causal LM.

    Defaults follow Shin et al. (EMNLP 2024) where the paper has a setting: SparseGPT masks with layer-wise (LR),
    block-wise (BR) reconstruction and global propagation (GP), BR trained with Adam, batch 8, 10 epochs, 256
    calibration windows of 1024 tokens from C4 (the paper's Section 3.1), CR windows as in the authors' code.
    Beyond the paper, BR picks each window's learning rate by held-out error (``br_lr="auto"``: the paper's 2e-4
    did worse in every cell of docs/benchmarks.md), keeps each window's epoch of lowest held-out error and stops
    after ``br_patience`` epochs without a new best (``br_keep_best``, ``br_patience``), and self-generation samples
    until EOS with top-k 50 and no language filter (which would need ``langdetect``, the ``selfgen`` extra).

    Sparsity and N:M: ``sparsity`` is the fraction of weights set to zero in every pruned linear layer. Unstructured
    masks zero exactly ``floor(sparsity * in_features)`` weights in every output row (Wanda/SparseGPT compare within a
    row; magnitude also uses rows so that every layer hits the target exactly). An ``"N:M"`` pattern keeps N of every
    M consecutive input weights, which fixes the sparsity at ``1 - N/M``.
    """

    method: str = DEFAULT_METHOD
    sparsity: float = 0.5
    pattern: str = "unstructured"
    reconstruction: list[str] = field(default_factory=lambda: ["lr", "br", "gp"])

    # Calibration data.
    calibration: Union[str, list[str]] = "c4"
    calibration_split: Optional[str] = None
    calibration_text_column: Optional[str] = None
    num_samples: int = 256
    seq_len: int = 1024
    num_self_samples: int = 0
    self_samples_use: str = "reconstruction"
    heldout_fraction: float = 0.125
    heldout_source: Optional[Union[str, list[str]]] = None
    seed: int = 0

    # Self-generated calibration data (used when num_self_samples > 0 or calibration == "self"). Each sample is
    # sampled until EOS or self_gen_max_length tokens (None: seq_len); a seeded random window of seq_len tokens is cut
    # from it, and samples that end sooner are replaced by new ones (self_gen_stop_at_eos=False suppresses EOS
    # instead, so every sample runs to the full length). self_gen_language filters the greedy prefixes with
    # langdetect (the selfgen extra; the paper's "en"); None keeps all. self_gen_batch_size "auto": as many sequences
    # at once as the KV cache lets fit in half the GPU's free memory (32 on the CPU). self_gen_static_cache "auto": a
    # GPU decodes in CUDA graphs where it can (calibration/graphed_decoding.py); True / False: a static / dynamic cache.
    self_gen_greedy_tokens: int = 4
    self_gen_temperature: float = 1.0
    self_gen_top_k: int = 50
    self_gen_top_p: float = 1.0
    self_gen_language: Optional[str] = None
    self_gen_batch_size: Union[int, str] = "auto"
    self_gen_max_length: Optional[int] = None
    self_gen_stop_at_eos: bool = True
    self_gen_static_cache: Union[bool, str] = "auto"
    self_gen_cache_dir: Optional[str] = None

    # Masks and layer-wise reconstruction.
    include_modules: Optional[list[str]] = None
    exclude_modules: Optional[list[str]] = None
    sparsegpt_block_size: int = 128
    sparsegpt_dampening: float = 0.01
    # A model that already has zeros in its linear layers: True keeps them zero (every mask is a subset of the existing
    # non-zeros) and counts them toward the sparsity; False prunes as if they were ordinary weights (and says so).
    keep_existing_zeros: bool = False
    # Mixture-of-experts: an expert routed fewer calibration tokens than this gets its statistics from every token
    # entering its experts module instead (the report names it). None: the expert's input features, the fewest
    # tokens for a full-rank Hessian; 0: never.
    moe_min_tokens: Optional[int] = None
    # Non-uniform sparsity (sparsity_profile.py). "owl": each block's sparsity from its share of outlier Wanda scores
    # (above owl_threshold times the block's mean), within +-owl_lambda of `sparsity` and with `sparsity` as the
    # mean over blocks. sparsity_overrides: {regex on a weight's name inside its block: its sparsity}, the first
    # matching pattern winning (to_dict keeps that order as [[pattern, sparsity], ...]).
    sparsity_profile: str = "uniform"
    owl_threshold: float = 5.0
    owl_lambda: float = 0.08
    sparsity_overrides: Optional[dict[str, float]] = None

    # Block-wise reconstruction.
    # br_lr: a number, or "auto" (each window picks 2e-4, 5e-4, 1e-3 or 2e-3 by held-out error, at most 1.5x the time;
    # without held-out rows, 1e-3). br_keep_best: end each window with its epoch of lowest held-out error, reverting to
    # the weights before BR when no epoch beats them; br_patience: stop after this many epochs without a new best
    # (None: every epoch). All three need held-out rows (heldout_fraction > 0). cr_schedule: see CR_SCHEDULES.
    reconstruction_mode: str = "full"
    br_epochs: int = 10
    br_lr: Union[float, str] = "auto"
    br_keep_best: bool = True
    br_patience: Optional[int] = 3
    cr_schedule: str = "authors"
    br_batch_size: int = 8
    br_train_other_params: bool = True
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_target_modules: Optional[list[str]] = None

    # Execution (does not change the result beyond float rounding). track_reconstruction_error carries the dense
    # model's activation stream to report the paper's per-block error (one more block forward per block; GP needs
    # that stream anyway).
    #
    # stream_location: "device", "cpu" (pinned when the device is a GPU), "disk" (a memory-mapped file in
    # stream_folder, or the system's temporary folder) or "auto" (the device when the memory estimate says the streams
    # fit next to one window, otherwise the CPU). stream_folder also receives the pruned weights of disk-offloaded
    # blocks whose accelerate loader has no offload folder of its own. max_device_memory ("16GiB", "500MB" or bytes)
    # is what the run may hold on the execution device, model weights resident there included; None: the device's free
    # memory at the start (no check on the CPU). data_parallel "auto" shards the calibration rows over the processes of
    # an initialised torch.distributed group (or one that `accelerate launch` / torchrun describe in the environment).
    # compile_blocks: torch.compile the window's forward/backward in BR (the first window pays the compilation, tens
    # of seconds; later windows of the same block class reuse it). "auto": on CUDA, windows of at least 50 M
    # parameters compile, smaller ones replay their step from CUDA graphs (reconstruction/execution.py; both measured).
    # A compilation or capture that fails is reported and BR carries on eagerly; False: always eager.
    device: Optional[str] = None
    stream_location: str = "auto"
    stream_dtype: Optional[str] = None
    stream_folder: Optional[str] = None
    max_device_memory: Optional[Union[str, int]] = None
    autocast_dtype: str = "auto"
    compile_blocks: Union[bool, str] = "auto"
    forward_batch_size: int = 8
    track_reconstruction_error: bool = True
    data_parallel: str = "auto"
    # checkpoint_dir: after every finalised block, a checkpoint (weights and masks of the blocks done and the weights
    # they had when taken, RNG state, the report so far; a resume recomputes the streams from them) is written there,
    # so that Pruner.prune(resume=True) / --resume continues an interrupted run with the same result. None: none.
    checkpoint_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.reconstruction, str):
            self.reconstruction = [self.reconstruction]
        if isinstance(self.sparsity_overrides, list):  # how to_dict writes them: [[pattern, sparsity], ...]
            self.sparsity_overrides = _overrides_from_pairs(self.sparsity_overrides)
        self.validate()

    def __eq__(self, other: object) -> bool:
        # to_dict, not the dataclass' field tuple: the order of sparsity_overrides matters (the first match wins),
        # and dicts compare equal in any order
        if not isinstance(other, PruningConfig):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # mutable, like the dataclass it replaces

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ValueError (or TypeError for a wrong type) naming the field, the bad value and what is allowed."""
        self._check_types()
        criterion = get_criterion(self.method)
        if not (0.0 <= self.sparsity < 1.0) or math.isnan(self.sparsity):
            raise _bad("sparsity", self.sparsity, "a fraction in [0, 1)")
        nm = parse_nm(self.pattern)
        if nm is not None:
            n, m = nm
            implied = 1.0 - n / m
            if not math.isclose(self.sparsity, implied, abs_tol=1e-9):
                raise ValueError(
                    f"PruningConfig.sparsity={self.sparsity!r} does not match pattern={self.pattern!r}: an N:M "
                    f"pattern fixes the sparsity at 1 - N/M = {implied:g}; set sparsity={implied:g} or change the pattern."
                )
        unknown = [r for r in self.reconstruction if r not in RECONSTRUCTIONS]
        if unknown:
            raise _bad("reconstruction", self.reconstruction, f"a subset of {list(RECONSTRUCTIONS)}")
        if len(set(self.reconstruction)) != len(self.reconstruction):
            raise _bad("reconstruction", self.reconstruction, "each technique at most once")
        if ("gp" in self.reconstruction or "cr" in self.reconstruction) and "br" not in self.reconstruction:
            raise _bad("reconstruction", self.reconstruction, "'gp' and 'cr' only together with 'br' (they change BR's target and window)")
        for name in ("num_samples", "seq_len", "br_epochs", "br_batch_size", "forward_batch_size",
                     "sparsegpt_block_size", "lora_rank"):
            value = getattr(self, name)
            if value <= 0:
                raise _bad(name, value, "an integer > 0")
        self._validate_quality_controls()
        criterion.validate(self)
        for name in ("num_self_samples", "self_gen_greedy_tokens", "self_gen_top_k"):
            value = getattr(self, name)
            if value < 0:
                raise _bad(name, value, "an integer >= 0")
        if self.moe_min_tokens is not None and (isinstance(self.moe_min_tokens, bool)
                                                or not isinstance(self.moe_min_tokens, int) or self.moe_min_tokens < 0):
            raise _bad("moe_min_tokens", self.moe_min_tokens, "None (the expert's input features) or an integer >= 0")
        self._validate_sparsity_profile()
        if not (0.0 <= self.heldout_fraction < 1.0) or math.isnan(self.heldout_fraction):
            raise _bad("heldout_fraction", self.heldout_fraction, "a fraction in [0, 1)")
        if self.self_samples_use not in SELF_SAMPLE_USES:
            raise _bad("self_samples_use", self.self_samples_use, ", ".join(map(repr, SELF_SAMPLE_USES)))
        if self.reconstruction_mode not in RECONSTRUCTION_MODES:
            raise _bad("reconstruction_mode", self.reconstruction_mode, ", ".join(map(repr, RECONSTRUCTION_MODES)))
        if self.device is not None and not _DEVICE_RE.match(self.device):
            raise _bad("device", self.device, "None (a GPU when there is one, else the CPU), 'cpu', 'cuda', 'cuda:N' "
                       "or another torch device such as 'mps' or 'xpu:0'")
        if self.stream_location not in STREAM_LOCATIONS:
            raise _bad("stream_location", self.stream_location, ", ".join(map(repr, STREAM_LOCATIONS)))
        if self.stream_folder is not None and not self.stream_folder.strip():
            raise _bad("stream_folder", self.stream_folder, "None (the system's temporary folder) or a folder path")
        if self.checkpoint_dir is not None and not self.checkpoint_dir.strip():
            raise _bad("checkpoint_dir", self.checkpoint_dir, "None (no checkpoints) or a folder path")
        if self.max_device_memory is not None:
            parse_memory_size(self.max_device_memory)
        if self.data_parallel not in DATA_PARALLEL_MODES:
            raise _bad("data_parallel", self.data_parallel, ", ".join(map(repr, DATA_PARALLEL_MODES)))
        if self.compile_blocks not in (True, False, "auto"):
            raise _bad("compile_blocks", self.compile_blocks, "True, False or 'auto' (on CUDA: compile windows of >= 50 M parameters, CUDA graphs below)")
        if self.autocast_dtype not in AUTOCAST_DTYPES:
            raise _bad("autocast_dtype", self.autocast_dtype, ", ".join(map(repr, AUTOCAST_DTYPES)))
        if self.stream_dtype is not None and self.stream_dtype not in AUTOCAST_DTYPES[1:]:
            raise _bad("stream_dtype", self.stream_dtype, "None (the model's dtype) or " + ", ".join(map(repr, AUTOCAST_DTYPES[1:])))
        if not self.self_gen_temperature >= 0 or _is_inf(self.self_gen_temperature):
            raise _bad("self_gen_temperature", self.self_gen_temperature, "a finite number >= 0 (0 = greedy)")
        for name in ("sparsegpt_dampening", "lora_alpha"):
            value = getattr(self, name)
            if not value > 0 or _is_inf(value):
                raise _bad(name, value, "a finite number > 0")
        if not 0.0 < self.self_gen_top_p <= 1.0:
            raise _bad("self_gen_top_p", self.self_gen_top_p, "a number in (0, 1]")
        if isinstance(self.calibration, list) and not self.calibration:
            raise _bad("calibration", self.calibration, "a non-empty list of texts, a dataset name, a path or 'self'")
        if isinstance(self.calibration, str) and not self.calibration.strip():
            raise _bad("calibration", self.calibration, "a non-empty dataset name, path, 'default' or 'self'")
        for name in ("include_modules", "exclude_modules", "lora_target_modules"):
            for pattern in getattr(self, name) or []:
                try:
                    re.compile(pattern)
                except (re.error, OverflowError, RecursionError, ValueError) as err:
                    raise _bad(name, pattern, f"regular expressions over module names ({err})") from None

    def _validate_sparsity_profile(self) -> None:
        if self.sparsity_profile not in SPARSITY_PROFILES:
            raise _bad("sparsity_profile", self.sparsity_profile, ", ".join(map(repr, SPARSITY_PROFILES)))
        non_uniform = self.sparsity_profile != "uniform" or self.sparsity_overrides
        if non_uniform and self.nm is not None:
            raise _bad("sparsity_profile" if self.sparsity_profile != "uniform" else "sparsity_overrides",
                       self.sparsity_profile if self.sparsity_profile != "uniform" else self.sparsity_overrides,
                       f"'uniform' with no overrides for pattern={self.pattern!r} (an N:M pattern fixes the sparsity)")
        if not self.owl_threshold > 0 or _is_inf(self.owl_threshold):
            raise _bad("owl_threshold", self.owl_threshold, "a finite number > 0 (OWL's M, 5 in the paper)")
        bound = min(self.sparsity, 1.0 - self.sparsity) if self.sparsity_profile == "owl" else 1.0
        if not 0.0 <= self.owl_lambda <= bound:
            raise _bad("owl_lambda", self.owl_lambda, f"a number in [0, {bound:g}] (min(sparsity, 1 - sparsity), so "
                       "that every block's sparsity stays in [0, 1])")
        for pattern, value in (self.sparsity_overrides or {}).items():
            try:
                re.compile(pattern)
            except (re.error, OverflowError, RecursionError, ValueError) as err:
                raise _bad("sparsity_overrides", pattern, f"regular expressions over weight names ({err})") from None
            if not 0.0 <= value < 1.0 or math.isnan(value):
                raise _bad("sparsity_overrides", {pattern: value}, "sparsities in [0, 1)")

    def _validate_quality_controls(self) -> None:
        """br_lr ("auto"), br_patience, cr_schedule and the self-generation fields of issue 19."""
        if isinstance(self.br_lr, str):
            if self.br_lr != "auto":
                raise _bad("br_lr", self.br_lr, "a finite number > 0, or 'auto' (chosen per window by held-out error)")
        elif not self.br_lr > 0 or _is_inf(self.br_lr):
            raise _bad("br_lr", self.br_lr, "a finite number > 0, or 'auto' (chosen per window by held-out error)")
        if self.br_patience is not None and self.br_patience < 1:
            raise _bad("br_patience", self.br_patience, "None (train every epoch) or an integer >= 1")
        if self.cr_schedule not in CR_SCHEDULES:
            raise _bad("cr_schedule", self.cr_schedule, ", ".join(map(repr, CR_SCHEDULES)))
        if isinstance(self.self_gen_batch_size, str) and self.self_gen_batch_size != "auto" or (
                not isinstance(self.self_gen_batch_size, str) and self.self_gen_batch_size <= 0):
            raise _bad("self_gen_batch_size", self.self_gen_batch_size,
                       "an integer > 0, or 'auto' (from the GPU's free memory; 32 on the CPU)")
        if self.self_gen_static_cache not in (True, False, "auto"):
            raise _bad("self_gen_static_cache", self.self_gen_static_cache, "True, False or 'auto' (CUDA graphs on a GPU)")
        if self.self_gen_max_length is not None and self.self_gen_max_length < self.seq_len:
            raise _bad("self_gen_max_length", self.self_gen_max_length,
                       f"None (= seq_len) or an integer >= seq_len ({self.seq_len})")

    def _check_types(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _matches(value, f.type):
                raise TypeError(f"PruningConfig.{f.name}={_short_repr(value)} has type {type(value).__name__}; "
                                f"expected {f.type}.")
            is_int = isinstance(value, int) and not isinstance(value, bool) and "int" in str(f.type)
            if is_int and not _INT_RANGE[0] <= value < _INT_RANGE[1]:
                raise _bad(f.name, value, "a 64-bit integer (between -2**63 and 2**63 - 1)")

    # ------------------------------------------------------------------ derived
    @property
    def nm(self) -> Optional[tuple[int, int]]:
        return parse_nm(self.pattern)

    def uses(self, technique: str) -> bool:
        return technique in self.reconstruction

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data. ``sparsity_overrides`` become ``[[pattern, sparsity], ...]``: their order decides
        (the first matching pattern wins), and JSON writers that sort keys (``to_json_string``, transformers'
        ``config.json``) would reorder a dict."""
        data = dataclasses.asdict(self)
        if self.sparsity_overrides is not None:
            data["sparsity_overrides"] = [[pattern, value] for pattern, value in self.sparsity_overrides.items()]
        data["hf_recon_prune_version"] = __version__
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], **overrides: Any) -> "PruningConfig":
        """Build a config from plain data. Unknown keys are reported in a warning and dropped, never evaluated.

        Any input yields a PruningConfig or raises TypeError (a wrong type) / ValueError (a bad value), both naming
        the field. Values are data only: no field is imported, opened, or used as a format string here (the
        calibration source, a dataset name or file path, is read only when pruning starts).
        """
        if not isinstance(data, dict):
            raise TypeError(f"PruningConfig.from_dict expects a dict, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {}
        ignored = []
        for key, value in {**data, **overrides}.items():
            if not isinstance(key, str):
                raise TypeError(f"PruningConfig keys must be strings, got {_short_repr(key)}.")
            if key in known:
                # Valid values are scalars or lists of strings: a shallow copy is a full one (and a deeply nested
                # invalid value cannot exhaust the recursion limit here; the type check rejects it).
                values[key] = list(value) if isinstance(value, list) else value
            elif key != "hf_recon_prune_version":
                ignored.append(key)
        if ignored:
            logger.warning("PruningConfig: ignoring unknown keys %s (they are not used).",
                           _short_repr(sorted(ignored), 500))
        return cls(**values)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: Union[str, os.PathLike]) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(self.to_json_string())

    @classmethod
    def from_json_file(cls, path: Union[str, os.PathLike]) -> "PruningConfig":
        data = _read_json(path)
        if isinstance(data, dict) and CONFIG_KEY in data:
            data = data[CONFIG_KEY]
        return cls.from_dict(data)

    @classmethod
    def from_pretrained(cls, path_or_repo: Union[str, os.PathLike], **hub_kwargs: Any) -> "PruningConfig":
        """Read the config stored under ``"pruning_config"`` in a saved model's config.json (local folder or Hub repo)."""
        path = os.fspath(path_or_repo)
        if os.path.isdir(path):
            config_file = os.path.join(path, "config.json")
        elif os.path.isfile(path):
            config_file = path
        else:
            from huggingface_hub import hf_hub_download

            config_file = hf_hub_download(path, "config.json", **hub_kwargs)
        data = _read_json(config_file)
        if not isinstance(data, dict) or CONFIG_KEY not in data:
            raise ValueError(f"{path}: config.json has no {CONFIG_KEY!r} entry; was this model pruned by hf-recon-prune?")
        return cls.from_dict(data[CONFIG_KEY])

    def __repr__(self) -> str:
        changed = {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        }
        inner = ", ".join(f"{k}={v!r}" for k, v in changed.items())
        return f"PruningConfig({inner})"


def _overrides_from_pairs(pairs: list) -> dict[str, float]:
    """``[[pattern, sparsity], ...]`` (``to_dict``'s form of ``sparsity_overrides``) -> the dict, in order."""
    overrides: dict[str, float] = {}
    for pair in pairs:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise TypeError(f"PruningConfig.sparsity_overrides={_short_repr(pairs)} has an item {_short_repr(pair)}; "
                            "expected {pattern: sparsity} or [[pattern, sparsity], ...] with string patterns.")
        if pair[0] in overrides:
            raise _bad("sparsity_overrides", pairs, f"each pattern once (pattern {pair[0]!r} is given twice)")
        overrides[pair[0]] = pair[1]
    return overrides


#: Device strings torch accepts (whether the device exists is checked when pruning starts: preflight).
_DEVICE_RE = re.compile(r"^(cpu|cuda|mps|xpu|npu|hpu|mtia)(:\d+)?$")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_memory_size(value: Union[str, int]) -> int:
    """Bytes in ``"16GiB"`` / ``"500MB"`` / an int: GB and MB are decimal, GiB and MiB binary, as in accelerate's
    ``max_memory``. Raises ValueError naming ``max_device_memory`` for anything else."""
    allowed = "a positive number of bytes or a size such as '16GiB' or '500MB'"
    if isinstance(value, bool):
        raise _bad("max_device_memory", value, allowed)
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE_RE.match(value) if isinstance(value, str) else None
        if match is None:
            raise _bad("max_device_memory", value, allowed)
        try:
            size = int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "B").upper()])
        except (OverflowError, ValueError):  # more bytes than a float holds
            raise _bad("max_device_memory", value, allowed) from None
    if size <= 0:
        raise _bad("max_device_memory", value, allowed)
    return size


def _read_json(path: Union[str, os.PathLike]) -> Any:
    """json.load, with nesting too deep to parse reported as ValueError (JSONDecodeError, bad UTF-8 already are)."""
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except RecursionError:
            raise ValueError(f"{os.fspath(path)}: the JSON is nested too deeply to be a configuration") from None


def _matches(value: Any, annotation: Any) -> bool:
    """A small runtime check of the annotations used above (strings under `from __future__ import annotations`)."""
    spec = str(annotation).replace(" ", "")
    if value is None:
        return spec.startswith("Optional[")
    if spec.startswith("Optional["):
        spec = spec[len("Optional["):-1]
    options = spec[len("Union["):-1].split(",", 1) if spec.startswith("Union[") else [spec]
    options = [o.strip() for o in options]
    for option in options:
        if option == "str" and isinstance(value, str):
            return True
        if option == "bool" and isinstance(value, bool):
            return True
        if option == "int" and isinstance(value, int) and not isinstance(value, bool):
            return True
        if option == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if option == "list[str]" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return True
        if option == "dict[str,float]" and isinstance(value, dict) and all(
                isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in value.items()):
            return True
    return False
