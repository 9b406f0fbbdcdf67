"""Cost of NNrelief passes on Hugging Face transformers relative to one plain forward pass.

Small random-config BERT, GPT-2, Llama and ViT (nothing downloaded), 256 pruning samples in
batches of 32: the time of the first `nnrelief.prune` pass (which captures the model with
torch.export; the batches are a list of equal batches, so for their one shape), of each
later pass (the capture is cached per model and input signature and reused: the masks a
pass adds are written into it), each divided by the time of one `torch.no_grad()` forward
over the same batches. Target (issue 17): every pass after the capture at most 3x a forward.

    python benchmarks/transformer_pass.py [--passes 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import transformers

import nnrelief

VOCAB, TOKENS, SAMPLES, BATCH = 1000, 64, 256, 32


def _text(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, VOCAB, (BATCH, TOKENS), generator=generator)}


def _models() -> dict[str, tuple[torch.nn.Module, list]]:
    text = [_text(seed) for seed in range(SAMPLES // BATCH)]
    images = [{"pixel_values": torch.rand(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(s))} for s in range(SAMPLES // BATCH)]
    size = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512}
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(vocab_size=VOCAB, **size))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=128, n_layer=4, n_head=4, use_cache=False))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=VOCAB, num_key_value_heads=2, use_cache=False, **size))
    vit = transformers.ViTForImageClassification(transformers.ViTConfig(image_size=32, patch_size=4, **size))
    return {"bert": (bert, text), "gpt2": (gpt2, text), "llama": (llama, text), "vit": (vit, images)}


def _seconds(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    print(f"{'model':<8} {'forward s':>10} {'first pass':>11} {'later passes (each)':>28}")
    for name, (model, batches) in _models().items():
        model.eval()

        def forward(model=model, batches=batches) -> None:
            with torch.no_grad():
                for batch in batches:
                    model(**batch)

        def prune(model=model, batches=batches) -> None:
            nnrelief.prune(model, batches, alpha_fc=0.98, progress=False)

        forward()  # warm-up
        base = statistics.median(_seconds(forward) for _ in range(3))
        ratios = [_seconds(prune) / base for _ in range(args.passes)]
        later = " ".join(f"{ratio:5.2f}x" for ratio in ratios[1:])
        print(f"{name:<8} {base:>10.3f} {ratios[0]:>10.2f}x {later:>28}")


if __name__ == "__main__":
    main()
