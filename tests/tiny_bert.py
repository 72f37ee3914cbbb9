"""What the method tests share: a tiny random BERT and its token batches, a compiled forward
through a method, one step of the real loop with a method on a tiny classifier, and the torch
side of the PEFT parity tests (the same weights saved as a Hugging Face folder)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from research import models, tree
from research.models import hf
from research.train import loop

TINY = dict(hidden_size=32, num_heads=4, mlp_dim=64, num_layers=2, vocab_size=100,
            max_length=32, hidden_dropout=0.0, attention_dropout=0.0)


def tiny_model(head="encoder", **overrides):
    return models.build(f"bert_tiny_{head}", **{**TINY, **overrides})


def random_tree(shapes, seed=0, scale=0.2):
    """Random float32 leaves of these shapes, without an XLA compile."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), jnp.float32),
                        shapes)


def random_params(model, seed=0, scale=0.2):
    return random_tree(model.param_shapes(), seed, scale)


def token_batch(rows=3, length=12, vocab=100, seed=0):
    """Ids, an attention mask with row 1 right-padded from position 8, and zero token types."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (rows, length)).astype(np.int32)
    mask = np.ones((rows, length), np.int32)
    mask[1, 8:] = 0
    return ids, mask, np.zeros_like(ids)


@functools.partial(jax.jit, static_argnums=(0, 1))
def forward(model, method, params, *inputs):
    """The model's outputs through ``method`` (None: the plain model), compiled."""
    if method is None:
        return model.module.apply({"params": params}, *inputs)
    return method.apply(model.module, {"params": params}, *inputs).outputs


def gap(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def one_line(info) -> None:
    assert "\n" not in str(info.value)


def loop_config(method: dict):
    """The default config on a one-layer random BERT classifier (vocabulary 1000) with this
    method, a batch of 8, a constant learning rate of 1e-2 and one device."""
    from configs import common

    config = common.base_config()
    config.data.name = "rotten_tomatoes/sentiment"
    config.model.name = "bert_tiny_classifier"
    config.model.overrides = dict(num_classes=2, vocab_size=1000, hidden_size=32, num_heads=4,
                                  mlp_dim=64, num_layers=1, hidden_dropout=0.0,
                                  attention_dropout=0.0)
    config.train.batch_size = 8
    config.optim.learning_rate = 1e-2
    config.optim.schedule = "constant"
    config.mesh = dict(data=1)
    config.method = method
    return config


def loop_setup(config, steps=2):
    """The loop's setup and initial state for ``config``."""
    setup = loop.make_setup(config, loop.build_model(config), steps, devices=jax.devices()[:1])
    return setup, loop.init_state(config, setup)


def random_batch(setup, rows=8, length=16, vocab=1000, seed=0):
    """A global batch of random tokens and binary labels."""
    rng = np.random.default_rng(seed)
    return loop.global_batch(setup, {
        "input_ids": rng.integers(1, vocab, (rows, length)).astype(np.int32),
        "attention_mask": np.ones((rows, length), np.int32),
        "token_type_ids": np.zeros((rows, length), np.int32),
        "label": rng.integers(0, 2, (rows,)).astype(np.int32)})


def assert_only_trainable_moved(before, after) -> None:
    """Every frozen leaf of two train states is equal, and every trainable leaf moved."""
    after_frozen, after_trainable = tree.flatten(after["frozen"]), tree.flatten(after["trainable"])
    for path, value in tree.flatten(before["frozen"]).items():
        np.testing.assert_array_equal(after_frozen[path], value, err_msg=path)
    for path, value in tree.flatten(before["trainable"]).items():
        assert np.abs(after_trainable[path] - value).max() > 0, path


def save_torch_base(tmp_path_factory, model, params, name: str) -> str:
    """``params`` saved as a Hugging Face folder for torch to load; torch on 2 threads."""
    import torch

    torch.set_num_threads(2)
    base_dir = str(tmp_path_factory.mktemp(name) / "base")
    hf.save_pretrained(model, params, base_dir)
    return base_dir


def torch_bert_outputs(torch_model, ids, mask, types):
    """A torch BertModel's last hidden state and pooler output, as numpy."""
    import torch

    with torch.no_grad():
        out = torch_model(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask, dtype=torch.long),
                          token_type_ids=torch.tensor(types, dtype=torch.long))
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()
