"""Methods built on the prompt tuners. PVP: the tune stage's first prompt is, exactly, the
pretrain stage's last (real orbax runs). IAPT: every layer's prompts come from that layer's
input (same input, same prompts; padding ignored; one layer by hand), its rational activation is
its formula, and at init the model is prefix tuning on the key and value biases. PET: the class
scores are, exactly, the verbaliser words' masked-LM logits at the mask of the pattern's cloze.
Personalised models (lightweight, last layer, prefix): each config trains its named parts only.
Only the method's leaves train; bad input is a one-line error."""

import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy.special import erf  # noqa: E402

from research import methods, models, sites, tree  # noqa: E402
from research.adapters import iapt as iapt_lib  # noqa: E402
from research.adapters import pet as pet_lib  # noqa: E402
from research.adapters.iapt import IAPT  # noqa: E402
from research.adapters.pet import PET  # noqa: E402
from research.adapters.prefix import PrefixTuning  # noqa: E402
from research.train import checkpoint, loop  # noqa: E402
from tests.tiny_bert import TINY, random_params, gap, one_line  # noqa: E402

LLAMA = dict(vocab_size=256, hidden_size=32, num_heads=4, num_kv_heads=2, mlp_dim=64,
             num_layers=2)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAD = (r"classifier/.*",)
M = 3  # IAPT's prompt slots


def text_batch(lengths, width, seed=0, low=20):
    """Rows ``[CLS]=2 tokens [SEP]=3`` of the given real lengths, padded with 0 to ``width``."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = [2, *rng.integers(low, 100, length - 2), 3]
        mask[row, :length] = 1
    return ids, mask, np.zeros_like(ids)


@pytest.fixture(scope="module")
def bert():
    model = models.build("bert_tiny_classifier", **TINY)
    return model, random_params(model)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("data"))


def tiny_classifier_config(options: dict, *, layers=1, vocab_size=1000):
    from configs import common

    config = common.base_config()
    config.data.name = "rotten_tomatoes/sentiment"
    config.model.name = "bert_tiny_classifier"
    config.model.overrides = dict(num_classes=2, vocab_size=vocab_size, hidden_size=32,
                                  num_heads=4, mlp_dim=64, num_layers=layers, hidden_dropout=0.0,
                                  attention_dropout=0.0)
    config.train.batch_size = 8
    config.optim.learning_rate = 1e-2
    config.optim.schedule = "constant"
    config.mesh = dict(data=1)
    config.method = options
    return config


def train_steps(config, batch: dict, steps: int = 1) -> tuple[dict, dict]:
    """The trainable and frozen trees before and after training steps on one device."""
    setup = loop.make_setup(config, loop.build_model(config), 2, devices=jax.devices()[:1])
    state = loop.init_state(config, setup)
    before = jax.device_get(state)
    step = loop.make_train_step(setup)
    for _ in range(steps):
        state, _ = step(state, loop.global_batch(setup, batch))
    return before, jax.device_get(state)


def moved_leaves(before: dict, after: dict) -> set:
    """Leaves the step changed; every frozen leaf must be bit-identical."""
    for path, value in tree.flatten(before["frozen"]).items():
        np.testing.assert_array_equal(tree.flatten(after["frozen"])[path], value, err_msg=path)
    return {path for path, value in tree.flatten(before["trainable"]).items()
            if np.abs(tree.flatten(after["trainable"])[path] - value).max() > 0}


# ---------------------------------------------------------------------------------------------
# PVP: pretrain the prompt, then tune it
# ---------------------------------------------------------------------------------------------


def _pvp_config(arg: str, data_dir: str):
    from configs import minilm_pvp

    config = minilm_pvp.get_config(arg)
    config.data.options = dict(max_length=16)
    config.data.data_dir = data_dir
    config.model.pretrained = ""  # a tiny random trunk: both stages share it through the run
    config.model.overrides = dict(num_classes=2, vocab_size=30522, hidden_size=32, num_heads=4,
                                  mlp_dim=64, num_layers=1, max_length=64, hidden_dropout=0.0,
                                  attention_dropout=0.0)
    config.train.update(steps=2, batch_size=8, log_every=1, final_eval_splits=(),
                        tensorboard=False)
    config.checkpoint.every = 2
    return config


def test_pvp_tune_stage_starts_from_the_pretrained_prompt(tmp_path, data_dir):
    def first_prompt(config):
        setup = loop.make_setup(config, loop.build_model(config), 2,
                                devices=jax.devices()[:1])
        params = jax.device_get(loop.init_params(config, setup, loop.init_key(config)))
        return tree.flatten(params)["embeddings/prompt"]

    def last_prompt(workdir):
        return tree.flatten(jax.device_get(checkpoint.final_params(str(workdir))))[
            "embeddings/prompt"]

    pretrain = _pvp_config("stage=pretrain,quick", data_dir)
    assert pretrain.data.name == "rotten_tomatoes/subjectivity"
    loop.train(pretrain, str(tmp_path / "pretrain"))
    pretrained = last_prompt(tmp_path / "pretrain")
    assert pretrained.shape == (20, 32)

    tune = _pvp_config(f"stage=tune,quick,init_from={tmp_path / 'pretrain'}", data_dir)
    assert tune.data.name == "rotten_tomatoes/sentiment"
    np.testing.assert_array_equal(first_prompt(tune), pretrained)
    loop.train(tune, str(tmp_path / "tune"))
    assert gap(last_prompt(tmp_path / "tune"), pretrained) > 0  # and the tune stage trains it

    baseline = _pvp_config("stage=tune,quick", data_dir)
    assert gap(first_prompt(baseline), pretrained) > 1e-3


def test_pvp_config_arguments():
    from configs import minilm_pvp

    config = minilm_pvp.get_config("stage=tune,init_from=runs/a,shots=32")
    assert config.model.init_from == "runs/a" and config.method.name == "prompt_tuning"
    assert config.data.train_options.shard_count == 10202 // 32
    with pytest.raises(ValueError, match=r"stage='tuning' is not one of \['pretrain', 'tune'\]"):
        minilm_pvp.get_config("stage=tuning")
    with pytest.raises(ValueError, match=r"init_from and shots are for stage=tune"):
        minilm_pvp.get_config("stage=pretrain,init_from=runs/a")


# ---------------------------------------------------------------------------------------------
# IAPT
# ---------------------------------------------------------------------------------------------


def numpy_rational(x, a, b):
    x = np.asarray(x, np.float64)
    top = sum(coefficient * x ** j for j, coefficient in enumerate(a))
    bottom = 1 + sum(abs(coefficient) * np.abs(x) ** k for k, coefficient in enumerate(b, 1))
    return top / bottom


def numpy_generate(leaves: dict, hidden, mask):
    f = {k: np.asarray(v, np.float64) for k, v in leaves.items()}
    z = np.asarray(hidden, np.float64) @ f["down/kernel"] + f["down/bias"]
    scores = np.einsum("mr,blr->bml", f["queries"], z) / np.sqrt(z.shape[-1])
    scores = np.where(mask[:, None, :] > 0, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    pooled = np.einsum("bml,blr->bmr", weights, z)
    activated = numpy_rational(pooled, f["rational/numerator"], f["rational/denominator"])
    return activated @ f["up/kernel"] + f["up/bias"]


def test_iapt_rational_is_its_formula_and_starts_as_gelu():
    rng = np.random.default_rng(0)
    x = rng.normal(0.0, 2.0, (4, 7)).astype(np.float32)
    a, b = rng.normal(size=6).astype(np.float32), rng.normal(size=4).astype(np.float32)
    assert (b < 0).any()  # the denominator reads |b_k|
    assert gap(iapt_lib.rational(jnp.asarray(x), jnp.asarray(a), jnp.asarray(b)),
               numpy_rational(x, a, b)) < 1e-4
    grid = np.linspace(-3, 3, 601)
    fitted = iapt_lib.rational(jnp.asarray(grid, jnp.float32), *map(jnp.asarray,
                                                                   iapt_lib.GELU_FIT))
    assert gap(fitted, 0.5 * grid * (1 + erf(grid / np.sqrt(2)))) < 4e-3


def _iapt_moved(bert, seed=1):
    """IAPT on the tiny BERT with every generator leaf randomised (W_up no longer zero)."""
    model, params = bert
    method = IAPT(num_virtual_tokens=M, bottleneck=8)
    adapted = method.init(jax.random.key(0), params)
    rng = np.random.default_rng(seed)
    adapted = tree.map_with_path(
        lambda p, x: x + jnp.asarray(rng.normal(0.0, 0.5, x.shape), jnp.float32)
        if p.startswith("iapt/") else x, adapted)
    return model, method, adapted


def _layer_inputs(model, method, params, *inputs) -> dict:
    """Each layer's input (prompt rows first), as its attention reads it (post-LN BERT)."""
    seen = {}

    def record(call):
        seen[sites.parent(call.path)] = call.inputs
        return call.output()
    with sites.intercept(record, sites.at({f"encoder/layer_{i}/attn" for i in range(2)})):
        outputs = method.apply(model.module, {"params": params}, *inputs).outputs
    return seen, outputs


def test_iapt_prompts_come_from_each_layers_input(bert):
    model, method, adapted = _iapt_moved(bert)
    ids, mask, types = text_batch([12, 12, 9], 12)
    ids[1], mask[1] = ids[0], mask[0]  # rows 0 and 1 the same input, row 2 another
    seen, outputs = _layer_inputs(model, method, adapted, ids, mask, types)
    for layer in ("encoder/layer_0", "encoder/layer_1"):
        x = np.asarray(seen[layer])
        assert x.shape == (3, M + 12, 32)
        np.testing.assert_array_equal(x[0, :M], x[1, :M], err_msg=layer)
        assert gap(x[0, :M], x[2, :M]) > 1e-2, layer
        # One layer's generator by hand: from its real rows, padding left out of the pooling.
        leaves = method.generators(tree.flatten(adapted))[layer]
        assert gap(x[:, :M], numpy_generate(leaves, x[:, M:], mask)) < 1e-4, layer
    assert gap(seen["encoder/layer_0"][:, :M], seen["encoder/layer_1"][:, :M]) > 1e-2

    # The same sentence with more padding gets the same prompts and the same output; the
    # classifier reads [CLS], not a prompt row.
    longer = [np.pad(a, ((0, 0), (0, 5))) for a in (ids, mask, types)]
    seen_longer, outputs_longer = _layer_inputs(model, method, adapted, *longer)
    for layer in seen:
        assert gap(seen_longer[layer][:, :M], seen[layer][:, :M]) < 1e-5
    assert gap(outputs_longer, outputs) < 1e-5
    assert outputs.shape == (3, 2)


def test_iapt_starts_as_prefix_tuning_on_the_key_and_value_biases(bert):
    """W_up = 0, b_up = 0: every prompt is zero, which each layer projects to its key and value
    biases alone; real tokens keep their positions (``positions=None``)."""
    model, params = bert
    method = IAPT(num_virtual_tokens=M, bottleneck=8, also_train=HEAD)
    adapted = method.init(jax.random.key(0), params)
    ids, mask, types = text_batch([12, 8, 5], 12, seed=2)
    seen, ours = _layer_inputs(model, method, adapted, ids, mask, types)
    for layer in seen:
        np.testing.assert_array_equal(seen[layer][:, :M], 0.0)
    flat = tree.flatten(params)
    prefixes = {f"encoder/layer_{i}/attn/{side}/prefix": jnp.broadcast_to(
        flat[f"encoder/layer_{i}/attn/{side}/bias"], (M, 4, 8))
        for i in range(2) for side in ("key", "value")}
    prefix = PrefixTuning(num_virtual_tokens=M, positions=None)
    theirs = prefix.apply(model.module, {"params": tree.unflatten({**flat, **prefixes})},
                          ids, mask, types).outputs
    assert gap(ours, theirs) < 1e-5
    assert gap(ours, model.module.apply({"params": params}, ids, mask, types)) > 1e-3


def test_iapt_leaves_axes_and_what_trains():
    shapes = models.build("minilm_l6_classifier", num_classes=2).param_shapes()
    method = IAPT(also_train=HEAD)
    added = {p: v.shape for p, v in tree.flatten(jax.eval_shape(
        method.init, jax.random.key(0), shapes)).items() if p.startswith("iapt/")}
    assert added["iapt/layer_5/down/kernel"] == (384, 32)
    assert added["iapt/layer_0/queries"] == (4, 32)
    assert added["iapt/layer_3/rational/denominator"] == (4,)
    assert sum(int(np.prod(s)) for s in added.values()) == 6 * (2 * 384 * 32 + 32 + 384 + 4 * 32
                                                               + 10)
    logical = tree.flatten(method.logical_axes({}, tree.unflatten(added)))
    assert logical["iapt/layer_2/up/kernel"] == (None, "embed")

    config = tiny_classifier_config(dict(name="iapt", num_virtual_tokens=2, bottleneck=4,
                                         also_train=HEAD), layers=2)
    ids, mask, types = text_batch([16, 9, 12, 16, 5, 7, 16, 10], 16)
    # The first step moves W_up and b_up alone (the rest gets gradient through W_up): two.
    before, after = train_steps(config, {"input_ids": ids, "attention_mask": mask,
                                         "token_type_ids": types,
                                         "label": np.arange(8, dtype=np.int32) % 2}, steps=2)
    own = {f"iapt/layer_{i}/{leaf}" for i in range(2) for leaf in iapt_lib.AXES}
    assert moved_leaves(before, after) == set(tree.flatten(before["trainable"])) == own | {
        "classifier/kernel", "classifier/bias"}


def test_iapt_config_file_builds_the_method():
    from configs import minilm_iapt

    config = minilm_iapt.get_config("quick")
    method = methods.build(config.method)
    assert type(method) is IAPT and config.train.steps == 4
    assert (method.num_virtual_tokens, method.bottleneck, method.also_train) == (4, 32, HEAD)


def test_iapt_bad_input_is_a_one_line_error(bert):
    model, params = bert
    for key in ("num_virtual_tokens", "bottleneck"):
        with pytest.raises(ValueError, match=rf"^config.method.{key}=0 is not a positive "):
            methods.build(dict(name="iapt", **{key: 0}))
    with pytest.raises(ValueError, match=r"^iapt encoder='decoder' holds no layers \(no "
                                         r"decoder/layer_\{i\}/attn/query/kernel\); closest: "
                                         r"encoder/layer_0/attn/query/kernel") as info:
        IAPT(encoder="decoder").init(jax.random.key(0), params)
    one_line(info)
    ids, mask, types = text_batch([8, 6], 8)
    with pytest.raises(ValueError, match=r"generator leaf 'iapt/layer_0/down/kernel' is not in "
                                         r"the params \(run init first\)"):
        IAPT().apply(model.module, {"params": params}, ids, mask, types)
    adapted = IAPT(num_virtual_tokens=M).init(jax.random.key(0), params)
    with pytest.raises(ValueError, match=r"iapt/layer_0/queries is \(3, 32\), not \(4, 32\) "
                                         r"for num_virtual_tokens=4, bottleneck=32"):
        IAPT().apply(model.module, {"params": adapted}, ids, mask, types)
    llama = models.build("llama_tiny_lm", **LLAMA)
    method = IAPT(encoder="decoder")
    with pytest.raises(ValueError, match=r"^iapt pools every layer's prompts from the whole "
                                         r"input, which a causal model's tokens must not see"):
        method.apply(llama.module, {"params": method.init(jax.random.key(0), random_params(
            llama))}, ids, mask)


# ---------------------------------------------------------------------------------------------
# PET
# ---------------------------------------------------------------------------------------------

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "it", "was", ".", "great", "terrible",
         "good", "fan", "##tastic", "all", "in", "!"]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    """A 100-token WordPiece vocabulary for the tiny BERT ([PAD]=0 ... [MASK]=4)."""
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(WORDS + [f"w{i}" for i in range(100 - len(WORDS))]) + "\n")
    return str(path)


def numpy_cloze(before, after, ids, mask):
    """The cloze rows, mask positions and real-token counts, built row by row."""
    rows, masks, positions = [], [], []
    for row, real in zip(ids, mask.sum(1)):
        tokens = [row[0], *before, *row[1:real - 1], *after, row[real - 1]]
        positions.append(tokens.index(WORDS.index("[MASK]")))
        width = ids.shape[1] + len(before) + len(after)
        rows.append(tokens + [0] * (width - len(tokens)))
        masks.append([1] * len(tokens) + [0] * (width - len(tokens)))
    return np.asarray(rows), np.asarray(masks), np.asarray(positions)


@pytest.mark.parametrize("pattern, before, after", [
    ("{text} It was [MASK].", [], ["it", "was", "[MASK]", "."]),
    ("[MASK]! {text}", ["[MASK]", "!"], []),
    ("it was [MASK] . {text} all in", ["it", "was", "[MASK]", "."], ["all", "in"])])
def test_pet_pattern_puts_the_mask_where_expected(vocab, pattern, before, after):
    method = PET(pattern=pattern, vocab=vocab)
    before, after = [WORDS.index(w) for w in before], [WORDS.index(w) for w in after]
    assert (method.tokens.before, method.tokens.after) == (tuple(before), tuple(after))
    ids, mask, types = text_batch([10, 6, 2, 3], 10)
    types[0, 4:] = 1  # token types of the text travel with it
    got_ids, got_mask, got_types, positions = map(np.asarray, pet_lib.cloze(
        method.tokens, ids, mask, types))
    want_ids, want_mask, want_positions = numpy_cloze(before, after, ids, mask)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_array_equal(got_mask, want_mask)
    np.testing.assert_array_equal(positions, want_positions)
    assert (got_ids[np.arange(4), positions] == WORDS.index("[MASK]")).all()
    # Row 0's text tokens 4..8 and its [SEP] keep type 1; pattern tokens get 0.
    assert got_types[0].sum() == 6 and got_types[1:].sum() == 0
    assert got_types[0, 1 + len(before) + 3: 1 + len(before) + 8].all()
    assert got_types[0, 8 + len(before) + len(after) + 1] == 1


def test_pet_scores_are_the_verbaliser_mlm_logits_at_the_mask(bert, vocab):
    """Against BERT's masked-LM model on the cloze (same trunk, the method's head), and the
    head by hand in numpy from the encoder's mask row."""
    model, params = bert
    method = PET(verbalizer=("terrible", "great"), vocab=vocab)
    adapted = tree.map_with_path(  # a head that is not at its init
        lambda p, x: x + 0.3 * jnp.asarray(np.random.default_rng(1).normal(size=x.shape),
                                            jnp.float32) if p.startswith("mlm/") else x,
        method.init(jax.random.key(0), params))
    ids, mask, types = text_batch([12, 7, 4], 12, seed=3)
    seen = {}

    def record(call):
        seen[call.path] = out = call.output()
        return out
    with sites.intercept(record, sites.at({"encoder"})):
        ours = np.asarray(method.apply(model.module, {"params": adapted}, ids, mask,
                                       types).outputs)
    assert ours.shape == (3, 2)

    cloze_ids, cloze_mask, positions = numpy_cloze([], [5, 6, 4, 7], ids, mask)
    mlm = models.build("bert_tiny_mlm", **TINY)
    flat = tree.flatten(adapted)
    logits = mlm.module.apply({"params": tree.unflatten(
        {p: flat[p] for p in tree.flatten(mlm.param_shapes())})}, cloze_ids, cloze_mask,
        np.zeros_like(cloze_ids))
    verbaliser = [WORDS.index("terrible"), WORDS.index("great")]
    np.testing.assert_allclose(ours, np.asarray(logits)[np.arange(3), positions][:, verbaliser],
                               atol=1e-5)

    f = {p: np.asarray(v, np.float64) for p, v in flat.items()}
    h = np.asarray(seen["encoder"], np.float64)[np.arange(3), positions]
    u = h @ f["mlm/transform/kernel"] + f["mlm/transform/bias"]
    u = 0.5 * u * (1 + erf(u / np.sqrt(2)))
    u = (u - u.mean(-1, keepdims=True)) / np.sqrt(u.var(-1, keepdims=True) + 1e-12)
    u = u * f["mlm/transform_norm/scale"] + f["mlm/transform_norm/bias"]
    head = u @ f["embeddings/word/embedding"][verbaliser].T + f["mlm/bias"][verbaliser]
    np.testing.assert_allclose(ours, head, atol=1e-4)


def test_pet_trains_its_head_and_what_it_is_told(vocab):
    config = tiny_classifier_config(dict(name="pet", vocab=vocab, also_train=(r"encoder/.*",)),
                                    vocab_size=100)
    ids, mask, types = text_batch([16, 9, 12, 16, 5, 7, 16, 10], 16)
    before, after = train_steps(config, {"input_ids": ids, "attention_mask": mask,
                                      "token_type_ids": types,
                                      "label": np.arange(8, dtype=np.int32) % 2})
    trainable = set(tree.flatten(before["trainable"]))
    assert {p for p in trainable if p.startswith("mlm/")} == {
        f"mlm/{leaf}" for leaf in pet_lib.AXES}
    assert {p for p in trainable if not p.startswith("mlm/")} == {
        p for p in {*tree.flatten(before["frozen"]), *trainable} if p.startswith("encoder/")}
    assert "classifier/kernel" in tree.flatten(before["frozen"])  # bypassed, never trained
    assert moved_leaves(before, after) == trainable


def test_pet_config_file_builds_a_few_shot_run():
    from configs import minilm_pet

    config = minilm_pet.get_config("quick")
    method = methods.build(config.method)
    assert type(method) is PET and config.train.steps == 4
    assert method.tokens.label_ids == (6659, 2307)  # MiniLM's "terrible", "great"
    assert method.tokens.after == (2009, 2001, 103, 1012)  # it was [MASK] .
    shards = config.data.train_options.shard_count
    assert 10202 // shards == 32 and config.train.batch_size == 16
    assert minilm_pet.get_config(None).train.steps == 250
    shapes = models.build("minilm_l6_classifier", num_classes=2).param_shapes()
    added = tree.flatten(jax.eval_shape(method.init, jax.random.key(0), shapes))
    assert sum(int(np.prod(added[p].shape)) for p in added if p.startswith("mlm/")) == (
        384 * 384 + 3 * 384 + 30522)


def test_pet_bad_input_is_a_one_line_error(bert, vocab):
    model, params = bert
    for verbalizer, reads in ((("terrible", "fantastic"), r"\['fan', '##tastic'\]"),
                              (("terrible", "superb"), r"\['\[UNK\]'\]")):
        with pytest.raises(ValueError, match=rf"^config.method.verbalizer: '{verbalizer[1]}' "
                                             rf"is not one token of .*vocab.txt \(it reads as "
                                             rf"{reads}\)") as info:
            PET(verbalizer=verbalizer, vocab=vocab)
        one_line(info)
    with pytest.raises(ValueError, match=r"^config.method.pattern='\{text\} It was good.' must "
                                         r"hold one \[MASK\] slot \(it has 0\)") as info:
        PET(pattern="{text} It was good.", vocab=vocab)
    one_line(info)
    with pytest.raises(ValueError, match=r"pattern='\[MASK\] \[MASK\] \{text\}' must hold one "
                                         r"\[MASK\] slot \(it has 2\)"):
        PET(pattern="[MASK] [MASK] {text}", vocab=vocab)
    with pytest.raises(ValueError, match=r"^config.method.pattern='It was \[MASK\].' must hold "
                                         r"the input's slot \{text\} exactly once"):
        PET(pattern="It was [MASK].", vocab=vocab)
    with pytest.raises(ValueError, match=r"verbalizer='great' must list one word per label"):
        PET(verbalizer="great", vocab=vocab)
    with pytest.raises(ValueError, match=r"verbalizer=\('great', 'great'\) names a token twice"):
        PET(verbalizer=("great", "great"), vocab=vocab)

    ids, mask, types = text_batch([8, 6], 8)
    three = PET(verbalizer=("terrible", "good", "great"), vocab=vocab)
    with pytest.raises(ValueError, match=r"^config.method.verbalizer has 3 words; the model has "
                                         r"num_classes=2"):
        three.apply(model.module, {"params": three.init(jax.random.key(0), params)}, ids, mask,
                    types)
    method = PET(vocab=vocab)
    adapted = method.init(jax.random.key(0), params)
    with pytest.raises(ValueError, match=r"^pet head leaf 'mlm/transform/kernel' is not in the "
                                         r"params \(run init first\)"):
        method.apply(model.module, {"params": params}, ids, mask, types)
    long = text_batch([30], 30)
    with pytest.raises(ValueError, match=r"^pet: sequence length 30 plus the pattern's 4 tokens "
                                         r"exceeds the model's max_length=32"):
        method.apply(model.module, {"params": adapted}, *long)
    with pytest.raises(ValueError, match=r"^pet: token id \d+ of the pattern or verbaliser is "
                                         r"outside the 100-row embeddings/word/embedding"):
        PET().init(jax.random.key(0), params)  # MiniLM's vocabulary on a 100-token model
    encoder = models.build("bert_tiny_encoder", **TINY)
    trunk = {k: v for k, v in adapted.items() if k != "classifier"}
    with pytest.raises(ValueError, match=r"^pet classifier='classifier' is not a module of this "
                                         r"model"):
        method.apply(encoder.module, {"params": trunk}, ids, mask, types)


# ---------------------------------------------------------------------------------------------
# Personalised models (Zlotchevski et al.): only the named parts change
# ---------------------------------------------------------------------------------------------

LIGHTWEIGHT = {r"embeddings/word/embedding", r"lm_head/kernel"}
LAST_LAYER = {r"decoder/layer_1/.*", r"decoder/final_norm/scale", r"lm_head/kernel"}
PREFIX = {r"decoder/layer_\d/attn/(key|value)/prefix"}


@pytest.mark.parametrize("name, named", [("lightweight", LIGHTWEIGHT),
                                          ("last_layer", LAST_LAYER), ("prefix", PREFIX)])
def test_personalisation_configs_train_only_their_named_parts(name, named):
    from research.train import config as config_lib

    config = config_lib.load(os.path.join(ROOT, f"configs/llama_shakespeare_{name}.py:quick"))
    with config.unlocked():
        config.model.overrides = {**config.model.overrides, **LLAMA}
        config.mesh = dict(data=1)
    assert config.data.name == "shakespeare" and config.model.name == "llama_tiny_lm"
    assert config.data.train_options.to_dict() == dict(shard_index=0, shard_count=8)
    ids = np.random.default_rng(0).integers(0, 256, (8, 24)).astype(np.int32)
    before, after = train_steps(config, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    every = set(tree.flatten(before["trainable"])) | set(tree.flatten(before["frozen"]))
    expected = {p for p in every if any(re.fullmatch(r, p) for r in named)}
    assert len(expected) == {"lightweight": 2, "last_layer": 11, "prefix": 4}[name]
    assert moved_leaves(before, after) == set(tree.flatten(before["trainable"])) == expected
