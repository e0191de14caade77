"""Mixture-of-experts, hybrid and fused-projection models: tiny models built from transformers 5 configs.

Every check is against something computed here independently: brute-force routing (a Python loop over tokens and
top-k slots, float64), the dense-layer SparseGPT on the tokens routed to an expert, the masks themselves, and the
model's own outputs.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import transformers
from torch import nn

from conftest import random_ids
from hf_recon_prune import PruningConfig
from hf_recon_prune.architectures import resolve_layout
from hf_recon_prune.calibration import CalibrationSet
from hf_recon_prune.criteria.sparsegpt import sparsegpt_prune
from hf_recon_prune.evaluation import model_sparsity
from hf_recon_prune.experts import UnsupportedExpertsError, fused_experts_layout
from hf_recon_prune.memory import estimate_memory
from hf_recon_prune.prunable import prunable_weights
from hf_recon_prune.pruner import Pruner, PruningFailedError
from hf_recon_prune.reconstruction.masked_delta import attach_masked_deltas

VOCAB = 96
COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
                      head_dim=16),
    "olmoe": dict(num_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=16,
                    layer_types=["sliding_attention", "full_attention"]),
    "deepseek_v3": dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=64),
    "phi3": dict(),
    "qwen3_next": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16,
                       shared_expert_intermediate_size=32, linear_num_value_heads=4, linear_num_key_heads=2,
                       linear_key_head_dim=16, linear_value_head_dim=16,
                       layer_types=["linear_attention", "full_attention"]),
    "jamba": dict(num_experts=4, num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
                  expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8, mamba_expand=2, mamba_dt_rank=8),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=128),
}
MOE = ["mixtral", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3", "qwen2_moe", "qwen3_next", "jamba"]


def make_model(family: str, seed: int = 0) -> nn.Module:
    config = transformers.AutoConfig.for_model(family, **{**COMMON, **FAMILIES[family]})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # wider than the init so that pruning and reconstruction have a visible effect
        for name, param in model.named_parameters():
            if param.dim() >= 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                param.normal_(0.0, 0.08)
    return model.eval()


def calibration(num: int = 8, seq_len: int = 16, heldout: int = 4) -> CalibrationSet:
    return CalibrationSet(input_ids=random_ids(num, seq_len, seed=1), is_self_generated=torch.zeros(num, dtype=torch.bool),
                          heldout_ids=random_ids(heldout, seq_len, seed=101),
                          statistics_mask=torch.ones(num, dtype=torch.bool), description={"source": "test"})


def prune(model, **overrides):
    settings = dict(method="sparsegpt", sparsity=0.5, reconstruction=["lr"], num_samples=8, seq_len=16,
                    sparsegpt_block_size=16, forward_batch_size=4, device="cpu", br_epochs=2, moe_min_tokens=0)
    settings.update(overrides)
    pruner = Pruner(model, PruningConfig(**settings), calibration_data=calibration(), show_progress=False)
    return pruner, pruner.prune()


def routers(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if n.endswith((".gate.weight", ".router.weight", ".router.bias", "shared_expert_gate.weight"))}


def expert_modules(model) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if fused_experts_layout(m) is not None}


def check_units(model, pattern: str) -> int:
    """Every matrix unit of every prunable weight has the sparsity (and N:M structure along its input axis) asked
    for; returns how many expert units were checked."""
    expert_units = 0
    for block in resolve_layout(model).blocks:
        for weight in prunable_weights(block, family_config=model.config).values():
            for unit in weight.units:
                zero = unit.weight == 0
                if pattern == "2:4":
                    groups = zero.reshape(unit.out_features, -1, 4)
                    assert bool((groups.sum(-1) >= 2).all()), unit.name
                else:
                    assert zero.float().mean().item() == pytest.approx(0.5, abs=1e-6), unit.name
                expert_units += unit.expert is not None
    return expert_units


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_every_family_method_and_pattern(family, method, pattern):
    model = make_model(family)
    before = routers(model)
    _, report = prune(model, method=method, pattern=pattern)
    expert_units = check_units(model, pattern)
    assert (expert_units > 0) == (family in MOE)
    after = routers(model)
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    measured = model_sparsity(model)
    assert report.mean_sparsity == pytest.approx(measured["overall"], abs=1e-9)
    assert report.parameter_counts()["pruned"] == measured["zeros"]
    model.generate(random_ids(1, 4), max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_fused_experts_layouts_are_read_from_the_modules():
    mixtral = fused_experts_layout(expert_modules(make_model("mixtral"))["model.layers.0.mlp.experts"])
    assert (mixtral.transposed, mixtral.concatenated, mixtral.up_bias, mixtral.num_experts) == (False, True, None, 4)
    gpt_oss = fused_experts_layout(expert_modules(make_model("gpt_oss"))["model.layers.0.mlp.experts"])
    assert (gpt_oss.transposed, gpt_oss.concatenated, gpt_oss.up_bias) == (True, False, "gate_up_proj_bias")
    assert gpt_oss.gate_up_rows() == [("gate", slice(0, None, 2)), ("up", slice(1, None, 2))]


def _routed_inputs(model, ids: torch.Tensor, module_name: str):
    """(tokens entering the experts module [T, d], top-k ids [T, k]) of the dense model on ``ids``, float64."""
    captured = []
    module = model.get_submodule(module_name)

    def hook(_module, args, kwargs, _output):
        tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        captured.append((tensors[0].double().clone(), next(t for t in tensors if not t.is_floating_point()).clone()))

    handle = module.register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(ids)
    handle.remove()
    return torch.cat([c[0] for c in captured]), torch.cat([c[1] for c in captured])


def _brute_force_tokens(tokens, ids, expert: int) -> torch.Tensor:
    rows = [tokens[t] for t in range(ids.shape[0]) for j in range(ids.shape[1]) if int(ids[t, j]) == expert]
    return torch.stack(rows) if rows else tokens[:0]


def _row_keep(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    keep = torch.ones_like(scores, dtype=torch.bool)
    pruned = int(sparsity * scores.shape[1])
    for row in range(scores.shape[0]):
        keep[row, scores[row].argsort()[:pruned]] = False
    return keep


@pytest.mark.parametrize("all_tokens", [False, True])
def test_wanda_on_one_expert_equals_a_brute_force_reference(all_tokens):
    model = make_model("mixtral")
    dense = copy.deepcopy(model)
    name = "model.layers.0.mlp.experts"
    tokens, ids = _routed_inputs(dense, calibration().input_ids, name)
    experts = dense.get_submodule(name)
    gate_up, down = experts.gate_up_proj.detach().double(), experts.down_proj.detach().double()
    _, report = prune(model, method="wanda", reconstruction=[], moe_min_tokens=10**6 if all_tokens else 0)
    pruned = model.get_submodule(name)
    for expert in range(4):
        x = tokens if all_tokens else _brute_force_tokens(tokens, ids, expert)
        assert report.blocks[0].expert_tokens["mlp.experts"][expert] == len(_brute_force_tokens(tokens, ids, expert))
        norms = x.square().sum(0).sqrt()
        keep = _row_keep(gate_up[expert].abs() * norms, 0.5)
        assert torch.equal(pruned.gate_up_proj[expert] != 0, keep)
        gate, up = (x @ gate_up[expert].T).chunk(2, dim=-1)
        mid = torch.nn.functional.silu(gate) * up
        keep = _row_keep(down[expert].abs() * mid.square().sum(0).sqrt(), 0.5)
        assert torch.equal(pruned.down_proj[expert] != 0, keep)
    assert sum(report.blocks[0].expert_tokens["mlp.experts"]) == ids.numel()
    assert bool(report.blocks[0].expert_fallback) == all_tokens
    if all_tokens:
        assert report.blocks[0].expert_fallback["mlp.experts"] == [0, 1, 2, 3]
        assert any("every token entering" in w for w in report.warnings)


def test_sparsegpt_on_one_expert_equals_dense_layer_sparsegpt_on_its_routed_inputs():
    model = make_model("qwen3_moe")
    name = "model.layers.0.mlp.experts"  # block 0's statistics pass sees what the dense model sees
    tokens, ids = _routed_inputs(copy.deepcopy(model), calibration().input_ids, name)
    experts = model.get_submodule(name)
    original_up = experts.gate_up_proj.detach().clone()
    _, report = prune(model, method="sparsegpt", reconstruction=["lr"])
    for expert in range(4):
        x = _brute_force_tokens(tokens, ids, expert).float()
        hessian = x.T @ x / x.shape[0]
        for part in (slice(0, 32), slice(32, 64)):  # the expert's gate and up projections
            reference = sparsegpt_prune(original_up[expert][part], hessian, 0.5, None, 16, 0.01).weight
            torch.testing.assert_close(experts.gate_up_proj[expert][part].detach(), reference.to(torch.float32),
                                       rtol=1e-4, atol=1e-5)
            assert torch.equal(experts.gate_up_proj[expert][part] == 0, reference == 0)
    assert "mlp.experts.gate_up_proj[3].up" in report.blocks[0].dampening  # the solver ran on every unit


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_block_reconstruction_through_moe_keeps_every_mask_and_lowers_the_error(mode):
    model = make_model("mixtral")
    before = routers(model)
    pruner, report = prune(model, method="wanda", reconstruction=["br", "gp"], reconstruction_mode=mode,
                           br_epochs=4, br_lr=2e-3)
    state = dict(model.named_parameters())
    experts_masks = [n for n in pruner.masks if "experts" in n]
    assert len(experts_masks) == 4  # gate_up and down of 2 blocks
    for name, keep in pruner.masks.items():
        weight = state[name if name.endswith(("_proj",)) and "experts" in name else f"{name}.weight"]
        assert bool((weight[~keep] == 0).all()), name
        assert keep.float().mean().item() == pytest.approx(0.5)
    for block in report.blocks:
        assert block.error_after["calibration"] < block.error_before["calibration"]
    after = routers(model)
    assert all(torch.equal(before[n], after[n]) for n in before), "routers are frozen during BR"


def test_masked_delta_merges_exactly_and_unloads_exactly():
    model = make_model("gpt_oss")
    block = resolve_layout(model).blocks[0]
    weights = prunable_weights(block)
    experts = [w for w in weights.values() if w.kind == "experts"]
    masks = {w: torch.rand(w.weight.shape, generator=torch.Generator().manual_seed(3)) > 0.5 for w in experts}
    with torch.no_grad():
        for w, keep in masks.items():
            w.weight.mul_(keep)
    originals = {w: w.weight for w in experts}
    saved = {w: w.weight.detach().clone() for w in experts}
    handle = attach_masked_deltas(masks, rank=2, alpha=4.0, targets=experts, seed=0)
    with torch.no_grad():
        for p in handle.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.1)  # lora_B starts at zero; give the delta a value
    hidden = torch.randn(1, 5, 64)
    kwargs = {"position_ids": torch.arange(5)[None]}
    with torch.no_grad():
        expected = {}
        for w, (_, delta) in zip(experts, handle.deltas):
            b, a = delta.lora_B.double(), delta.lora_A.double()
            expected[w] = (saved[w].double() + (delta.scale * (b @ a)).transpose(-1, -2)) * masks[w]
        adapted = model(random_ids(1, 5)).logits
    handle.merge()
    for w in experts:
        assert w.weight is originals[w]  # the same Parameter object, merged in place
        torch.testing.assert_close(w.weight.double(), expected[w], rtol=1e-6, atol=1e-7)
        assert bool((w.weight[~masks[w]] == 0).all())
    with torch.no_grad():
        assert torch.allclose(model(random_ids(1, 5)).logits, adapted, atol=1e-6)
    assert hidden is not None and kwargs
    handle = attach_masked_deltas(masks, rank=2, alpha=4.0, targets=experts, seed=0)
    merged = {w: w.weight.detach().clone() for w in experts}
    handle.unload()
    assert all(torch.equal(w.weight, merged[w]) for w in experts)


def test_a_router_named_in_include_modules_is_pruned():
    model = make_model("mixtral")
    _, report = prune(model, method="magnitude", include_modules=[r"mlp\.gate$"])
    assert set(report.blocks[0].layer_sparsity) == {"mlp.gate"}
    assert report.blocks[0].layer_sparsity["mlp.gate"] == pytest.approx(0.5)
    assert (model.model.layers[0].self_attn.q_proj.weight != 0).all()


def test_an_experts_layout_the_generic_computation_does_not_reproduce_is_refused_by_name():
    model = make_model("mixtral")
    experts = model.model.layers[0].mlp.experts
    original = type(experts).forward

    def forward(self, *args, **kwargs):  # not what the layout attributes describe
        return original(self, *args, **kwargs) * 0.5

    experts.forward = forward.__get__(experts)
    with pytest.raises(PruningFailedError) as failure:
        prune(model, method="wanda")
    assert isinstance(failure.value.__cause__, UnsupportedExpertsError)
    assert "mlp.experts" in str(failure.value.__cause__) and "exclude_modules" in str(failure.value.__cause__)


@pytest.mark.parametrize("family, unsupported", [("jamba", "mamba.conv1d.weight"),
                                                 ("qwen3_next", "linear_attn.conv1d.weight")])
def test_hybrid_blocks_prune_and_name_what_they_leave_dense(family, unsupported):
    model = make_model(family)
    _, report = prune(model, method="wanda", reconstruction=["br", "gp"], br_epochs=1)
    block = report.blocks[0]
    assert block.left_dense[unsupported] == "unsupported"
    assert any(unsupported in w for w in report.warnings)
    counts = block.parameters
    assert counts["block"] == counts["eligible"] + sum(v for k, v in counts.items() if k.startswith("dense:"))
    assert report.block_sparsity < report.mean_sparsity


def test_memory_estimate_counts_expert_weights_and_their_optimizer_state():
    model = make_model("mixtral")
    blocks = resolve_layout(model).blocks

    def estimate(**overrides):
        config = PruningConfig(reconstruction=["br"], num_samples=8, seq_len=16, device="cpu",
                               br_train_other_params=False, **overrides)
        return estimate_memory(blocks, config, 8, 0, 16, 64, torch.float32, torch.device("cpu"))

    expert_params = sum(p.numel() for n, p in blocks[0].named_parameters() if "experts" in n)
    with_experts = estimate().reconstruction
    without = estimate(exclude_modules=["experts"]).reconstruction
    assert with_experts - without == 12 * expert_params  # fp32 gradient + two Adam moments


def test_memory_estimate_counts_each_token_once_per_routed_expert():
    model = make_model("mixtral")  # hidden 64, expert intermediate 128, top-2
    blocks = resolve_layout(model).blocks
    config = PruningConfig(reconstruction=["lr"], num_samples=8, seq_len=16, forward_batch_size=4, device="cpu")
    dense, routed = (estimate_memory(blocks, config, 8, 0, 16, 64, torch.float32, torch.device("cpu"),
                                     experts_per_token=k).activations for k in (0, 2))
    # per token and routed copy: gathered input (64) + gate/up output (2 x 128) + gated product (128) + output (64)
    assert routed - dense == 4 * 16 * 2 * (3 * 128 + 2 * 64) * 4


def test_card_and_report_give_sparsity_over_what_was_eligible_and_name_what_stayed_dense(tmp_path):
    model = make_model("qwen2_moe")
    pruner, report = prune(model, method="wanda")
    counts = report.parameter_counts()
    assert report.block_sparsity == pytest.approx(counts["pruned"] / counts["block"])
    assert report.left_dense()["router"] == sum(p.numel() for n, p in model.named_parameters()
                                                 if n.endswith((".gate.weight", "shared_expert_gate.weight")))
    folder = pruner.save_pretrained(str(tmp_path / "moe"))
    card = open(f"{folder}/README.md", encoding="utf-8").read()
    assert "## What was left dense" in card and "`mlp.shared_expert_gate.weight`" in card
    assert "## Calibration coverage of the experts" in card
    tokens = report.blocks[0].expert_tokens["mlp.experts"]
    assert f"| 0 | `mlp.experts` | 4 | {min(tokens)} |" in card
    assert f"{100 * report.block_sparsity:.2f}%" in card


def test_resume_restores_expert_masks(tmp_path):
    from hf_recon_prune.run_checkpoints import RunCheckpoints  # noqa: F401  (the module the run uses)

    model = make_model("mixtral")
    reference = copy.deepcopy(model)
    _, expected = prune(reference, method="sparsegpt", reconstruction=["lr", "br"], br_epochs=1)

    class Stop(Exception):
        pass

    def stop(index, _report):
        if index == 0:
            raise Stop

    settings = dict(method="sparsegpt", sparsity=0.5, reconstruction=["lr", "br"], num_samples=8, seq_len=16,
                    sparsegpt_block_size=16, forward_batch_size=4, device="cpu", br_epochs=1, moe_min_tokens=0,
                    checkpoint_dir=str(tmp_path / "ckpt"))
    with pytest.raises(PruningFailedError):
        Pruner(model, PruningConfig(**settings), calibration_data=calibration(), show_progress=False,
               on_block_end=stop).prune()
    resumed_model = make_model("mixtral")
    pruner = Pruner(resumed_model, PruningConfig(**settings), calibration_data=calibration(), show_progress=False)
    pruner.prune(resume=True)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed_model.state_dict()[name]), name
    assert "model.layers.0.mlp.experts.gate_up_proj" in pruner.masks
    assert math.isfinite(expected.mean_sparsity)


def test_multimodal_model_prunes_its_text_decoder_and_leaves_the_vision_tower_untouched():
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=128, sliding_window=16,
                pad_token_id=0, bos_token_id=1, eos_token_id=2)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=95, boi_token_index=93, eoi_token_index=94)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    assert resolve_layout(model).blocks_path == "model.language_model.layers"
    untouched = {n: p.detach().clone() for n, p in model.named_parameters() if "language_model" not in n}
    assert any("vision_tower" in n for n in untouched)
    _, report = prune(model, method="wanda", reconstruction=["lr", "br", "gp"], br_epochs=1)
    assert report.mean_sparsity == pytest.approx(0.5)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], p) for n, p in untouched.items())
    model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False)
