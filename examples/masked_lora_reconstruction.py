"""Block-wise reconstruction with masked LoRA: train low-rank adapters instead of every kept weight, with the
pruning mask applied to the merged update, so pruned weights stay exactly zero.

The trainable weights per linear layer drop from out x in to rank x (in + out), which is what lets BR run on a
model whose blocks would not fit an optimiser state for every weight. The effective weight during training is
M * (W + s * B @ A); the same expression is merged at the end and the PEFT modules are removed, so the saved model
is a plain transformers checkpoint.

    python examples/masked_lora_reconstruction.py                 # offline SmolLM2-135M-Instruct, CPU-sized
    python examples/masked_lora_reconstruction.py --model meta-llama/Llama-2-7b-hf --calibration c4 \
        --num-samples 128 --seq-len 2048 --br-epochs 10 --lora-rank 16
"""

from __future__ import annotations

import argparse

import torch

from hf_recon_prune import Pruner, PruningConfig
from hf_recon_prune.hub import model_sparsity
from hf_recon_prune.models import load_model
from hf_recon_prune.reconstruction.masked_lora import has_lora_layers


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id or local folder (default: offline SmolLM2-135M-Instruct)")
    parser.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--br-lr", type=float, default=1e-3, help="LoRA tolerates a larger step than full BR")
    parser.add_argument("--br-epochs", type=int, default=2)
    parser.add_argument("--calibration", default="default")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--output", default="out/masked-lora")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model)
    config = PruningConfig(
        method=args.method, sparsity=args.sparsity, reconstruction=["br", "gp"], reconstruction_mode="lora",
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, br_lr=args.br_lr, br_epochs=args.br_epochs,
        calibration=args.calibration, num_samples=args.num_samples, seq_len=args.seq_len,
    )
    pruner = Pruner(model, config, tokenizer=tokenizer)
    report = pruner.prune()

    # The masks held through training and merging: every weight outside the mask is exactly zero.
    weights = dict(model.named_parameters())
    outside = sum(int(weights[f"{name}.weight"][~keep.to(torch.bool)].count_nonzero()) for name, keep in pruner.masks.items())
    full = sum(int(keep.numel()) for keep in pruner.masks.values())
    lora = sum(args.lora_rank * sum(keep.shape) for keep in pruner.masks.values())
    print(report.to_markdown())
    print(f"non-zero weights outside the masks: {outside}")
    print(f"LoRA adapters left in the model: {has_lora_layers(model)}")
    print(f"trainable parameters of the pruned linears: {lora:,} (LoRA rank {args.lora_rank}) "
          f"instead of {full:,} in full BR")

    folder = pruner.save_pretrained(args.output)
    print(f"measured sparsity {model_sparsity(model)['overall']:.4f}; saved to {folder}")
    return {"report": report, "folder": folder, "nonzero_outside_masks": outside, "lora_weights": lora,
            "full_weights": full}


if __name__ == "__main__":
    main()
