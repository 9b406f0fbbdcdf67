"""A small byte-level decoder: transformers' ``LlamaForCausalLM`` with a random config
(RMSNorm, rotary positions, SwiGLU MLP), built offline (needs ``transformers``)."""

from __future__ import annotations

from torch import nn

BYTE_LLAMA_CONTEXT = 256


def byte_llama(num_classes: int = 256) -> nn.Module:
    """A 4-layer Llama decoder of width 256 (4 heads of 64, SwiGLU MLP of 688, context
    :data:`BYTE_LLAMA_CONTEXT`, untied embeddings), 3.4M parameters for 256 byte tokens;
    ``num_classes`` is the vocabulary size. Hugging Face's initialisation (normal, std 0.02)
    draws from torch's global RNG. Called with ``input_ids`` (B, T) it returns a
    ``CausalLMOutputWithPast`` whose ``logits`` are (B, T, vocabulary)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError as error:
        raise ImportError("model byte_llama is built from Hugging Face transformers, which is not installed: "
                          "pip install 'nnrelief[lm]'") from error  # fmt: skip
    config = LlamaConfig(
        vocab_size=num_classes, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=BYTE_LLAMA_CONTEXT, tie_word_embeddings=False, use_cache=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    return LlamaForCausalLM(config)
