"""Llama (Touvron et al., 2023, "LLaMA: Open and Efficient Foundation Language Models") with
Hugging Face LlamaForCausalLM semantics: pre-RMSNorm decoder blocks without biases, rotary
positions, SwiGLU MLPs, grouped-query attention, and an untied or tied LM head.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from research.models.layers import ModelConfig, Stack, constrain, dense, embed

ARCHITECTURE = dict(norm="rmsnorm", pre_norm=True, mlp="swiglu", use_bias=False, rotary=True,
                    causal=True)

PRESETS = {
    "llama_tiny": dict(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, mlp_dim=128, max_length=128, norm_eps=1e-6),
    # Llama-3.2-1B's shapes (its "llama3" RoPE frequency scaling is not implemented).
    "llama_1b": dict(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=32,
                     num_kv_heads=8, head_dim=64, mlp_dim=8192, max_length=8192,
                     norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True),
}


class LlamaEmbeddings(nn.Module):
    """Token embeddings only: positions enter as rotations inside attention."""
    config: ModelConfig

    def setup(self):
        self.word = embed(self.config, self.config.vocab_size, "vocab")

    def __call__(self, input_ids):
        return self.word(input_ids)


class LlamaForCausalLM(nn.Module):
    """``input_ids`` [B, L] (+ padding ``attention_mask``) -> next-token logits [B, L, vocab]."""
    config: ModelConfig
    input_names = ("input_ids", "attention_mask")

    def setup(self):
        c = self.config
        self.embeddings = LlamaEmbeddings(c)
        self.decoder = Stack(c, final_norm=True)
        self.lm_head = dense(c, c.vocab_size, ("embed", "vocab"), use_bias=False)

    def __call__(self, input_ids, attention_mask=None, deterministic: bool = True):
        return self.head(self.hidden(input_ids, attention_mask, deterministic))

    def hidden(self, input_ids, attention_mask=None, deterministic: bool = True):
        """The final normed hidden states [B, L, E], before the LM head."""
        return self.decoder(self.embeddings(input_ids), attention_mask, deterministic)

    def head(self, x):
        """Logits [..., vocab] of hidden states ``x``; a chunked loss calls it a block of
        positions at a time (``config.train.loss_chunk``)."""
        if self.config.tie_word_embeddings:
            word_embedding = self.embeddings.word.embedding.astype(x.dtype)
            logits = jnp.einsum("...e,ve->...v", x, word_embedding)
        else:
            logits = self.lm_head(x)
        # float32 logits: the loss's log-softmax is where low precision hurts most.
        return constrain(logits.astype(jnp.float32), "batch", "length", "vocab")


HEADS = {"lm": (LlamaForCausalLM, "causal_lm")}
