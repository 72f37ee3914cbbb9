"""Soups on real data: MLP classifiers on sklearn's digits, fine-tuned from one "pretrained" MLP.

Uniform soup is the mean; WiSE-FT hits its endpoints, per path too; the greedy soup scores at
least the best ingredient on held-out data and keeps only ingredients that strictly improve it;
the learned soup starts at uniform and lowers the held-out loss with per-layer coefficients;
dataset soups (POINTS) of fine-tunes on three disjoint data shards beat every shard's model on the
test split; bad input is a one-line error.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

from research import tree
from research.merge import soups

SIZES = (64, 32, 32, 10)
LAYERS = ("layer_0", "layer_1", "head")


def init_mlp(seed=0):
    rng = np.random.default_rng(seed)
    return {name: {"kernel": jnp.asarray(rng.normal(0, a ** -0.5, (a, b)), jnp.float32),
                   "bias": jnp.zeros((b,), jnp.float32)}
            for name, a, b in zip(LAYERS, SIZES[:-1], SIZES[1:])}


def apply(params, x):
    for name in LAYERS[:-1]:
        x = jnp.tanh(x @ params[name]["kernel"] + params[name]["bias"])
    return x @ params["head"]["kernel"] + params["head"]["bias"]


def loss_fn(params, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(apply(params, x), y).mean()


@functools.partial(jax.jit, static_argnames="steps")
def finetune(params, x, y, pool, key, learning_rate, steps=300):
    """Adam on minibatches of 32 rows drawn from ``pool`` (the key sets the data order). One
    pool length for every run, so this compiles once."""
    tx = optax.adam(learning_rate)
    def body(carry, step_key):
        params, state = carry
        rows = pool[jax.random.randint(step_key, (32,), 0, pool.shape[0])]
        updates, state = tx.update(jax.grad(loss_fn)(params, (x[rows], y[rows])), state, params)
        return (optax.apply_updates(params, updates), state), None
    (params, _), _ = jax.lax.scan(body, (params, tx.init(params)), jax.random.split(key, steps))
    return params


@jax.jit
def _metrics(params, x, y):
    logits = apply(params, x)
    return ((logits.argmax(-1) == y).mean(),
            optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())


@pytest.fixture(scope="module")
def digits():
    """Train 999 / validation 399 / test 399, a "pretrained" MLP (the first third of train),
    and six fine-tunes of it on all of train (three learning rates x two data orders)."""
    data = load_digits()
    order = np.random.default_rng(0).permutation(len(data.target))[:1797]
    x = (data.data[order] / 16.0).astype(np.float32)
    y = data.target[order].astype(np.int32)
    splits = {"train": (x[:999], y[:999]), "validation": (x[999:1398], y[999:1398]),
              "test": (x[1398:], y[1398:])}
    everything, first_third = np.arange(999), np.tile(np.arange(333), 3)
    base = finetune(init_mlp(), *splits["train"], first_third, jax.random.key(0), 3e-3)
    ingredients = [finetune(base, *splits["train"], everything, jax.random.key(seed), lr)
                   for lr in (1e-3, 3e-3, 1e-2) for seed in (1, 2)]
    return splits, base, ingredients


def accuracy(params, split):
    return float(_metrics(params, *split)[0])


def loss(params, split):
    return float(_metrics(params, *split)[1])


def random_tree(seed, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return {"a": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), dtype)},
            "b": jnp.asarray(rng.normal(size=(5,)), dtype)}


def test_uniform_soup_is_the_elementwise_mean_in_each_leafs_dtype():
    models = [random_tree(seed) for seed in range(3)]
    soup = tree.flatten(soups.uniform_soup(models))
    for path, leaves in zip(soup, zip(*(tree.flatten(m).values() for m in models))):
        np.testing.assert_allclose(soup[path], np.mean(leaves, axis=0), rtol=1e-6)
    half = soups.uniform_soup([random_tree(0, jnp.bfloat16), random_tree(1, jnp.bfloat16)])
    assert {leaf.dtype for leaf in tree.flatten(half).values()} == {jnp.dtype(jnp.bfloat16)}


def test_wise_ft_endpoints_midpoint_and_per_path_alpha():
    zero_shot, finetuned = random_tree(0), random_tree(1)
    for alpha, expected in ((0.0, zero_shot), (1.0, finetuned),
                            (0.5, soups.uniform_soup([zero_shot, finetuned]))):
        jax.tree.map(np.testing.assert_allclose, soups.wise_ft(zero_shot, finetuned, alpha),
                     expected)
    mixed = soups.wise_ft(zero_shot, finetuned, [(r"a/.*", 0.0), (r".*", 1.0)])
    np.testing.assert_array_equal(mixed["a"]["kernel"], zero_shot["a"]["kernel"])
    np.testing.assert_array_equal(mixed["b"], finetuned["b"])


def test_greedy_soup_beats_the_best_ingredient_held_out_keeping_only_strict_gains(digits):
    splits, _, ingredients = digits
    score = functools.partial(accuracy, split=splits["validation"])
    soup, kept, log = soups.greedy_soup(ingredients, score)
    assert kept[0] == int(np.argmax(log["individual"]))
    assert score(soup) >= max(log["individual"])
    jax.tree.map(np.testing.assert_allclose, soup,
                 soups.uniform_soup([ingredients[i] for i in kept]))
    best = log["individual"][kept[0]]
    for index, candidate_score, was_kept in log["steps"][1:]:
        assert was_kept == (candidate_score > best) == (index in kept)
        best = max(best, candidate_score)
    assert score(soup) == best
    # A copy of the best ingredient leaves the soup's score unchanged: not a strict gain.
    _, kept, _ = soups.greedy_soup([ingredients[kept[0]]] * 2, score)
    assert kept == [0]


def test_learned_soup_starts_uniform_and_lowers_held_out_loss_per_layer(digits):
    splits, _, ingredients = digits
    x, y = splits["validation"]
    batches = [(x[:200], y[:200]), (x[200:], y[200:])]
    soup, coefficients = soups.learned_soup(ingredients, loss_fn, batches, steps=40,
                                            learning_rate=0.05)
    uniform = soups.uniform_soup(ingredients)
    assert loss(soup, splits["validation"]) < loss(uniform, splits["validation"])
    assert set(coefficients) == set(LAYERS)
    for weights in coefficients.values():
        assert weights.shape == (len(ingredients),) and abs(weights.sum() - 1) < 1e-5
    assert np.ptp(np.stack(list(coefficients.values())), axis=0).max() > 0.01
    # The soup is each layer's own mixture.
    for name in LAYERS:
        expected = sum(w * m[name]["kernel"] for w, m in zip(coefficients[name], ingredients))
        np.testing.assert_allclose(soup[name]["kernel"], expected, rtol=1e-4, atol=1e-6)


def test_layer_groups_default_to_the_layer_prefix_and_rules_override():
    params = {"encoder": {"layer_3": {"attn": {"kernel": 0}}, "layer_12": {"bias": 0}},
              "classifier": {"kernel": 0}}
    assert soups.layer_groups(params) == {"encoder/layer_3/attn/kernel": "encoder/layer_3",
                                          "encoder/layer_12/bias": "encoder/layer_12",
                                          "classifier/kernel": "classifier"}
    assert set(soups.layer_groups(params, [(r"encoder/.*", "body")]).values()) == {
        "body", "classifier"}


def test_dataset_soup_beats_every_mixture_on_test(digits):
    """POINTS on digits: three fine-tunes of the pretrained MLP, each on a disjoint third of the
    training data; the soup of the three beats each on held-out test loss and accuracy."""
    splits, base, _ = digits
    x, y = splits["train"]
    shards = np.random.default_rng(0).permutation(len(y)).reshape(3, -1)
    mixtures = [finetune(base, x, y, np.tile(rows, 3), jax.random.key(10 + i), 1e-2)
                for i, rows in enumerate(shards)]
    soup, kept = soups.dataset_soup(mixtures, soup="uniform")
    assert kept == [0, 1, 2]
    for mixture in mixtures:
        assert loss(soup, splits["test"]) < loss(mixture, splits["test"])
        assert accuracy(soup, splits["test"]) >= accuracy(mixture, splits["test"])
    greedy, kept = soups.dataset_soup(
        mixtures, score_fn=functools.partial(accuracy, split=splits["validation"]))
    assert accuracy(greedy, splits["validation"]) >= max(
        accuracy(m, splits["validation"]) for m in mixtures)


@pytest.mark.parametrize("call, message", [
    (lambda: soups.uniform_soup([]), "models is empty"),
    (lambda: soups.uniform_soup([random_tree(0), {"a": random_tree(0)["a"]}]),
     "models[1] does not match models[0]: trees differ at 'b'"),
    (lambda: soups.uniform_soup([random_tree(0), {**random_tree(0), "b": jnp.zeros(4)}]),
     "trees differ at 'b': shape (5,) vs (4,)"),
    (lambda: soups.wise_ft(random_tree(0), random_tree(1), 1.5), "expected a number in [0, 1]"),
    (lambda: soups.wise_ft(random_tree(0), random_tree(1), [("a/.*", 0.5)]),
     "match no rule for 'b'"),
    (lambda: soups.wise_ft(random_tree(0), random_tree(1), [("c", 0.5)]),
     "'c' matches no parameter"),
    (lambda: soups.learned_soup([random_tree(0)], loss_fn, []), "batches is empty"),
    (lambda: soups.dataset_soup([random_tree(0)], soup="best"), "not one of"),
    (lambda: soups.dataset_soup([random_tree(0)]), "needs score_fn"),
])
def test_bad_input_is_a_one_line_error(call, message):
    with pytest.raises(ValueError) as err:
        call()
    assert message in str(err.value) and "\n" not in str(err.value)
