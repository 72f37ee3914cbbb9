"""Vision Transformer (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words") with Hugging
Face ViTForImageClassification semantics: non-overlapping patch projection, a learned [CLS]
token and position table, pre-LN blocks with exact GELU, a final LayerNorm, and a linear
classifier on the [CLS] output.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from research.models.dropout import Dropout
from research.models.layers import ModelConfig, Stack, constrain, dense, partitioned, weight_init

ARCHITECTURE = dict(norm="layernorm", pre_norm=True, mlp="gelu", use_bias=True, rotary=False,
                    causal=False)

PRESETS = {
    # 28x28 grey digits cut into 16 patches of 7x7.
    "vit_tiny": dict(image_size=28, patch_size=7, num_channels=1, hidden_size=64, num_layers=2,
                     num_heads=4, mlp_dim=128, num_classes=10, norm_eps=1e-12),
    # google/vit-base-patch16-224
    "vit_b16": dict(image_size=224, patch_size=16, num_channels=3, hidden_size=768,
                    num_layers=12, num_heads=12, mlp_dim=3072, num_classes=1000,
                    norm_eps=1e-12),
}


def num_patches(config: ModelConfig) -> int:
    return (config.image_size // config.patch_size) ** 2


class ViTEmbeddings(nn.Module):
    """Patches (a strided convolution) after a [CLS] vector, plus learned positions."""
    config: ModelConfig

    @nn.compact
    def __call__(self, image, deterministic: bool):
        c = self.config
        patches = nn.Conv(
            c.hidden_size, (c.patch_size, c.patch_size), strides=(c.patch_size, c.patch_size),
            padding="VALID", dtype=c.compute_dtype, param_dtype=jnp.float32,
            kernel_init=weight_init(c, None, None, None, "embed"),
            bias_init=partitioned(nn.initializers.zeros, "embed"), name="patch")(
                image.astype(c.compute_dtype))
        batch = patches.shape[0]
        # Row-major over the patch grid, the order of HF's flatten(2) on NCHW.
        patches = patches.reshape(batch, -1, c.hidden_size)
        cls = self.param("cls", weight_init(c, "embed"), (c.hidden_size,), jnp.float32)
        position = self.param("position", weight_init(c, "position", "embed"),
                              (num_patches(c) + 1, c.hidden_size), jnp.float32)
        cls = jnp.broadcast_to(cls.astype(c.compute_dtype), (batch, 1, c.hidden_size))
        x = jnp.concatenate([cls, patches], axis=1) + position.astype(c.compute_dtype)
        return Dropout(c.hidden_dropout)(x, deterministic=deterministic)


class ViTForImageClassification(nn.Module):
    """``image`` [B, H, W, C] float -> logits [B, num_classes]."""
    config: ModelConfig
    input_names = ("image",)

    @nn.compact
    def __call__(self, image, deterministic: bool = True):
        c = self.config
        x = ViTEmbeddings(c, name="embeddings")(image, deterministic)
        # Only [CLS] reaches the classifier, so the last block computes that row alone.
        x = Stack(c, final_norm=True, name="encoder")(x, None, deterministic, last_rows=1)
        logits = dense(c, c.num_classes, ("embed", "classes"), name="classifier")(x[:, 0])
        return constrain(logits.astype(jnp.float32), "batch", "classes")


HEADS = {"classifier": (ViTForImageClassification, "classification")}
