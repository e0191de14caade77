"""The commands prune, eval, generate-calibration, push and info: parsed arguments in, an exit code out.

Heavy imports (torch, transformers, the engine) happen inside the commands, so that ``--help`` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional

from ..config import CONFIG_KEY, PruningConfig
from .arguments import _config_from_args, _flag
from .errors import EXIT_OK, UsageError, push_token
from .summary import _describe_config, summary_table

DEFAULT_MODEL_LABEL = "SmolLM2-135M-Instruct (offline default)"


def _status(message: str) -> None:
    # Status lines go to stderr with the progress bars, so stdout holds only results (eval's JSON).
    print(message, file=sys.stderr, flush=True)


def _looks_like_path(name: str) -> bool:
    return os.path.isabs(name) or name.startswith((".", "~")) or os.sep in name and os.path.exists(name.split(os.sep)[0])


def _load(args):
    from ..models import load_model

    if args.model and _looks_like_path(args.model) and not os.path.isdir(os.path.expanduser(args.model)):
        raise UsageError(f"--model {args.model}: no such folder (working directory: {os.getcwd()}); give a saved "
                         "model folder or a Hub id such as meta-llama/Llama-2-7b-hf")
    _status(f"loading {args.model or DEFAULT_MODEL_LABEL} ...")
    model_id = os.path.expanduser(args.model) if args.model else None
    return load_model(model_id, dtype=args.dtype, trust_remote_code=args.trust_remote_code)


def _perplexity(model, tokenizer, args) -> float:
    from ..evaluation import perplexity

    return perplexity(model, tokenizer, source=args.eval_source, split=args.eval_split, seq_len=args.eval_seq_len,
                      batch_size=args.eval_batch_size, max_windows=args.eval_windows, show_progress=True)


def _check_eval_flags(args) -> None:
    for name in ("eval_seq_len", "eval_batch_size", "eval_windows"):
        value = getattr(args, name, None)
        if value is not None and value < (2 if name == "eval_seq_len" else 1):
            raise UsageError(f"{_flag(name)} {value}: must be at least {2 if name == 'eval_seq_len' else 1}")


def _check_output_folder(path: str, model: Optional[str] = None, overwrite: bool = False) -> None:
    """Refuse before any work what saving would refuse at the end: a file, a folder that is not a saved model, the
    model's own folder or a model folder hf-recon-prune did not save (the last two only without --overwrite)."""
    from types import SimpleNamespace

    from ..hub.save import check_save_target

    source = os.path.expanduser(model) if model and os.path.isdir(os.path.expanduser(model)) else ""
    try:
        check_save_target(path, SimpleNamespace(config=SimpleNamespace(_name_or_path=source)), overwrite=overwrite)
    except FileExistsError as error:
        message = str(error).replace("overwrite=True (--overwrite)", "--overwrite")
        message = message.replace("save_directory", "--output")
        raise UsageError(f"--output {path}: {message}") from None


def _cmd_prune(args) -> int:
    config = _config_from_args(args)
    if args.print_config:
        print(config.to_json_string(), end="")
        return EXIT_OK
    _check_eval_flags(args)
    _check_output_folder(args.output, args.model, args.overwrite)
    if args.resume and not config.checkpoint_dir:
        raise UsageError("--resume needs --checkpoint-dir DIR: the folder the interrupted run wrote its checkpoints to")
    from ..pruner import Pruner

    started = time.perf_counter()
    model, tokenizer = _load(args)
    results: dict[str, Any] = {}
    eval_seconds = 0.0
    if not args.no_eval:
        _status(f"perplexity of the dense model on {args.eval_source!r} ({args.eval_split}) ...")
        t0 = time.perf_counter()
        results["dense"] = _perplexity(model, tokenizer, args)
        eval_seconds += time.perf_counter() - t0
        _status(f"dense perplexity: {results['dense']:.3f}")
    _status(f"pruning: {_describe_config(config)}")
    pruner = Pruner(model, config, tokenizer=tokenizer)
    report = pruner.prune(resume=args.resume, overwrite=args.overwrite)
    if not args.no_eval:
        _status("perplexity of the pruned model ...")
        t0 = time.perf_counter()
        results["pruned"] = _perplexity(model, tokenizer, args)
        eval_seconds += time.perf_counter() - t0
        pruner.record_perplexity(args.eval_source, args.eval_split, args.eval_seq_len, results["dense"],
                                 results["pruned"])
    path = pruner.save_pretrained(args.output, overwrite=args.overwrite, base_model=args.base_model,
                                  license=args.license, repo_id=args.repo_id)
    timings = {"pruning": report.total_seconds, "evaluation": eval_seconds,
               "total": time.perf_counter() - started}
    print()
    print(summary_table(report, results, timings, model=args.model or DEFAULT_MODEL_LABEL, config=config,
                        eval_label=f"{args.eval_source} ({args.eval_split}, seq_len {args.eval_seq_len})"))
    print(f"\nsaved the pruned model with its model card to {os.path.abspath(path)}")
    return EXIT_OK


def _cmd_eval(args) -> int:
    _check_eval_flags(args)
    tasks = _zero_shot_args(args)
    if args.no_perplexity and not tasks:
        raise UsageError("--no-perplexity without --tasks leaves nothing to measure")
    from ..evaluation import compare, evaluate
    from ..report import PruneReport

    manager = None
    if tasks:
        from ..zero_shot import get_task_manager, require_lm_eval

        try:
            require_lm_eval()
        except ImportError as error:  # before loading a model that could not be evaluated
            raise RuntimeError(str(error)) from error
        _status("indexing lm-evaluation-harness tasks ...")
        manager = get_task_manager(args.include_path, include_defaults=not args.no_default_tasks)
    compared = {_compare_label(path): path for path in args.compare or []}
    report = None
    report_file = os.path.join(os.path.expanduser(args.model), "prune_report.json") if args.model else ""
    if report_file and os.path.isfile(report_file):
        with open(report_file, encoding="utf-8") as handle:
            report = PruneReport.from_dict(json.load(handle))

    model, tokenizer = _load(args)
    label = args.model or "smollm2"
    results = evaluate(
        model, tokenizer, perplexity=None if args.no_perplexity else {args.eval_source: args.eval_source},
        split=args.eval_split, seq_len=args.eval_seq_len, batch_size=args.eval_batch_size,
        max_windows=args.eval_windows, zero_shot=tasks, num_fewshot=args.num_fewshot,
        zero_shot_batch_size=args.zero_shot_batch_size, zero_shot_metric=args.zero_shot_metric, limit=args.limit,
        task_manager=manager, report=report, model_name=label, show_progress=True,
    )
    result: dict[str, Any] = {"model": label, "sparsity": None if results.sparsity is None else round(results.sparsity, 6)}
    if not args.no_perplexity:
        entry = results.perplexity[args.eval_source]
        result["perplexity"] = {"dataset": args.eval_source, "split": entry["split"], "seq_len": entry["seq_len"],
                                "windows": entry["windows"], "value": entry["value"]}
    if results.zero_shot is not None:
        result["zero_shot_mean"] = results.zero_shot.mean
    if results.reconstruction is not None:
        result["reconstruction"] = results.reconstruction
    result["results"] = results.to_dict()
    table = None
    if compared or args.markdown:
        table = compare({**{os.path.basename(label.rstrip("/")) or label: results}, **compared})
        if compared:
            result["comparison"] = table.to_dict()
    print(json.dumps(result, indent=2))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    if args.markdown:
        text = table.to_markdown()
        if results.zero_shot is not None and not compared:
            text += "\n\n" + results.zero_shot.to_markdown()
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(text + "\n")
    return EXIT_OK


def _zero_shot_args(args) -> Optional[list]:
    if not args.tasks:
        return None
    from ..zero_shot import PAPER_TASKS

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    tasks = [name for t in tasks for name in (PAPER_TASKS if t == "paper" else [t])]
    if not tasks:
        raise UsageError("--tasks: give task names, e.g. --tasks paper or --tasks arc_easy,boolq")
    if args.num_fewshot < 0:
        raise UsageError(f"--num-fewshot {args.num_fewshot}: must be at least 0")
    if args.limit is not None:
        if args.limit <= 0:
            raise UsageError(f"--limit {args.limit:g}: must be above 0")
        args.limit = int(args.limit) if args.limit >= 1 and args.limit == int(args.limit) else args.limit
    size = args.zero_shot_batch_size
    if not (size == "auto" or size.startswith("auto:") or (size.isdigit() and int(size) > 0)):
        raise UsageError(f"--zero-shot-batch-size {size}: give a number above 0 or 'auto'")
    args.zero_shot_batch_size = int(size) if size.isdigit() else size
    for path in args.include_path or []:
        if not os.path.isdir(path):
            raise UsageError(f"--include-path {path}: no such folder")
    return list(dict.fromkeys(tasks))


def _compare_label(path: str) -> str:
    path = os.path.expanduser(path)
    if not os.path.exists(path):
        raise UsageError(f"--compare {path}: no such file or folder")
    name = os.path.basename(path.rstrip("/\\"))
    if name in ("prune_report.json",):
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))
    return name[:-5] if name.endswith(".json") else name


def _cmd_generate(args) -> int:
    from ..calibration import generate_self_calibration, save_texts_jsonl

    for name in ("num_samples", "seq_len", "batch_size"):
        value = getattr(args, name)
        if isinstance(value, str) and value != "auto" or not isinstance(value, str) and value < 1:
            raise UsageError(f"{_flag(name)} {value}: must be at least 1" + (" or auto" if name == "batch_size" else ""))
    if args.max_length is not None and args.max_length < args.seq_len:
        raise UsageError(f"--max-length {args.max_length}: must be at least --seq-len ({args.seq_len})")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise UsageError(f"--output {args.output}: the folder {folder} does not exist")
    model, tokenizer = _load(args)
    data = generate_self_calibration(
        model, tokenizer, args.num_samples, args.seq_len, seed=args.seed, greedy_tokens=args.greedy_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        language=None if args.language.lower() == "none" else args.language, batch_size=args.batch_size,
        max_length=args.max_length, stop_at_eos=args.stop_at_eos, cache_dir=args.cache_dir,
    )
    save_texts_jsonl(data, args.output)
    origin = " (read from the cache)" if data.from_cache else ""
    print(f"wrote {len(data.texts)} self-generated samples of {args.seq_len} tokens to {os.path.abspath(args.output)}"
          f"{origin}\nuse them with: hf-recon-prune prune --calibration {args.output} ...")
    return EXIT_OK


def _cmd_push(args) -> int:
    from huggingface_hub import constants

    from ..hub import push_folder_to_hub

    if not os.path.isdir(args.folder):
        raise UsageError(f"{args.folder} is not a folder; give the folder written by `hf-recon-prune prune --output`")
    if not os.path.isfile(os.path.join(args.folder, "config.json")):
        raise UsageError(f"{args.folder} holds no config.json: it is not a saved model folder")
    if constants.HF_HUB_OFFLINE:
        raise UsageError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it (e.g. HF_HUB_OFFLINE=0 "
                         f"hf-recon-prune push {args.folder} {args.repo_id})")
    token = push_token(args)
    url = push_folder_to_hub(args.folder, args.repo_id, private=args.private or None, token=token,
                             commit_message=args.commit_message, revision=args.revision, create_pr=args.create_pr)
    print(f"pushed {os.path.abspath(args.folder)} to {url}")
    return EXIT_OK


def _cmd_info(args) -> int:
    config_file = os.path.join(args.folder, "config.json")
    if not os.path.isfile(config_file):
        raise UsageError(f"{args.folder} holds no config.json: it is not a saved model folder")
    with open(config_file, encoding="utf-8") as handle:
        stored = json.load(handle)
    if CONFIG_KEY not in stored:
        raise UsageError(f"{config_file} has no {CONFIG_KEY!r}: this model was not pruned by hf-recon-prune")
    config = PruningConfig.from_dict(stored[CONFIG_KEY])
    print(f"{os.path.abspath(args.folder)}: {stored.get('model_type', '?')} model")
    print(f"pruning: {_describe_config(config)}")
    print(f"config: {config!r}")
    report_file = os.path.join(args.folder, "prune_report.json")
    if os.path.isfile(report_file):
        from ..report import PruneReport

        with open(report_file, encoding="utf-8") as handle:
            print(PruneReport.from_dict(json.load(handle)).summary())
    return EXIT_OK


COMMANDS = {"prune": _cmd_prune, "eval": _cmd_eval, "generate-calibration": _cmd_generate, "push": _cmd_push,
            "info": _cmd_info}
