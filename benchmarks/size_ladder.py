"""What an NNrelief pass and compaction cost as models grow: a size ladder of Hugging Face
Llama and GPT-2 models (random configs, nothing downloaded), one process per size.

Per size, on 16 sequences of 128 tokens in batches of 4 (the pruning set and the timed
forward alike): the time of one ``torch.no_grad()`` forward over them, of the first
``nnrelief.prune`` pass (capture included), of a later pass, of the pruned model's forward
and of ``nnrelief.compact``, each as a ratio to the dense forward; the resident memory a pass
leaves behind and the peak it adds (RSS, from /proc: peak reset before each stage), and the
peak compaction adds, each as a ratio to the weights' bytes; then the compacted model is
saved (``save_pretrained``) to a temporary folder. Targets (issue 28): later pass <= 2x a
forward, first <= 3x, pruned forward <= 1.05x; pass resident <= 1 byte per scored weight
(0.25x in fp32), pass peak <= 1.0x, compaction peak <= 1.2x.

    python benchmarks/size_ladder.py                          # fp32 Llama and GPT-2, 20M to 300M
    python benchmarks/size_ladder.py --sizes 1B --families llama
    python benchmarks/size_ladder.py --dtype bf16 --sizes 20M 88M 300M
    python benchmarks/size_ladder.py --one llama 88M fp32     # one size in this process (what the ladder runs)

Run it with nothing else on the machine: timings are ratios within one process, memory is
read from the process's own RSS.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import subprocess
import sys
import tempfile
import time
import warnings
from typing import Any, Callable

import torch
import transformers

import nnrelief

SEQUENCES, TOKENS, BATCH = 16, 128, 4
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# (hidden, layers, heads, MLP width, vocabulary): about 20M, 88M, 300M and 1B parameters
LLAMA = {"20M": (512, 6, 8, 1376, 2000), "88M": (768, 12, 12, 2048, 1000), "300M": (1024, 20, 16, 2816, 20000),
         "1B": (2048, 18, 16, 5632, 32000)}  # fmt: skip
GPT2 = {"20M": (512, 6, 8, None, 2000), "88M": (768, 12, 12, None, 2000), "300M": (1024, 24, 16, None, 2000),
        "1B": (2048, 20, 16, None, 2000)}  # fmt: skip


def build(family: str, size: str, dtype: torch.dtype) -> torch.nn.Module:
    """A random-config causal LM of ``family`` at ``size``, in eval mode."""
    torch.manual_seed(0)
    if family == "llama":
        hidden, layers, heads, width, vocab = LLAMA[size]
        config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                          num_key_value_heads=heads, intermediate_size=width, use_cache=False)  # fmt: skip
        model = transformers.LlamaForCausalLM(config)
    else:
        hidden, layers, heads, _, vocab = GPT2[size]
        config = transformers.GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=TOKENS, use_cache=False)
        model = transformers.GPT2LMHeadModel(config)
    return model.to(dtype).eval()


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _settle() -> int:
    """RSS after collecting garbage and handing freed heap back to the system (glibc)."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return _status("VmRSS")


def _measured(action: Callable[[], Any]) -> tuple[Any, float, int, int]:
    """(result, seconds, peak RSS added, RSS added once settled) of ``action``."""
    before = _settle()
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")  # reset the peak (VmHWM)
    start = time.perf_counter()
    result = action()
    seconds = time.perf_counter() - start
    peak = _status("VmHWM") - before
    return result, seconds, peak, _settle() - before


def one(family: str, size: str, dtype_name: str) -> dict[str, Any]:
    """Every figure of one model size (in this process)."""
    warnings.simplefilter("ignore")
    model = build(family, size, DTYPES[dtype_name])
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = [{"input_ids": torch.randint(0, vocab, (BATCH, TOKENS), generator=generator)} for _ in range(SEQUENCES // BATCH)]

    def forward() -> None:
        with torch.no_grad():
            for batch in batches:
                model(**batch)

    forward()  # warm-up
    _, dense, _, _ = _measured(forward)
    report, first, first_peak, first_resident = _measured(lambda: nnrelief.prune(model, batches, alpha_fc=0.95, progress=False))
    scored = report.total
    _, later, later_peak, later_resident = _measured(lambda: nnrelief.prune(model, batches, alpha_fc=0.95, progress=False))
    _, pruned, _, _ = _measured(forward)
    small, compaction, compact_peak, _ = _measured(lambda: nnrelief.compact(model, batches[0]))
    with tempfile.TemporaryDirectory() as folder:
        _, saving, _, _ = _measured(lambda: small.save_pretrained(folder))
    return {
        "family": family, "size": size, "dtype": dtype_name, "parameters": sum(p.numel() for p in model.parameters()),
        "weights_bytes": weights, "scored": scored, "forward_s": dense,
        "first_pass": first / dense, "later_pass": later / dense, "pruned_forward": pruned / dense, "compact": compaction / dense,
        "save_s": saving, "first_peak": first_peak / weights, "first_resident": first_resident / weights,
        "later_peak": later_peak / weights, "later_resident": later_resident / weights, "compact_peak": compact_peak / weights,
        "remaining": report.remaining_fraction, "compacted_parameters": sum(p.numel() for p in small.parameters()),
    }  # fmt: skip


def _row(r: dict[str, Any]) -> str:
    return (f"| {r['family']} {r['size']} {r['dtype']} ({r['parameters'] / 1e6:.0f}M) | {r['forward_s']:.1f} s | {r['first_pass']:.2f}x | "
            f"{r['later_pass']:.2f}x | {r['pruned_forward']:.2f}x | {r['compact']:.2f}x | {r['first_resident']:.2f}x / {r['first_peak']:.2f}x | "
            f"{r['later_resident']:.2f}x / {r['later_peak']:.2f}x | {r['compact_peak']:.2f}x |")  # fmt: skip


HEADER = ("| model | forward | first pass | later pass | pruned forward | compact | pass 1 resident / peak | "
          "pass 2 resident / peak | compact peak |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=["llama", "gpt2"], choices=["llama", "gpt2"])
    parser.add_argument("--sizes", nargs="+", default=["20M", "88M", "300M"], choices=list(LLAMA))
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", nargs=3, metavar=("FAMILY", "SIZE", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    print(HEADER, flush=True)
    for family in args.families:
        for size in args.sizes:
            command = [sys.executable, __file__, "--one", family, size, args.dtype, "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"| {family} {size} {args.dtype} | failed: {done.stderr.strip().splitlines()[-1:]} |", flush=True)
                continue
            print(_row(json.loads(done.stdout.strip().splitlines()[-1])), flush=True)


if __name__ == "__main__":
    main()
