"""Numeric tests for flax_textvae.losses, each against an independent numpy computation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax_textvae import losses


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _hand_batch(seed=0):
    """B=3, T=4, V=5, Dz=3; row lengths 4, 2, 3 (weights 0 on padding)."""
    r = np.random.RandomState(seed)
    logits = r.randn(3, 4, 5).astype(np.float32) * 2.0
    targets = r.randint(0, 5, size=(3, 4)).astype(np.int32)
    weights = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], np.float32)
    targets[weights == 0] = 1  # pad id
    mean = r.randn(3, 3).astype(np.float32)
    logvar = (r.randn(3, 3) * 0.5).astype(np.float32)
    return logits, targets, weights, mean, logvar


def _np_nll(logits, targets, weights):
    out = np.zeros(logits.shape[0])
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if weights[b, t] > 0:
                out[b] -= weights[b, t] * _np_log_softmax(logits[b, t].astype(np.float64))[targets[b, t]]
    return out


def _np_kl(mean, logvar):
    m, lv = mean.astype(np.float64), logvar.astype(np.float64)
    return 0.5 * (m**2 + np.exp(lv) - 1.0 - lv)


def test_gaussian_kl_zero_at_standard_normal():
    kl = jax.jit(losses.gaussian_kl)(jnp.zeros((2, 3)), jnp.zeros((2, 3)))
    assert kl.shape == (2, 3) and kl.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(kl), 0.0)


def test_gaussian_kl_matches_monte_carlo():
    mean = np.array([0.0, 1.5, -0.7, 0.3], np.float64)
    logvar = np.array([0.0, -1.0, 0.8, -2.5], np.float64)
    closed = np.asarray(jax.jit(losses.gaussian_kl)(jnp.asarray(mean), jnp.asarray(logvar)), np.float64)
    r = np.random.RandomState(0)
    n = 200_000
    std = np.exp(0.5 * logvar)
    z = mean + std * r.randn(n, 4)
    log_q = -0.5 * ((z - mean) / std) ** 2 - np.log(std)  # the 0.5 log 2pi terms cancel
    log_p = -0.5 * z**2
    samples = log_q - log_p
    est, se = samples.mean(0), samples.std(0) / np.sqrt(n)
    assert np.all(np.abs(est - closed) < 5 * se + 1e-6), (est, closed, se)


def test_gaussian_kl_bfloat16_inputs_computed_in_float32():
    kl = losses.gaussian_kl(jnp.ones((2,), jnp.bfloat16), jnp.zeros((2,), jnp.bfloat16))
    assert kl.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(kl), 0.5)


def test_token_nll_hand_computation():
    logits, targets, weights, _, _ = _hand_batch()
    got = jax.jit(losses.token_nll)(logits, targets, weights)
    assert got.shape == (3,)
    np.testing.assert_allclose(np.asarray(got), _np_nll(logits, targets, weights), rtol=1e-5)
    # A tiny fully hand-written case: uniform logits over V=4 -> log 4 per real token.
    got = losses.token_nll(jnp.zeros((1, 3, 4)), jnp.array([[0, 3, 1]]), jnp.array([[1.0, 1.0, 0.0]]))
    np.testing.assert_allclose(np.asarray(got), [2 * np.log(4.0)], rtol=1e-6)


@pytest.mark.parametrize("junk", [np.inf, -np.inf, np.nan, 1e30])
def test_token_nll_ignores_padded_positions(junk):
    logits, targets, weights, _, _ = _hand_batch()
    dirty = logits.copy()
    dirty[weights == 0] = junk
    dirty_targets = targets.copy()
    dirty_targets[weights == 0] = -100  # HF ignore-index convention must not matter either
    fn = jax.jit(lambda lg, tg: jnp.sum(losses.token_nll(lg, tg, weights)))
    np.testing.assert_allclose(float(fn(dirty, dirty_targets)), float(fn(logits, targets)), rtol=1e-6)
    g_clean = np.asarray(jax.grad(fn)(jnp.asarray(logits), targets))
    g_dirty = np.asarray(jax.grad(fn)(jnp.asarray(dirty), dirty_targets))
    assert np.all(np.isfinite(g_dirty))
    np.testing.assert_allclose(g_dirty, g_clean, rtol=1e-6)
    assert np.all(g_dirty[weights == 0] == 0)


def test_free_bits_per_example_value_and_gradient():
    kl = jnp.array([[0.1, 0.6, 2.0], [0.9, 0.2, 0.4]])
    lam = 0.5
    fn = jax.jit(functools.partial(losses.free_bits, threshold=lam, mode="per_example"))
    np.testing.assert_allclose(np.asarray(fn(kl)), [0.5 + 0.6 + 2.0, 0.9 + 0.5 + 0.5], rtol=1e-6)
    grad = np.asarray(jax.grad(lambda k: jnp.sum(fn(k)))(kl))
    np.testing.assert_array_equal(grad, np.asarray(kl) > lam)


def test_free_bits_batch_value_and_gradient():
    kl = np.array([[0.1, 0.6, 2.0, 0.0], [0.3, 0.2, 0.4, 0.9]], np.float32)
    lam = 0.4  # batch means per dim: 0.2 (under), 0.4 (tie -> floor), 1.2 (over), 0.45 (over)
    fn = jax.jit(functools.partial(losses.free_bits, threshold=lam, mode="batch"))
    out = fn(kl)
    assert out.shape == (2,)
    expected = np.maximum(kl.mean(0), lam).sum()
    np.testing.assert_allclose(float(jnp.mean(out)), expected, rtol=1e-6)
    grad = np.asarray(jax.grad(lambda k: jnp.mean(fn(k)))(kl))
    above = kl.mean(0) > lam
    np.testing.assert_allclose(grad, np.broadcast_to(above / 2.0, kl.shape), rtol=1e-6)
    assert np.all(grad[:, ~above] == 0)


def test_free_bits_batch_with_example_weight():
    kl = np.array([[1.0, 0.1], [5.0, 5.0], [0.2, 0.3]], np.float32)
    w = np.array([1.0, 0.0, 1.0], np.float32)
    lam = 0.5  # weighted means: 0.6 (over), 0.2 (under); the filler row must not count
    out = losses.free_bits(kl, lam, "batch", example_weight=w)
    weighted_mean = float(np.sum(np.asarray(out) * w) / w.sum())
    np.testing.assert_allclose(weighted_mean, 0.6 + 0.5, rtol=1e-6)


def test_free_bits_rejects_unknown_mode():
    with pytest.raises(ValueError, match="per_example"):
        losses.free_bits(jnp.zeros((2, 3)), 0.1, mode="per_dim")


def test_kl_constraint_value_and_gradient_sign():
    fn = jax.jit(losses.kl_constraint)
    kl_low, kl_high = jnp.array([1.0, 3.0]), jnp.array([9.0, 11.0])
    np.testing.assert_allclose(float(fn(kl_low, 5.0, 2.0)), 2.0 * 3.0, rtol=1e-6)
    np.testing.assert_allclose(float(fn(kl_high, 5.0, 2.0)), 2.0 * 5.0, rtol=1e-6)
    # Gradient descent on the loss moves KL toward C from both sides.
    g_low = np.asarray(jax.grad(fn)(kl_low, 5.0, 2.0))
    g_high = np.asarray(jax.grad(fn)(kl_high, 5.0, 2.0))
    np.testing.assert_allclose(g_low, [-1.0, -1.0])  # beta / B, negative: increasing KL lowers the loss
    np.testing.assert_allclose(g_high, [1.0, 1.0])

    # Through the posterior parameters: |mean| grows when KL < C, shrinks when KL > C.
    def via_mean(m, target):
        kl = jnp.sum(losses.gaussian_kl(m, jnp.zeros_like(m)), -1)
        return losses.kl_constraint(kl, target)

    m = jnp.array([[1.0, -1.0]])
    assert np.all(np.sign(np.asarray(jax.grad(via_mean)(m, 10.0))) == -np.sign(np.asarray(m)))
    assert np.all(np.sign(np.asarray(jax.grad(via_mean)(m, 0.1))) == np.sign(np.asarray(m)))


def _np_vae_loss(
    kind,
    logits,
    targets,
    weights,
    mean,
    logvar,
    *,
    weight=1.0,
    threshold=0.0,
    free_bits_mode="per_example",
    target=0.0,
    beta=1.0,
):
    nll = _np_nll(logits, targets, weights)
    kl_d = _np_kl(mean, logvar)
    kl = kl_d.sum(-1)
    rec = nll.mean()
    if kind == "elbo":
        kl_term = weight * kl.mean()
    elif kind == "free_bits" and free_bits_mode == "per_example":
        kl_term = weight * np.maximum(kl_d, threshold).sum(-1).mean()
    elif kind == "free_bits":
        kl_term = weight * np.maximum(kl_d.mean(0), threshold).sum()
    else:
        kl_term = beta * abs(kl.mean() - target)
    return rec + kl_term, rec, kl.mean(), kl_term, weights.sum()


CASES = [
    dict(kind="elbo", weight=0.3),
    dict(kind="free_bits", weight=0.7, threshold=0.4, free_bits_mode="per_example"),
    dict(kind="free_bits", weight=0.7, threshold=0.4, free_bits_mode="batch"),
    dict(kind="constraint", target=5.0, beta=2.0),
    dict(kind="constraint", target=0.1, beta=0.5),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_vae_loss_matches_hand_computation(case):
    logits, targets, weights, mean, logvar = _hand_batch()
    fn = jax.jit(functools.partial(losses.vae_loss, **case))
    loss, aux = fn(logits, targets, weights, mean, logvar)
    e_loss, e_rec, e_kl, e_term, e_tokens = _np_vae_loss(
        case["kind"], logits, targets, weights, mean, logvar, **{k: v for k, v in case.items() if k != "kind"}
    )
    np.testing.assert_allclose(float(loss), e_loss, rtol=1e-5)
    np.testing.assert_allclose(float(aux["loss"]), e_loss, rtol=1e-5)
    np.testing.assert_allclose(float(aux["rec"]), e_rec, rtol=1e-5)
    np.testing.assert_allclose(float(aux["kl"]), e_kl, rtol=1e-5)
    np.testing.assert_allclose(float(aux["kl_term"]), e_term, rtol=1e-5)
    np.testing.assert_allclose(float(aux["num_tokens"]), e_tokens)
    np.testing.assert_allclose(float(aux["num_examples"]), 3.0)
    np.testing.assert_allclose(float(aux["rec_sum"]), 3 * e_rec, rtol=1e-5)
    np.testing.assert_allclose(float(aux["kl_sum"]), 3 * e_kl, rtol=1e-5)
    np.testing.assert_allclose(float(aux["nll_per_token"]), 3 * e_rec / e_tokens, rtol=1e-5)
    np.testing.assert_allclose(float(aux["neg_elbo"]), e_rec + e_kl, rtol=1e-5)
    if case["kind"] == "constraint":
        np.testing.assert_allclose(float(aux["kl_weight"]), case["beta"])
        np.testing.assert_allclose(float(aux["kl_target"]), case["target"])
    else:
        np.testing.assert_allclose(float(aux["kl_weight"]), case["weight"])


def test_vae_loss_average_is_per_example_not_per_position():
    """Adding padding columns must not change the loss (docs/method.md, defect 3)."""
    logits, targets, weights, mean, logvar = _hand_batch()
    pad = 6
    logits_p = np.concatenate([logits, np.full((3, pad, 5), 7.0, np.float32)], 1)
    targets_p = np.concatenate([targets, np.ones((3, pad), np.int32)], 1)
    weights_p = np.concatenate([weights, np.zeros((3, pad), np.float32)], 1)
    a, _ = losses.vae_loss(logits, targets, weights, mean, logvar, weight=0.5)
    b, _ = losses.vae_loss(logits_p, targets_p, weights_p, mean, logvar, weight=0.5)
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_vae_loss_filler_rows_change_nothing(case):
    logits, targets, weights, mean, logvar = _hand_batch()
    # Two filler rows full of garbage (including inf / NaN) with example_weight 0.
    logits_f = np.concatenate([logits, np.full((2, 4, 5), np.nan, np.float32)], 0)
    logits_f[3, 0, 0] = np.inf
    targets_f = np.concatenate([targets, np.full((2, 4), -100, np.int32)], 0)
    weights_f = np.concatenate([weights, np.ones((2, 4), np.float32)], 0)
    mean_f = np.concatenate([mean, np.full((2, 3), 1e20, np.float32)], 0)
    logvar_f = np.concatenate([logvar, np.full((2, 3), np.inf, np.float32)], 0)
    ew = np.array([1, 1, 1, 0, 0], np.float32)
    fn = jax.jit(functools.partial(losses.vae_loss, **case))

    def loss_of(lg, m, lv, tg, w, e):
        return fn(lg, tg, w, m, lv, example_weight=e)[0]

    ref_loss, ref_aux = fn(logits, targets, weights, mean, logvar)
    loss, aux = fn(logits_f, targets_f, weights_f, mean_f, logvar_f, example_weight=ew)
    for key in ref_aux:
        np.testing.assert_allclose(float(aux[key]), float(ref_aux[key]), rtol=1e-6, err_msg=key)
    ref_g = jax.grad(loss_of, argnums=(0, 1, 2))(logits, mean, logvar, targets, weights, None)
    g = jax.grad(loss_of, argnums=(0, 1, 2))(logits_f, mean_f, logvar_f, targets_f, weights_f, ew)
    for a, b in zip(g, ref_g):
        a = np.asarray(a)
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a[:3], np.asarray(b), rtol=1e-5, atol=1e-7)
        np.testing.assert_array_equal(a[3:], 0.0)


def test_vae_loss_all_filler_batch_is_finite_zero():
    logits, targets, weights, mean, logvar = _hand_batch()
    loss, aux = losses.vae_loss(logits, targets, weights, mean, logvar, example_weight=np.zeros(3, np.float32))
    assert float(loss) == 0.0 and float(aux["num_examples"]) == 0.0 and float(aux["nll_per_token"]) == 0.0


def test_vae_loss_traced_schedule_values():
    logits, targets, weights, mean, logvar = _hand_batch()

    @jax.jit
    def f(w, c):
        return losses.vae_loss(logits, targets, weights, mean, logvar, kind="elbo", weight=w)[0], losses.vae_loss(
            logits, targets, weights, mean, logvar, kind="constraint", target=c
        )[0]

    a, _ = f(jnp.float32(0.25), jnp.float32(1.0))
    e = _np_vae_loss("elbo", logits, targets, weights, mean, logvar, weight=0.25)[0]
    np.testing.assert_allclose(float(a), e, rtol=1e-5)


def test_vae_loss_rejects_unknown_kind_and_mode():
    logits, targets, weights, mean, logvar = _hand_batch()
    with pytest.raises(ValueError, match="constraint"):
        losses.vae_loss(logits, targets, weights, mean, logvar, kind="bowman")
    with pytest.raises(ValueError, match="batch"):
        losses.vae_loss(logits, targets, weights, mean, logvar, kind="free_bits", free_bits_mode="dim")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_vae_loss_from_chunked_nll_equals_vae_loss_of_the_logits(case):
    """The objective from hidden states and head, chunk by chunk, == vae_loss of the full logits, in value
    and gradient; filler rows whose hidden states hold NaN change neither."""
    r = np.random.RandomState(3)
    _, targets, weights, mean, logvar = _hand_batch()
    hidden = r.randn(3, 4, 6).astype(np.float32)
    head = r.randn(5, 6).astype(np.float32)  # [V, D]
    bias = r.randn(5).astype(np.float32)

    def full(h, w, m):
        logits = jnp.einsum("btd,vd->btv", h, w) + bias
        return losses.vae_loss(logits, targets, weights, m, logvar, **case)

    def chunked(h, w, m, tg=targets, wt=weights, lv=logvar, ew=None):
        nll_fn = lambda tw: losses.chunked_token_nll(h, w, tg, tw, bias=bias, chunk_size=2)
        return losses.vae_loss_from_nll(nll_fn, wt, m, lv, example_weight=ew, **case)

    (ref, ref_aux), ref_g = jax.value_and_grad(full, argnums=(0, 1, 2), has_aux=True)(hidden, head, mean)
    (got, aux), g = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2), has_aux=True))(hidden, head, mean)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-5)
    assert set(aux) == set(ref_aux)
    for key in ref_aux:
        np.testing.assert_allclose(float(aux[key]), float(ref_aux[key]), rtol=1e-5, err_msg=key)
    for a, b in zip(g, ref_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # Two filler rows: NaN hidden states, targets -100, weights 1, example_weight 0.
    pad = lambda x, v: np.concatenate([x, np.full((2,) + x.shape[1:], v, x.dtype)], 0)
    fill = dict(
        tg=pad(targets, -100), wt=pad(weights, 1.0), lv=pad(logvar, np.inf), ew=np.array([1, 1, 1, 0, 0], np.float32)
    )
    (got_f, aux_f), g_f = jax.value_and_grad(lambda h, w, m: chunked(h, w, m, **fill), argnums=(0, 1, 2), has_aux=True)(
        pad(hidden, np.nan), head, pad(mean, 1e20)
    )
    np.testing.assert_allclose(float(got_f), float(ref), rtol=1e-5)
    for key in ref_aux:
        np.testing.assert_allclose(float(aux_f[key]), float(ref_aux[key]), rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(np.asarray(g_f[1]), np.asarray(ref_g[1]), rtol=1e-5, atol=1e-6)
    for a, b in ((g_f[0], ref_g[0]), (g_f[2], ref_g[2])):
        a = np.asarray(a)
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a[:3], np.asarray(b), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(a[3:], 0.0)
