"""PANDA as a tree transform: the target prompt (and head) start from the source run's; the
distillation term is T² · KL between the teacher's and the student's softened outputs (numpy),
or the logit MSE; it is 0 while the student is the teacher; the teacher gets no gradient; the
export is a prompt-tuning run's params; a real source run is read through ``prepare`` and its
first step distils nothing; bad input is a one-line error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research import methods, models, tree
from research.adapters.panda import TEACHER, Panda, distillation_loss
from research.adapters.prompts import PromptTuning
from research.train import loop
from tests.tiny_bert import token_batch, gap

TINY = dict(hidden_size=32, num_heads=4, mlp_dim=64, num_layers=2, vocab_size=100,
            max_length=32, hidden_dropout=0.0, attention_dropout=0.0, num_classes=3)
HEAD = (r"classifier/.*",)
N = 4


def random_tree(shapes, seed=0, scale=0.2):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, scale, s.shape), jnp.float32),
                        shapes)


@pytest.fixture(scope="module")
def tiny():
    """The model, its frozen params, and a source run's export: another prompt and head."""
    model = models.build("bert_tiny_classifier", **TINY)
    base = random_tree(model.param_shapes())
    rng = np.random.default_rng(5)
    source = dict(tree.flatten(base))
    source["embeddings/prompt"] = rng.normal(0.0, 0.5, (N, 32)).astype(np.float32)
    source["classifier/kernel"] = rng.normal(0.0, 0.5, (32, 3)).astype(np.float32)
    source["classifier/bias"] = rng.normal(0.0, 0.5, (3,)).astype(np.float32)
    source["encoder/layer_0/mlp/wi/kernel"] = np.zeros((32, 64), np.float32)  # not the teacher's
    return model, base, tree.unflatten(source)


def panda(source, **options) -> Panda:
    return Panda(source="source_run", num_virtual_tokens=N, also_train=HEAD,
                 **options).with_source(source)


def moved(params, seed=3, scale=0.3):
    """The student's prompt and head moved away from the teacher's."""
    rng = np.random.default_rng(seed)
    return tree.map_with_path(
        lambda p, x: x + jnp.asarray(rng.normal(0.0, scale, x.shape), x.dtype)
        if p in ("embeddings/prompt", "classifier/kernel", "classifier/bias") else x, params)


def train_apply(method, model, params, inputs):
    return method.apply(model.module, {"params": params}, *inputs, deterministic=False,
                        rngs={"dropout": jax.random.key(0)})


def test_the_student_starts_as_the_teacher(tiny):
    model, base, source = tiny
    method = panda(source)
    assert set(method.source_leaves) == {"embeddings/prompt", "classifier/kernel",
                                         "classifier/bias"}
    params = tree.flatten(method.init(jax.random.key(0), base))
    for path in method.source_leaves:
        np.testing.assert_array_equal(params[path], tree.flatten(source)[path])
        np.testing.assert_array_equal(params[f"{TEACHER}/{path}"], tree.flatten(source)[path])
    # Only the teacher's leaves come from the source run; the frozen model is the run's own.
    np.testing.assert_array_equal(params["encoder/layer_0/mlp/wi/kernel"],
                                  base["encoder"]["layer_0"]["mlp"]["wi"]["kernel"])
    applied = train_apply(method, model, tree.unflatten(params), token_batch())
    assert float(applied.losses["distillation"]) == 0.0
    assert method.trainable_for(params) == ("embeddings/prompt", *HEAD)


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_the_distillation_term_is_its_formula(tiny, kind):
    model, base, source = tiny
    method = panda(source, temperature=3.0, weight=0.7, distillation=kind)
    params = moved(method.init(jax.random.key(0), base))
    inputs = token_batch()
    applied = train_apply(method, model, params, inputs)
    plain = PromptTuning(num_virtual_tokens=N)
    student = np.asarray(plain.apply(model.module, {"params": method.export(params)},
                                     *inputs).outputs, np.float64)
    teacher_params = tree.unflatten({**tree.flatten(base), **{
        p: v for p, v in tree.flatten(source).items()
        if p in ("embeddings/prompt", "classifier/kernel", "classifier/bias")}})
    teacher = np.asarray(plain.apply(model.module, {"params": teacher_params}, *inputs).outputs,
                         np.float64)
    np.testing.assert_allclose(applied.outputs, student, rtol=1e-5, atol=1e-6)
    if kind == "kl":
        def log_softmax(z):
            z = z / 3.0
            return z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
                - z.max(-1, keepdims=True)
        p_teacher = np.exp(log_softmax(teacher))
        kl = (p_teacher * (log_softmax(teacher) - log_softmax(student))).sum(-1)
        expected = 0.7 * 9.0 * kl.mean()
    else:
        expected = 0.7 * ((student - teacher) ** 2).mean()
    assert expected > 1e-3
    np.testing.assert_allclose(float(applied.losses["distillation"]), expected, rtol=1e-4)
    # Evaluation runs the student alone.
    assert method.apply(model.module, {"params": params}, *inputs).losses == {}


def test_distillation_of_equal_logits_is_zero():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)), jnp.float32)
    for kind in ("kl", "mse"):
        assert float(distillation_loss(logits, logits, 2.0, kind)) == 0.0


def test_the_teacher_gets_no_gradient(tiny):
    model, base, source = tiny
    method = panda(source)
    params = moved(method.init(jax.random.key(0), base))
    inputs = token_batch()

    def term(p):
        return train_apply(method, model, p, inputs).losses["distillation"]

    grads = tree.flatten(jax.grad(term)(params))
    for path, grad in grads.items():
        if path.startswith(TEACHER + "/"):
            assert float(jnp.abs(grad).max()) == 0.0, path
    assert float(jnp.abs(grads["embeddings/prompt"]).max()) > 1e-6
    # Without the stop, the same term would pull the teacher too: the zero is the stop's.
    params_flat = tree.flatten(params)
    free = {p: params_flat[p] for p in params_flat if p.startswith(TEACHER + "/")}

    def unstopped(teacher):
        student = PromptTuning(num_virtual_tokens=N).apply(
            model.module, {"params": method.export(params)}, *inputs).outputs
        as_model = {p[len(TEACHER) + 1:]: v for p, v in teacher.items()}
        logits = PromptTuning(num_virtual_tokens=N).apply(
            model.module, {"params": tree.unflatten({**params_flat, **as_model})},
            *inputs).outputs
        return distillation_loss(student, logits, method.temperature)
    assert max(float(jnp.abs(g).max()) for g in jax.grad(unstopped)(free).values()) > 1e-6


def test_export_is_a_prompt_tuning_run(tiny):
    model, base, source = tiny
    method = panda(source)
    params = moved(method.init(jax.random.key(0), base))
    exported = method.export(params)
    assert set(tree.flatten(exported)) - set(tree.flatten(base)) == {"embeddings/prompt"}
    inputs = token_batch()
    assert gap(PromptTuning(num_virtual_tokens=N).apply(model.module, {"params": exported},
                                                        *inputs).outputs,
               method.apply(model.module, {"params": params}, *inputs).outputs) < 1e-6


def _tiny_config(method: dict):
    from configs import common

    config = common.base_config()
    config.data.name = "rotten_tomatoes/subjectivity"
    config.model.name = "bert_tiny_classifier"
    config.model.overrides = dict(num_classes=2, vocab_size=1000, hidden_size=32, num_heads=4,
                                  mlp_dim=64, num_layers=1, hidden_dropout=0.0,
                                  attention_dropout=0.0)
    config.train.batch_size = 8
    config.train.steps = 2
    config.train.tensorboard = False
    config.train.final_eval_splits = ()
    config.optim.learning_rate = 1e-2
    config.optim.schedule = "constant"
    config.mesh = dict(data=-1)
    config.checkpoint.every = 2
    config.method = method
    return config


def test_a_real_source_run_is_read_through_prepare(tmp_path, monkeypatch):
    # The source: prompt tuning, trained two steps on fake batches (the run's own stream is
    # swapped for them: the teacher, not the data, is what is tested here).
    rng = np.random.default_rng(0)

    def fake_loader(config, split, **kwargs):
        del config, split, kwargs

        class Stream:
            sampler = None

            def __iter__(self):
                while True:
                    yield {"input_ids": rng.integers(1, 1000, (8, 16)).astype(np.int32),
                           "attention_mask": np.ones((8, 16), np.int32),
                           "token_type_ids": np.zeros((8, 16), np.int32),
                           "label": rng.integers(0, 2, (8,)).astype(np.int32)}
        return Stream()
    monkeypatch.setattr(loop, "make_loader", fake_loader)
    source_dir = str(tmp_path / "source")
    loop.train(_tiny_config(dict(name="prompt_tuning", num_virtual_tokens=N,
                                 also_train=HEAD)), source_dir)
    trained = tree.flatten(loop.exported_params(source_dir))

    config = _tiny_config(dict(name="panda", source=source_dir, num_virtual_tokens=N,
                               also_train=HEAD))
    setup = loop.make_setup(config, loop.build_model(config), 2)
    state = loop.init_state(config, setup)
    start = tree.flatten(jax.device_get(state["trainable"]))
    for path in ("embeddings/prompt", "classifier/kernel", "classifier/bias"):
        np.testing.assert_array_equal(start[path], trained[path], err_msg=path)
    state, sums = loop.make_train_step(setup)(state, next(iter(fake_loader(None, None))))
    assert float(sums["distillation"]) == 0.0  # the student is still the teacher
    state, sums = loop.make_train_step(setup)(state, next(iter(fake_loader(None, None))))
    assert float(sums["distillation"]) > 0.0
    frozen = tree.flatten(jax.device_get(state["frozen"]))
    np.testing.assert_array_equal(frozen[f"{TEACHER}/embeddings/prompt"],
                                  trained["embeddings/prompt"])


def test_config_file_builds_a_panda_method():
    from configs import minilm_panda

    config = minilm_panda.get_config("quick,source=/runs/src,task=subjectivity")
    method = methods.build(config.method)
    assert isinstance(method, Panda) and config.train.steps == 4
    assert method.source == "/runs/src" and config.data.name == "rotten_tomatoes/subjectivity"
    assert method.num_virtual_tokens == 20 and method.also_train == HEAD
    assert (method.temperature, method.weight, method.distillation) == (2.0, 1.0, "kl")


def test_bad_input_is_a_one_line_error(tiny, tmp_path):
    model, base, source = tiny
    for options, match in [
            (dict(), "config.method.source must be"),
            (dict(source="s", temperature=0.0), "config.method.temperature=0.0"),
            (dict(source="s", weight=-1.0), "config.method.weight=-1.0"),
            (dict(source="s", distillation="js"), "config.method.distillation='js'")]:
        with pytest.raises(ValueError, match=match) as info:
            methods.build(dict(name="panda", **options))
        assert "\n" not in str(info.value)
    context = methods.Context(None, model, lambda: base, lambda: iter(()),
                              lambda workdir, key="": base)
    with pytest.raises(FileNotFoundError, match="config.method.source=.*no checkpoints") as info:
        Panda(source=str(tmp_path)).prepare(context)
    assert "\n" not in str(info.value)
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(ValueError, match="has no prompt 'embeddings/prompt'") as info:
        Panda(source=str(tmp_path)).prepare(context)
    assert "\n" not in str(info.value)
    bad = [
        (Panda(source="s", num_virtual_tokens=N + 1).with_source(source),
         r"'embeddings/prompt' has shape \(4, 32\), this run needs \(5, 32\)"),
        (Panda(source="s", num_virtual_tokens=N, source_leaves={
             "embeddings/prompt": np.zeros((N, 32)), "head/kernel": np.zeros((2, 2))}),
         "'head/kernel' is not a param of this model"),
        (Panda(source="s"), "panda has not read its teacher"),
    ]
    for method, match in bad:
        with pytest.raises(ValueError, match=match) as info:
            method.init(jax.random.key(0), base)
        assert "\n" not in str(info.value)
    student = panda(source).export(panda(source).init(jax.random.key(0), base))
    with pytest.raises(ValueError, match="teacher's leaves panda_teacher/... are not") as info:
        train_apply(panda(source), model, student, token_batch())
    assert "\n" not in str(info.value)
