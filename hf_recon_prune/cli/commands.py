"""The commands prune, eval, generate-calibration, push and info: parsed arguments in, an exit code out.

Heavy imports (torch, transformers, the engine) happen inside the commands, so that ``--help`` stays fast.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from typing import Any, Callable, Optional

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


def _perplexity(model, tokenizer, args) -> tuple[float, int]:
    """The perplexity on --eval-source and how many windows were scored (``evaluate``'s protocol, as ``eval``)."""
    from ..evaluation import evaluate

    with _on_eval_device(model, args):
        results = evaluate(model, tokenizer, perplexity={args.eval_source: args.eval_source}, split=args.eval_split,
                           seq_len=args.eval_seq_len, batch_size=args.eval_batch_size, max_windows=args.eval_windows,
                           measure_sparsity=False, show_progress=True)
    entry = results.perplexity[args.eval_source]
    return entry["value"], int(entry["windows"])


@contextlib.contextmanager
def _on_eval_device(model, args, flag: str = "--eval-device", seq_len: Optional[int] = None):
    """The model on the device ``flag`` asks for (a GPU when it fits, by default) for what runs inside, back on the
    CPU afterwards; a status line says where and why."""
    import torch

    from ..evaluation import evaluation_device, evaluation_working_bytes, placed_for_evaluation

    requested = getattr(args, flag.lstrip("-").replace("-", "_"))
    if requested == "auto" and not torch.cuda.is_available():  # nothing to choose: it runs where the model is
        yield None
        return
    working = evaluation_working_bytes(model, getattr(args, "eval_batch_size", 1),
                                       seq_len or getattr(args, "eval_seq_len", 1))
    try:
        evaluation_device(model, requested, working_bytes=working)
    except ValueError as error:
        raise UsageError(f"{flag} {requested}: {error}") from None
    with placed_for_evaluation(model, requested, working_bytes=working) as (where, why):
        _status(f"running on {where} ({why})")
        yield where


def _limited_windows(args, scored: int) -> Optional[int]:
    """The windows scored when --eval-windows cut the split short; None when every window was scored (fewer than
    the limit: the split, or a preset's standard protocol, had no more)."""
    return scored if args.eval_windows is not None and scored >= args.eval_windows else None


def _eval_label(args, windows: Optional[int]) -> str:
    first = "" if windows is None else ", first window" if windows == 1 else f", first {windows} windows"
    return f"{args.eval_source} ({args.eval_split}, seq_len {args.eval_seq_len}{first})"


def _check_eval_flags(args) -> None:
    for name in ("eval_seq_len", "eval_batch_size", "eval_windows"):
        value = getattr(args, name, None)
        if value is not None and value < (2 if name == "eval_seq_len" else 1):
            raise UsageError(f"{_flag(name)} {value}: must be at least {2 if name == 'eval_seq_len' else 1}")


#: The run's own folders (config fields) that --output must stay apart from, and what they hold.
_RUN_FOLDERS = {"checkpoint_dir": "the checkpoints", "stream_folder": "the disk-backed streams",
                "self_gen_cache_dir": "the cache of self-generated samples"}


def _in_flag_names(message: str) -> str:
    """A save error's message with the CLI's names for the API's arguments."""
    return message.replace("overwrite=True (--overwrite)", "--overwrite").replace("save_directory", "--output")


def _check_output_folder(path: str, model: Optional[str] = None, overwrite: bool = False,
                         config: Optional[PruningConfig] = None) -> None:
    """Refuse before any work what saving would refuse at the end: a file, a folder that is not a saved model, the
    model's own folder or a model folder hf-recon-prune did not save (the last two only without --overwrite), and
    a folder that is, holds or lies inside one of the run's own folders (--checkpoint-dir, --stream-folder,
    --self-gen-cache-dir)."""
    from types import SimpleNamespace

    from ..hub.save import check_save_target

    if config is not None:
        _check_output_apart(path, config)
    source = os.path.expanduser(model) if model and os.path.isdir(os.path.expanduser(model)) else ""
    try:
        check_save_target(path, SimpleNamespace(config=SimpleNamespace(_name_or_path=source)), overwrite=overwrite)
    except FileExistsError as error:
        raise UsageError(f"--output {path}: {_in_flag_names(str(error))}") from None


def _check_output_apart(path: str, config: PruningConfig) -> None:
    output = os.path.realpath(os.path.expanduser(path))
    for name, holds in _RUN_FOLDERS.items():
        value = getattr(config, name, None)
        if not value:
            continue
        folder = os.path.realpath(os.path.expanduser(value))
        if folder == output:
            why = "they are the same folder"
        elif os.path.commonpath([output, folder]) == folder:
            why = f"--output lies inside {_flag(name)}"
        elif os.path.commonpath([output, folder]) == output:
            why = f"{_flag(name)} lies inside --output"
        else:
            continue
        raise UsageError(f"--output {path} and {_flag(name)} {value}: {why}. Saving replaces the whole --output "
                         f"folder (and refuses one that holds anything but a saved model), so the saved model and "
                         f"{holds} must not share a folder: give them separate folders, neither inside the other")


def _cmd_prune(args) -> int:
    config = _config_from_args(args)
    if args.print_config:
        print(config.to_json_string(), end="")
        return EXIT_OK
    _check_eval_flags(args)
    _check_output_folder(args.output, args.model, args.overwrite, config)
    if args.resume and not config.checkpoint_dir:
        raise UsageError("--resume needs --checkpoint-dir DIR: the folder the interrupted run wrote its checkpoints to")
    from ..pruner import Pruner

    started = time.perf_counter()
    model, tokenizer = _load(args)
    from ..architectures import resolve_layout
    from ..preflight import preflight

    # what prune() checks first, checked before the dense model's perplexity is measured (minutes on a large model)
    preflight(model, resolve_layout(model), config, resume=args.resume)
    if not args.no_eval:
        _check_window_length(model, "--eval-seq-len", args.eval_seq_len)
    results: dict[str, Any] = {}
    eval_seconds = 0.0
    windows = None
    if not args.no_eval:
        _status(f"perplexity of the dense model on {args.eval_source!r} ({args.eval_split}) ...")
        t0 = time.perf_counter()
        results["dense"], _ = _perplexity(model, tokenizer, args)
        eval_seconds += time.perf_counter() - t0
        _status(f"dense perplexity: {results['dense']:.3f}")
    calibration = None
    if config.num_self_samples or config.calibration == "self":
        # Self-generation runs where the model is: on the GPU when it fits there (--eval-device), not the CPU.
        from ..calibration import build_calibration_set

        with _on_eval_device(model, args, seq_len=config.self_gen_max_length or config.seq_len):
            calibration = build_calibration_set(config, tokenizer, model)
    _status(f"pruning: {_describe_config(config)}")
    pruner = Pruner(model, config, tokenizer=tokenizer, calibration_data=calibration)
    report = pruner.prune(resume=args.resume, overwrite=args.overwrite)
    # Saved before the pruned model's evaluation, which can take long: an interrupt there loses no pruning.
    path = _save(pruner, args)
    if not args.no_eval:
        _status(f"saved the pruned model to {os.path.abspath(path)}; perplexity of the pruned model ...")
        t0 = time.perf_counter()
        try:
            results["pruned"], scored = _perplexity(model, tokenizer, args)
        except BaseException:
            _status(f"the evaluation did not finish: the pruned model is saved in {os.path.abspath(path)}, its card "
                    "without perplexity (hf-recon-prune eval --model <folder> measures it)")
            raise
        eval_seconds += time.perf_counter() - t0
        windows = _limited_windows(args, scored)
        # the count scored, cut or not, as ``evaluate`` (the eval command) records it: comparable side by side
        pruner.record_perplexity(args.eval_source, args.eval_split, args.eval_seq_len, results["dense"],
                                 results["pruned"], windows=scored)
        _in_flag_terms(lambda: pruner.rewrite_report_and_card(path, **_card_arguments(args)))
    timings = {"pruning": report.total_seconds, "evaluation": eval_seconds,
               "total": time.perf_counter() - started}
    print()
    print(summary_table(report, results, timings, model=args.model or DEFAULT_MODEL_LABEL, config=config,
                        eval_label=_eval_label(args, windows)))
    print(f"\nsaved the pruned model with its model card to {os.path.abspath(path)}")
    return EXIT_OK


def _save(pruner, args) -> str:
    """``save_pretrained`` to --output."""
    return _in_flag_terms(lambda: pruner.save_pretrained(args.output, overwrite=args.overwrite,
                                                         **_card_arguments(args)))


def _card_arguments(args) -> dict[str, Any]:
    return {"base_model": args.base_model, "license": args.license, "repo_id": args.repo_id}


def _in_flag_terms(call: Callable[[], Any]) -> Any:
    """``call()``; an error that names the API's arguments names the flags instead."""
    try:
        return call()
    except Exception as error:
        message = _in_flag_names(str(error))
        renamed = None
        if message != str(error):
            with contextlib.suppress(Exception):  # an exception class that takes other arguments stays as it is
                renamed = type(error)(message)
        if renamed is None:
            raise
        raise renamed from error


def _check_window_length(model, flag: str, length: int) -> None:
    """Windows longer than the model's positions are refused (``prune`` refuses them for calibration too)."""
    from ..preflight import position_limit

    limit = position_limit(model)
    if limit is not None and length > limit:
        raise UsageError(f"{flag} {length}: {type(model).__name__} has max_position_embeddings={limit}, and positions "
                         f"beyond it are extrapolated silently (rotary models) or crash (learned positions); "
                         f"allowed: at most {limit}")


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
        _check_task_names(tasks, manager, args)
    label = args.model or "smollm2"
    # One row per input, in the order given (this model first); colliding names are told apart (_unique_labels).
    inputs = [_labelled_path(label, this_model=True)] + [_labelled_path(path) for path in args.compare or []]
    names = _unique_labels(inputs)
    compared = dict(zip(names[1:], args.compare or []))
    report = None
    report_file = os.path.join(os.path.expanduser(args.model), "prune_report.json") if args.model else ""
    if report_file and os.path.isfile(report_file):
        with open(report_file, encoding="utf-8") as handle:
            report = PruneReport.from_dict(json.load(handle))

    model, tokenizer = _load(args)
    if not args.no_perplexity:
        _check_window_length(model, "--eval-seq-len", args.eval_seq_len)
    with _on_eval_device(model, args):
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
        table = compare({names[0]: results, **compared})
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


def _check_task_names(tasks: list, manager: Any, args) -> None:
    """Refuse, before the model is loaded, a --tasks name the harness's index does not hold (nor a YAML file)."""
    import difflib

    known = getattr(manager, "all_tasks", None)
    if not known:
        return
    known = set(known)
    for name in tasks:
        if name in known or os.path.isfile(os.path.expanduser(name)):
            continue
        close = difflib.get_close_matches(name, sorted(known), n=3)
        guess = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        where = " --include_path " + ":".join(args.include_path) if args.include_path else ""
        indexed = ("only the --include-path tasks were indexed (--no-default-tasks); " if args.no_default_tasks
                   else "")
        raise UsageError(f"--tasks: unknown task {name!r}: not a task, group or tag of lm-evaluation-harness, nor a "
                         f"YAML file{guess} ({indexed}list the names with: lm-eval ls tasks{where})")


def _labelled_path(name: str, this_model: bool = False) -> tuple[str, list[str]]:
    """(row name, the path's components) of an eval input: the evaluated model (a folder or a Hub id) or a --compare
    path (an eval --json file, a saved folder or a prune_report.json, which names its folder)."""
    path = os.path.expanduser(name)
    if not this_model and not os.path.exists(path):
        raise UsageError(f"--compare {name}: no such file or folder")
    local = os.path.exists(path)
    parts = [p for p in re.split(r"[/\\]", os.path.abspath(path) if local else name) if p]
    if parts and parts[-1] == "prune_report.json" and len(parts) > 1:
        parts = parts[:-1]
    if not parts:
        return name, [name]
    last = parts[-1]
    return (last[:-5] if last.endswith(".json") and len(last) > 5 else last), parts


def _unique_labels(inputs: list[tuple[str, list[str]]]) -> list[str]:
    """Row names for the inputs, every one kept: names that collide get the shortest path suffix that tells them
    apart ("a/m", "b/m"), else their file names ("m", "m.json"); what is still the same (the same path twice) is
    numbered ("m", "m (2)")."""
    first = [name for name, _ in inputs]
    names = list(first)

    def suffix(i: int, k: int, exact: bool) -> str:
        parts = inputs[i][1]
        return "/".join(parts[-k:] if exact else parts[-k:-1] + [first[i]])

    for name in dict.fromkeys(first):
        group = [i for i, other in enumerate(first) if other == name]
        if len(group) < 2:
            continue
        longest = max(len(inputs[i][1]) for i in group)
        best = [name] * len(group)
        for exact in (False, True):
            target = len({suffix(i, longest, exact) for i in group})
            if target <= len(set(best)):
                continue
            for k in range(1, longest + 1):
                candidates = [suffix(i, k, exact) for i in group]
                if len(set(candidates)) == target:
                    best = candidates
                    break
        for i, candidate in zip(group, best):
            names[i] = candidate
    taken: set = set()
    for i, name in enumerate(names):
        number, unique = 1, name
        while unique in taken:
            number += 1
            unique = f"{name} ({number})"
        names[i] = unique
        taken.add(unique)
    return names


def _cmd_generate(args) -> int:
    from ..calibration import generate_self_calibration, save_texts_jsonl

    for name in ("num_samples", "seq_len", "batch_size"):
        value = getattr(args, name)
        if isinstance(value, str) and value != "auto" or not isinstance(value, str) and value < 1:
            raise UsageError(f"{_flag(name)} {value}: must be at least 1" + (" or auto" if name == "batch_size" else ""))
    if args.max_length is not None and args.max_length < args.seq_len:
        raise UsageError(f"--max-length {args.max_length}: must be at least --seq-len ({args.seq_len})")
    if args.static_cache not in (True, False, "auto"):
        raise UsageError(f"--self-gen-static-cache {args.static_cache}: give true, false or auto")
    if os.path.isdir(os.path.expanduser(args.output)):
        raise UsageError(f"--output {args.output}: is a folder; give the JSONL file to write, e.g. --output "
                         f"{os.path.join(args.output, 'self.jsonl')}")
    folder = os.path.dirname(os.path.abspath(os.path.expanduser(args.output)))
    if not os.path.isdir(folder):
        raise UsageError(f"--output {args.output}: the folder {folder} does not exist")
    model, tokenizer = _load(args)
    _check_window_length(model, "--max-length" if args.max_length else "--seq-len", args.max_length or args.seq_len)
    with _on_eval_device(model, args, flag="--device", seq_len=args.max_length or args.seq_len):
        data = generate_self_calibration(
            model, tokenizer, args.num_samples, args.seq_len, seed=args.seed, greedy_tokens=args.greedy_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            language=None if args.language.lower() == "none" else args.language, batch_size=args.batch_size,
            max_length=args.max_length, stop_at_eos=args.stop_at_eos, static_cache=args.static_cache,
            cache_dir=args.cache_dir,
        )
    save_texts_jsonl(data, os.path.expanduser(args.output))
    origin = " (read from the cache)" if data.from_cache else ""
    print(f"wrote {len(data.texts)} self-generated samples of {args.seq_len} tokens to {os.path.abspath(args.output)}"
          f"{origin}\nuse them with: hf-recon-prune prune --calibration {args.output} ...")
    return EXIT_OK


def _cmd_push(args) -> int:
    from huggingface_hub import constants

    from ..hub import HubUploadError, push_folder_to_hub

    if not os.path.isdir(args.folder):
        raise UsageError(f"{args.folder} is not a folder; give the folder written by `hf-recon-prune prune --output`")
    if not os.path.isfile(os.path.join(args.folder, "config.json")):
        raise UsageError(f"{args.folder} holds no config.json: it is not a saved model folder")
    if constants.HF_HUB_OFFLINE:
        raise UsageError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it (e.g. HF_HUB_OFFLINE=0 "
                         f"hf-recon-prune push {args.folder} {args.repo_id})")
    token = push_token(args)
    try:
        url = push_folder_to_hub(args.folder, args.repo_id, private=args.private or None, token=token,
                                 commit_message=args.commit_message, revision=args.revision, create_pr=args.create_pr)
    except HubUploadError as error:
        raise HubUploadError(_with_retry_flags(str(error), args), folder=error.folder, repo_id=error.repo_id) from None
    print(f"pushed {os.path.abspath(args.folder)} to {url}")
    return EXIT_OK


def _with_retry_flags(message: str, args) -> str:
    """The upload error's "Retry with: ..." command completed with the flags of this command it leaves out:
    --token-file and --commit-message (never a token: one given with --token is to be given again)."""
    import shlex

    head, marker, retry = message.partition("Retry with: ")
    if not marker:
        return message
    extra = []
    if args.token_file and "--token-file" not in retry:
        extra += ["--token-file", shlex.quote(os.path.abspath(os.path.expanduser(args.token_file)))]
    if args.commit_message is not None and "--commit-message" not in retry:
        extra += ["--commit-message", shlex.quote(args.commit_message)]
    if args.token:
        head += "The token given with --token is not repeated here: give it again (better: HF_TOKEN or --token-file). "
    return head + marker + " ".join([retry.rstrip(), *extra])


def _cmd_info(args) -> int:
    if not os.path.isdir(args.folder):
        raise UsageError(f"{args.folder} does not exist or is not a folder")
    config_file = os.path.join(args.folder, "config.json")
    if not os.path.isfile(config_file):
        raise UsageError(f"{args.folder} holds no config.json: it is not a saved model folder")
    stored = _read_json_file(config_file)
    if not isinstance(stored, dict) or CONFIG_KEY not in stored:
        raise UsageError(f"{config_file} has no {CONFIG_KEY!r}: this model was not pruned by hf-recon-prune")
    print(f"{os.path.abspath(args.folder)}: {stored.get('model_type', '?')} model")
    try:
        config = PruningConfig.from_dict(stored[CONFIG_KEY])
    except (TypeError, ValueError) as error:  # e.g. a custom criterion this process has not registered
        print(f"pruning: not readable as a PruningConfig here ({error}); as stored:")
        print(json.dumps(stored[CONFIG_KEY], indent=2, sort_keys=True))
    else:
        print(f"pruning: {_describe_config(config)}")
        print(f"config: {config!r}")
    report_file = os.path.join(args.folder, "prune_report.json")
    if os.path.isfile(report_file):
        from ..report import PruneReport

        print(PruneReport.from_dict(_read_json_file(report_file)).summary())
    return EXIT_OK


def _read_json_file(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{path} cannot be read as JSON: {error}") from None


COMMANDS = {"prune": _cmd_prune, "eval": _cmd_eval, "generate-calibration": _cmd_generate, "push": _cmd_push,
            "info": _cmd_info}
