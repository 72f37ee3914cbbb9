"""BERT (Devlin et al., 2019, "BERT: Pre-training of Deep Bidirectional Transformers") with
Hugging Face's exact semantics: post-LN blocks, exact GELU, learned absolute positions and
token types, a tanh pooler on [CLS], and heads for sequence classification and masked LM (the
decoder tied to the word embeddings). Also sentence-transformers' mean pooling (Reimers &
Gurevych, 2019, "Sentence-BERT").
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from research.models.dropout import Dropout
from research.models.layers import ModelConfig, Norm, Stack, constrain, dense, embed, partitioned

ARCHITECTURE = dict(norm="layernorm", pre_norm=False, mlp="gelu", use_bias=True, rotary=False,
                    causal=False)

_BERT = dict(vocab_size=30522, max_length=512, type_vocab_size=2, norm_eps=1e-12,
             hidden_dropout=0.1, attention_dropout=0.1)
PRESETS = {
    # google/bert_uncased_L-2_H-128_A-2
    "bert_tiny": dict(_BERT, hidden_size=128, num_layers=2, num_heads=2, mlp_dim=512),
    # nreimers/MiniLM-L6-H384-uncased, the trunk of sentence-transformers/all-MiniLM-L6-v2
    "minilm_l6": dict(_BERT, hidden_size=384, num_layers=6, num_heads=12, mlp_dim=1536),
    "bert_base": dict(_BERT, hidden_size=768, num_layers=12, num_heads=12, mlp_dim=3072),
}


def mean_pool(sequence_output, attention_mask):
    """Average of the token vectors where ``attention_mask`` is 1 (sentence-transformers)."""
    mask = attention_mask[..., None].astype(sequence_output.dtype)
    return (sequence_output * mask).sum(1) / jnp.maximum(mask.sum(1), 1e-9)


class BertEmbeddings(nn.Module):
    """Word + absolute position + token type embeddings, then LayerNorm and dropout."""
    config: ModelConfig

    def setup(self):
        c = self.config
        self.word = embed(c, c.vocab_size, "vocab")
        self.position = embed(c, c.max_length, "position")
        self.token_type = embed(c, c.type_vocab_size, "token_types")
        self.norm = Norm(c)
        self.dropout = Dropout(c.hidden_dropout)

    def __call__(self, input_ids, token_type_ids, deterministic: bool):
        positions = jnp.arange(input_ids.shape[1])[None]
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        return self.dropout(self.norm(x), deterministic=deterministic)


class BertModel(nn.Module):
    """The BERT trunk: ``(sequence_output [B, L, E], pooled_output [B, E])``."""
    config: ModelConfig
    input_names = ("input_ids", "attention_mask", "token_type_ids")

    def setup(self):
        c = self.config
        self.embeddings = BertEmbeddings(c)
        self.encoder = Stack(c)
        # Square projection: naming its output 'embed' too would claim one mesh axis twice.
        self.pooler = dense(c, c.hidden_size, ("embed", None))

    def encode(self, input_ids, attention_mask, token_type_ids, deterministic: bool,
               last_rows: int | None = None):
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids, deterministic)
        return self.encoder(x, attention_mask, deterministic, last_rows)

    def pool(self, sequence_output):
        return jnp.tanh(self.pooler(sequence_output[:, 0]))

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None,
                 deterministic: bool = True):
        sequence_output = self.encode(input_ids, attention_mask, token_type_ids, deterministic)
        return sequence_output, self.pool(sequence_output)


class BertForSequenceClassification(BertModel):
    """Dropout and a linear classifier on the pooled [CLS] vector: logits [B, num_classes]."""

    def setup(self):
        super().setup()
        self.dropout = Dropout(self.config.hidden_dropout)
        self.classifier = dense(self.config, self.config.num_classes, ("embed", "classes"))

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None,
                 deterministic: bool = True):
        # Only [CLS] reaches the pooler, so the last block computes that row alone.
        pooled = self.pool(self.encode(input_ids, attention_mask, token_type_ids, deterministic,
                                       last_rows=1))
        logits = self.classifier(self.dropout(pooled, deterministic=deterministic))
        # float32 logits: the loss's log-softmax is where low precision hurts most.
        return constrain(logits.astype(jnp.float32), "batch", "classes")


class MaskedLMHead(nn.Module):
    """Dense + GELU + LayerNorm, then the word embeddings (transposed) plus a vocab bias."""
    config: ModelConfig

    @nn.compact
    def __call__(self, x, word_embedding):
        c = self.config
        x = nn.gelu(dense(c, c.hidden_size, ("embed", None), name="transform")(x),
                    approximate=False)
        x = Norm(c, name="transform_norm")(x)
        bias = self.param("bias", partitioned(nn.initializers.zeros, "vocab"), (c.vocab_size,),
                          jnp.float32)
        logits = jnp.einsum("ble,ve->blv", x, word_embedding.astype(x.dtype))
        return logits.astype(jnp.float32) + bias


class BertForMaskedLM(BertModel):
    """Token logits [B, L, vocab]; no pooler, as in HF."""

    def setup(self):
        super().setup()
        self.mlm = MaskedLMHead(self.config)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None,
                 deterministic: bool = True):
        sequence_output = self.encode(input_ids, attention_mask, token_type_ids, deterministic)
        logits = self.mlm(sequence_output, self.embeddings.word.embedding)
        return constrain(logits, "batch", "length", "vocab")


HEADS = {
    "encoder": (BertModel, "encoding"),
    "classifier": (BertForSequenceClassification, "classification"),
    "mlm": (BertForMaskedLM, "masked_lm"),
}
