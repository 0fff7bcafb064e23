"""flax_textvae.load(workdir) (alias TextVAE.load): the text-level inference API on a real (tiny) trained run."""

import json
import shutil
import warnings

import numpy as np
import pytest
from _trained_run import trained_run

from flax_textvae import TextVAE, inference
from flax_textvae.data import read_examples, synthetic_vocabulary

N = 3  # every call decodes 3 rows, so greedy compiles once for all of them


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    return trained_run(tmp_path_factory)


@pytest.fixture(scope="module")
def vae(tiny_run):
    return TextVAE.load(tiny_run[1])


@pytest.fixture(scope="module")
def train_texts(tiny_run):
    config, _ = tiny_run
    return read_examples(config.data.train)[0][:N]


def _strings(outs, n):
    assert isinstance(outs, list) and len(outs) == n
    assert all(isinstance(s, str) for s in outs)


def test_load_restores_the_newest_checkpoint(vae, tiny_run):
    config, _ = tiny_run
    assert isinstance(vae, inference.TrainedTextVAE)
    assert vae.step == config.train_steps
    assert vae.latent_size == config.vae.latent_size


def test_load_of_a_non_run_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a flax_textvae run directory"):
        TextVAE.load(str(tmp_path))


def test_encode_shapes_and_determinism(vae, train_texts):
    mean, logvar = vae.encode(train_texts)
    assert mean.shape == logvar.shape == (N, vae.latent_size)
    assert np.all(np.isfinite(mean)) and np.all(np.isfinite(logvar))
    m1, _ = vae.encode(train_texts[:1])
    np.testing.assert_allclose(m1[0], mean[0], rtol=1e-5, atol=1e-6)  # padding to the batch's longest is masked
    single, _ = vae.encode(train_texts[0])  # a bare string is one text
    assert single.shape == (1, vae.latent_size)
    # no texts: empty results of the right shapes, not an error from the batcher
    empty_mean, empty_logvar = vae.encode([])
    assert empty_mean.shape == empty_logvar.shape == (0, vae.latent_size)
    assert vae.reconstruct([]) == [] and vae.decode(np.zeros((0, vae.latent_size))) == []


def test_encode_of_many_texts_batches_them_and_equals_each_text_alone(vae, tiny_run):
    """Any number of texts goes through a few jitted batch shapes (rows a power of two, lengths a multiple of
    8), each text's code equal to what the module gives for that text alone, unpadded and not jitted."""
    import jax.numpy as jnp

    from flax_textvae import data as data_lib
    from flax_textvae.vae import TextVAE as Module

    config, _ = tiny_run
    texts = read_examples(config.data.train)[0][:37]  # 37 = 16 + 16 + 5 at batch 16: a short last batch
    run = vae.run
    run._encode_fn = None  # count only this call's programs (the module's other tests share the run)
    mean, logvar = run.encode_texts(vae.params, texts, batch_size=16)
    assert mean.shape == logvar.shape == (37, vae.latent_size)
    ids, _ = data_lib.encode_texts(run.tokenizer, texts, run.max_length)
    assert len({len(x) for x in ids}) > 3  # the texts differ in length, so padding is exercised
    for i in (0, 15, 16, 31, 32, 36):
        x = jnp.asarray(np.asarray(ids[i], np.int32)[None])
        m, lv = run.model.apply({"params": vae.params}, x, jnp.ones_like(x), method=Module.encode)
        np.testing.assert_allclose(mean[i], np.asarray(m)[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(logvar[i], np.asarray(lv)[0], rtol=1e-5, atol=1e-5)
    # three batches, at most one program per (rows, length) shape: 16 rows twice, 8 rows for the last five
    assert run._encode_fn._cache_size() <= 3
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        run.encode_texts(vae.params, texts, batch_size=0)


def test_reconstruct_sample_interpolate(vae, train_texts):
    _strings(vae.reconstruct(train_texts), N)
    _strings(vae.sample(N, seed=0), N)
    _strings(vae.interpolate(train_texts[0], train_texts[1], steps=N), N)
    with pytest.raises(ValueError, match="at least 2"):
        vae.interpolate(train_texts[0], train_texts[1], steps=1)


def test_interpolation_end_points_are_the_reconstructions(vae, train_texts):
    a, b = train_texts[:2]
    line = vae.interpolate(a, b, steps=N)
    rec = vae.reconstruct([a, b, a])  # 3 rows: same compiled program
    assert line[0] == rec[0] and line[-1] == rec[1]


def test_decode_max_length_zero_is_refused_not_the_default(vae):
    z = np.zeros((1, vae.latent_size), np.float32)
    with pytest.raises(ValueError, match="max_length must be >= 1, got 0"):
        vae.decode(z, max_length=0)


def test_decode_rejects_a_wrong_latent_size(vae):
    with pytest.raises(ValueError, match=f"latent_size is {vae.latent_size}"):
        vae.decode(np.zeros((2, vae.latent_size + 1), np.float32))


def test_beam_of_size_one_is_greedy(vae):
    z = np.asarray(np.random.default_rng(0).normal(size=(N, vae.latent_size)), np.float32)
    greedy = vae.decode(z)
    assert vae.decode(z, method="beam", beam_size=1) == greedy
    _strings(greedy, N)


UNKNOWN = ("zorblax", "quibbling", "xylograph")  # words the synthetic corpus never uses


def test_unknown_words_are_not_in_the_tiny_vocabulary():
    assert not set(UNKNOWN) & set(synthetic_vocabulary())


def test_a_mostly_unknown_input_warns_naming_it_and_the_fraction(vae):
    text = " ".join(UNKNOWN) + " dog"  # 3 of its 4 word tokens are <unk>
    assert vae.unknown_fraction(text) == (0.75, list(UNKNOWN))
    for call in (vae.encode, vae.reconstruct):
        with pytest.warns(UserWarning) as caught:
            call([text, "the dog"])
        assert len(caught) == 1
        message = str(caught[0].message)
        assert repr(text) in message and "75%" in message and "vocabulary lacks" in message
        assert "'the dog'" not in message  # only the offending text is named
        for word in UNKNOWN:
            assert repr(word) in message
        assert caught[0].filename == __file__  # it points at the caller's line
    long = " ".join(UNKNOWN * 40)  # a long text is named by its first 77 characters
    with pytest.warns(UserWarning, match=repr(long[:77] + "...")):
        vae.encode([long])


def test_known_and_half_known_inputs_do_not_warn(vae, train_texts):
    half = f"{UNKNOWN[0]} {UNKNOWN[1]} the dog"  # exactly half unknown: not "mostly"
    assert vae.unknown_fraction(half)[0] == 0.5
    assert vae.unknown_fraction(train_texts[0]) == (0.0, [])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vae.reconstruct(list(train_texts))
        vae.encode([half])
        vae.interpolate(train_texts[0], train_texts[1], steps=N)


def test_a_run_trained_with_cudnn_attention_loads_on_the_xla_path_here(vae, tiny_run, train_texts, tmp_path):
    """Its config says model.attention='cudnn'; without a CUDA GPU the model is built with 'dot_product'."""
    workdir = str(tmp_path / "run")
    shutil.copytree(tiny_run[1], workdir, ignore=shutil.ignore_patterns(".lock"))
    path = f"{workdir}/config.json"
    with open(path) as f:
        saved = json.load(f)
    saved["model"]["attention"] = "cudnn"
    with open(path, "w") as f:
        json.dump(saved, f)
    moved = TextVAE.load(workdir)
    assert moved.run.model.backbone.attention == "dot_product"
    np.testing.assert_allclose(moved.encode(train_texts)[0], vae.encode(train_texts)[0], rtol=1e-5, atol=1e-6)
