"""How much leaving padding out of the statistics changes the masks (issue 29 item 6).

Tiny random-initialised Llama and GPT-2 (nothing downloaded), batches of 8 sequences of
lengths drawn from 20-128, right-padded to 128 with token 0 and an ``attention_mask``;
pruned with ``skip_padding=True`` and ``False`` from the same weights. Prints, per model and
setting, the padding fraction, the fraction of weight-mask entries that differ (the LM
head is left unpruned) and the two prunings' times (the first of a model captures it).

    PYTHONPATH=src python benchmarks/padding_masks.py
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn
import transformers

import nnrelief
from nnrelief.experiments.baselines import prunable_layers
from nnrelief.experiments.rowwise import wanda_prune
from nnrelief.pruning.masks import current_mask, is_masked

VOCAB, BATCHES, BATCH, LONGEST, SHORTEST = 256, 8, 8, 128, 20


def models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    llama = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LONGEST, use_cache=False)
    gpt2 = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=LONGEST, use_cache=False,
                                   bos_token_id=0, eos_token_id=0)
    return {"llama": transformers.LlamaForCausalLM(llama).eval(), "gpt2": transformers.GPT2LMHeadModel(gpt2).eval()}


def batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(BATCHES):
        lengths = torch.randint(SHORTEST, LONGEST + 1, (BATCH,), generator=generator)
        ids = torch.randint(1, VOCAB, (BATCH, LONGEST), generator=generator)
        mask = (torch.arange(LONGEST)[None] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def weight_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: current_mask(m, "weight").clone() for name, m in model.named_modules() if is_masked(m, "weight")}


def differing(model: nn.Module, prune) -> tuple[float, float, list[float]]:
    """(fraction of mask entries that differ, remaining fraction with skip_padding, the two
    prunings' seconds)."""
    masks, seconds = [], []
    for skip in (True, False):
        pruned = copy.deepcopy(model)
        start = time.perf_counter()
        prune(pruned, skip)
        seconds.append(time.perf_counter() - start)
        masks.append(weight_masks(pruned))
    total = sum(mask.numel() for mask in masks[0].values())
    differ = sum(int((masks[0][name] != masks[1][name]).sum()) for name in masks[0])
    kept = sum(int(mask.sum()) for mask in masks[0].values())
    return differ / total, kept / total, seconds


def half(model: nn.Module) -> dict[str, int]:
    """Half of every layer's weights (and its biases) to keep, the LM head left out."""
    layers = {name: m for name, m in prunable_layers(model).items() if name != "lm_head"}
    return {name: m.weight.numel() // 2 + (0 if m.bias is None else m.bias.numel()) for name, m in layers.items()}


def main() -> None:
    data = batches()
    padding = 1 - sum(float(b["attention_mask"].sum()) for b in data) / (BATCHES * BATCH * LONGEST)
    print(f"padding fraction {padding:.3f}")
    settings = {
        "alpha 0.9": lambda m, s: nnrelief.prune(m, data, alpha_fc=0.9, ignore="lm_head", progress=False, skip_padding=s),
        "target 0.5": lambda m, s: nnrelief.prune(m, data, target=0.5, ignore="lm_head", progress=False, skip_padding=s),
        "wanda 50%": lambda m, s: wanda_prune(m, data, half(m), skip_padding=s),
    }
    for name, model in models().items():
        for setting, prune in settings.items():
            differ, kept, (skip, count) = differing(model, prune)
            print(f"{name:6s} {setting:10s} masks differ {100 * differ:6.2f}% of weights  (kept {100 * kept:.1f}%)  "
                  f"{skip:.2f} s skipping padding, {count:.2f} s counting it")


if __name__ == "__main__":
    main()
