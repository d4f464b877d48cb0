"""Tests for anglekit.losses: every term against a slow numpy/loop reference, plus edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anglekit.losses import (
    AngleLoss,
    LossConfig,
    angle_loss,
    angle_scores,
    contrastive_loss,
    cosine_loss,
    in_batch_negative_loss,
    ranking_loss,
)

# --- slow references, written from the docstring formulas in float64 --------------------------


def np64(x: torch.Tensor) -> np.ndarray:
    """A tensor as a float64 numpy array (after any rounding its dtype already applied)."""
    return x.detach().float().numpy().astype(np.float64)


def logsumexp(values: list[float]) -> float:
    """Stable log(sum(exp(values))) of a Python list."""
    top = max(values)
    return top + math.log(sum(math.exp(x - top) for x in values))


def ref_ranking(scores: np.ndarray, labels: np.ndarray, tau: float) -> float:
    """log(1 + sum over ordered pairs with y_i < y_j of exp(tau * (s_i - s_j)))."""
    terms = [0.0]  # the "1 +"
    for i in range(len(scores)):
        for j in range(len(scores)):
            if labels[i] < labels[j]:
                terms.append(tau * (scores[i] - scores[j]))
    return logsumexp(terms)


def ref_cos(x: np.ndarray, y: np.ndarray) -> float:
    """Cosine of two vectors."""
    return float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))


def ref_cosines(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Row-wise cosine by a loop."""
    return np.array([ref_cos(u[i], v[i]) for i in range(len(u))])


def ref_angle_docstring(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """|sum(re) + sum(im)| with re, im per dimension as written in the angle_scores docstring."""
    out = []
    for x, y in zip(u, v, strict=True):
        h = len(x) // 2
        norms = np.linalg.norm(x) * np.linalg.norm(y)
        total = 0.0
        for k in range(h):
            a, b, c, d = x[k], x[h + k], y[k], y[h + k]
            total += (a * c + b * d) / norms + (b * c - a * d) / norms
        out.append(abs(total))
    return np.array(out)


def ref_angle_upstream(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """The formula of the reference AnglE implementation: complex division, then rescaling."""
    h = u.shape[1] // 2
    a, b = u[:, :h], u[:, h:]
    c, d = v[:, :h], v[:, h:]
    z = np.sum(c**2 + d**2, axis=1, keepdims=True)
    re = (a * c + b * d) / z
    im = (b * c - a * d) / z
    dz = np.sqrt(np.sum(a**2 + b**2, axis=1, keepdims=True))
    dw = np.sqrt(np.sum(c**2 + d**2, axis=1, keepdims=True))
    re = re / (dz / dw)
    im = im / (dz / dw)
    return np.abs(re.sum(axis=1) + im.sum(axis=1))


def ref_ibn(u: np.ndarray, v: np.ndarray, is_anchor: list[bool], tau: float) -> float:
    """Mean over anchor texts of -log softmax over the other 2N-1 texts at the partner."""
    texts = [t for pair in zip(u, v, strict=True) for t in pair]  # [u1, v1, u2, v2, ...]
    losses = []
    for k, t_k in enumerate(texts):
        if not is_anchor[k // 2]:
            continue
        partner = k + 1 if k % 2 == 0 else k - 1
        others = [tau * ref_cos(t_k, t_m) for m, t_m in enumerate(texts) if m != k]
        losses.append(logsumexp(others) - tau * ref_cos(t_k, texts[partner]))
    return float(np.mean(losses)) if losses else 0.0


def ref_contrastive(q: np.ndarray, p: np.ndarray, n: np.ndarray | None, tau: float) -> float:
    """Mean over queries of -log softmax over all positives (and negatives) at its positive."""
    targets = list(p) + ([] if n is None else list(n))
    losses = []
    for i, q_i in enumerate(q):
        logits = [tau * ref_cos(q_i, t) for t in targets]
        losses.append(logsumexp(logits) - logits[i])
    return float(np.mean(losses))


def rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Seeded standard normal tensor."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def close(actual: torch.Tensor, expected: float, tol: float = 1e-5) -> None:
    """Assert a scalar loss matches a float64 reference to a relative/absolute tolerance."""
    assert actual.dim() == 0
    assert actual.item() == pytest.approx(expected, rel=tol, abs=tol)


GRADED = torch.tensor([0.0, 1.2, 4.5, 2.0, 5.0, 3.3, 0.4, 2.0])  # ties included


# --- ranking_loss --------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1.0, 20.0])
def test_ranking_loss_matches_loop(tau):
    """ranking_loss equals the pairwise loop over y_i < y_j, ties included."""
    scores = rand(8, seed=1).tanh()
    close(ranking_loss(scores, GRADED, tau), ref_ranking(np64(scores), np64(GRADED), tau))


def test_ranking_loss_batch_of_one_is_zero():
    """With a single pair there is nothing to rank: the loss is exactly 0."""
    loss = ranking_loss(torch.tensor([0.7]), torch.tensor([3.0]), 20.0)
    assert loss.item() == 0.0


def test_ranking_loss_all_equal_labels_is_zero():
    """All labels equal: no ordered pair, the loss is exactly 0 whatever the scores."""
    loss = ranking_loss(rand(6, seed=2), torch.full((6,), 2.5), 20.0)
    assert loss.item() == 0.0


def test_ranking_loss_only_order_matters():
    """Labels are used only through their order: a monotone relabelling leaves the loss alone."""
    scores = rand(8, seed=3)
    a = ranking_loss(scores, GRADED, 20.0)
    b = ranking_loss(scores, GRADED**3 + 7, 20.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)
    assert ranking_loss(scores, -GRADED, 20.0).item() != pytest.approx(a.item(), rel=1e-3)


def test_ranking_loss_bf16_scores_computed_in_fp32():
    """bf16 scores give a float32 loss equal to the reference on the rounded scores."""
    scores = rand(8, seed=60, dtype=torch.bfloat16).tanh()
    loss = ranking_loss(scores, GRADED, 20.0)
    assert loss.dtype == torch.float32
    close(loss, ref_ranking(np64(scores), np64(GRADED), 20.0))


def test_ranking_loss_large_scale_does_not_overflow():
    """A mis-ranked pair at tau=1000 gives log(1 + e^1000) = 1000, not inf, with finite grads."""
    scores = torch.tensor([1.0, 0.0], requires_grad=True)
    loss = ranking_loss(scores, torch.tensor([0.0, 1.0]), 1000.0)
    assert loss.item() == pytest.approx(1000.0, rel=1e-6)
    loss.backward()
    assert torch.isfinite(scores.grad).all()


def test_ranking_loss_prefers_correct_order():
    """Scores ranked like the labels give a smaller loss than the reverse ranking."""
    labels = torch.tensor([0.0, 1.0, 2.0, 3.0])
    good = ranking_loss(torch.tensor([0.1, 0.2, 0.3, 0.4]), labels, 20.0)
    bad = ranking_loss(torch.tensor([0.4, 0.3, 0.2, 0.1]), labels, 20.0)
    assert good < bad


# --- cosine_loss ---------------------------------------------------------------------------------


def test_cosine_loss_matches_reference():
    """cosine_loss equals the CoSENT loop over loop-computed cosines."""
    u, v = rand(8, 6, seed=4), rand(8, 6, seed=5)
    expected = ref_ranking(ref_cosines(np64(u), np64(v)), np64(GRADED), 20.0)
    close(cosine_loss(u, v, GRADED, tau=20.0), expected)


def test_cosine_loss_edge_cases_are_zero():
    """Batch of one and all-equal labels give exactly 0."""
    assert cosine_loss(rand(1, 4), rand(1, 4, seed=1), torch.tensor([4.0])).item() == 0.0
    assert cosine_loss(rand(5, 4), rand(5, 4, seed=1), torch.ones(5)).item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cosine_loss_half_precision(dtype):
    """Half-precision input gives a float32 loss equal to the reference on the rounded values."""
    u, v = rand(8, 16, seed=6, dtype=dtype), rand(8, 16, seed=7, dtype=dtype)
    loss = cosine_loss(u, v, GRADED)
    assert loss.dtype == torch.float32
    close(loss, ref_ranking(ref_cosines(np64(u), np64(v)), np64(GRADED), 20.0), tol=1e-4)
    fp32 = cosine_loss(u.float(), v.float(), GRADED)
    assert loss.item() == pytest.approx(fp32.item(), rel=1e-6)


# --- angle_scores and angle_loss -----------------------------------------------------------------


def test_angle_scores_match_docstring_formula():
    """angle_scores equals the per-dimension re/im loop of its docstring."""
    u, v = rand(7, 10, seed=8), rand(7, 10, seed=9)
    np.testing.assert_allclose(
        angle_scores(u, v).numpy(), ref_angle_docstring(np64(u), np64(v)), rtol=1e-5, atol=1e-6
    )


def test_angle_scores_match_reference_implementation():
    """angle_scores equals the reference package's z / dz / dw formula, written independently."""
    u, v = rand(7, 12, seed=10), rand(7, 12, seed=11) * 3.0  # unequal norms matter here
    np.testing.assert_allclose(
        angle_scores(u, v).numpy(), ref_angle_upstream(np64(u), np64(v)), rtol=1e-5, atol=1e-6
    )


def test_angle_scores_cosine_identity():
    """score(u, v) = |cos(u, v) + cos(u, J v)| with J (c, d) = (-d, c)."""
    u, v = np64(rand(9, 8, seed=12)), np64(rand(9, 8, seed=13))
    c, d = v[:, :4], v[:, 4:]
    jv = np.concatenate([-d, c], axis=1)
    expected = np.abs(ref_cosines(u, v) + ref_cosines(u, jv))
    got = angle_scores(torch.from_numpy(u).float(), torch.from_numpy(v).float()).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_angle_scores_are_asymmetric():
    """Swapping u and v changes the score for random input (the imaginary sum flips sign)."""
    u, v = rand(6, 8, seed=14), rand(6, 8, seed=15)
    forward, backward = angle_scores(u, v), angle_scores(v, u)
    assert not torch.allclose(forward, backward, atol=1e-3)


def test_angle_scores_scale_invariant_and_bounded():
    """Rescaling either input leaves the score alone; the score is at most sqrt(2)."""
    u, v = rand(6, 8, seed=16), rand(6, 8, seed=17)
    assert torch.allclose(angle_scores(3.0 * u, 0.5 * v), angle_scores(u, v), atol=1e-6)
    assert (angle_scores(u, v) <= math.sqrt(2) + 1e-6).all()


def test_angle_scores_odd_size_raises():
    """An odd embedding size cannot be split into real and imaginary halves."""
    with pytest.raises(ValueError, match="even embedding size, got 5"):
        angle_scores(rand(2, 5), rand(2, 5))


def test_angle_loss_matches_reference():
    """angle_loss is the CoSENT loop over the reference implementation's scores."""
    u, v = rand(8, 12, seed=18), rand(8, 12, seed=19)
    expected = ref_ranking(ref_angle_upstream(np64(u), np64(v)), np64(GRADED), 20.0)
    close(angle_loss(u, v, GRADED, tau=20.0), expected)


def test_angle_loss_edge_cases():
    """Batch of one and all-equal labels give 0; bf16 input matches fp32 on the rounded values."""
    assert angle_loss(rand(1, 4), rand(1, 4, seed=1), torch.tensor([1.0])).item() == 0.0
    assert angle_loss(rand(5, 4), rand(5, 4, seed=1), torch.zeros(5)).item() == 0.0
    u, v = rand(8, 16, seed=20, dtype=torch.bfloat16), rand(8, 16, seed=21, dtype=torch.bfloat16)
    loss = angle_loss(u, v, GRADED)
    assert loss.dtype == torch.float32
    close(loss, ref_ranking(ref_angle_upstream(np64(u), np64(v)), np64(GRADED), 20.0), tol=1e-4)


# --- in_batch_negative_loss ----------------------------------------------------------------------


def test_ibn_graded_labels_match_thresholded_reference():
    """With 0-5 labels and threshold 4 only pairs labelled >= 4 are anchors, as in the loop."""
    u, v = rand(8, 6, seed=22), rand(8, 6, seed=23)
    anchors = [bool(y >= 4.0) for y in GRADED]
    assert sum(anchors) == 2  # 4.5 and 5.0
    expected = ref_ibn(np64(u), np64(v), anchors, 20.0)
    close(in_batch_negative_loss(u, v, GRADED, tau=20.0, threshold=4.0), expected)


def test_ibn_pair_below_threshold_is_no_anchor():
    """A pair labelled 3.9 acts exactly like one labelled 0; relabelled 4.0 it becomes an anchor."""
    u, v = rand(4, 6, seed=24), rand(4, 6, seed=25)
    base = in_batch_negative_loss(u, v, torch.tensor([5.0, 3.9, 1.0, 4.5]), threshold=4.0)
    as_zero = in_batch_negative_loss(u, v, torch.tensor([5.0, 0.0, 1.0, 4.5]), threshold=4.0)
    as_pos = in_batch_negative_loss(u, v, torch.tensor([5.0, 4.0, 1.0, 4.5]), threshold=4.0)
    assert base.item() == as_zero.item()
    assert as_pos.item() != pytest.approx(base.item(), rel=1e-3)
    close(base, ref_ibn(np64(u), np64(v), [True, False, False, True], 20.0))


def test_ibn_differs_from_int_cast_labels():
    """Int-casting labels (0.9 -> negative, 2.0 -> positive) would give another value."""
    labels = torch.tensor([0.9, 2.0, 4.2, 0.0, 5.0, 3.9])
    u, v = rand(6, 6, seed=26), rand(6, 6, seed=27)
    ours = in_batch_negative_loss(u, v, labels, threshold=4.0)
    int_cast = ref_ibn(np64(u), np64(v), [int(y) != 0 for y in labels.tolist()], 20.0)
    close(ours, ref_ibn(np64(u), np64(v), [y >= 4.0 for y in labels.tolist()], 20.0))
    assert ours.item() != pytest.approx(int_cast, rel=1e-3)


def test_ibn_fractional_labels_are_not_truncated():
    """Labels are compared as floats: 0.9 is a positive at threshold 0.5, 3.7 at threshold 3.5."""
    u, v = rand(3, 6, seed=61), rand(3, 6, seed=62)

    def loss(labels, threshold):
        return in_batch_negative_loss(u, v, torch.tensor(labels), threshold=threshold).item()

    assert loss([1.0, 0.9, 0.0], 0.5) == loss([1.0, 1.0, 0.0], 0.5)
    assert loss([1.0, 0.9, 0.0], 0.5) != pytest.approx(loss([1.0, 0.0, 0.0], 0.5), rel=1e-3)
    assert loss([5.0, 3.7, 0.0], 3.5) == loss([5.0, 5.0, 0.0], 3.5)


def test_ibn_binary_labels_default_threshold_is_infonce_over_positives():
    """0/1 labels with threshold 0.5 give plain InfoNCE over the positive pairs' texts."""
    u, v = rand(6, 8, seed=28), rand(6, 8, seed=29)
    labels = torch.tensor([1, 0, 1, 1, 0, 1])  # an int tensor, as a collator might give
    close(in_batch_negative_loss(u, v, labels), ref_ibn(np64(u), np64(v), [1, 0, 1, 1, 0, 1], 20.0))
    ones = torch.ones(6)
    close(in_batch_negative_loss(u, v, ones, tau=5.0), ref_ibn(np64(u), np64(v), [1] * 6, 5.0))


def test_ibn_no_positive_is_zero_with_graph():
    """No pair reaches the threshold: the loss is 0, and backward still runs (zero gradients)."""
    u = rand(3, 4, seed=30).requires_grad_()
    v = rand(3, 4, seed=31).requires_grad_()
    loss = in_batch_negative_loss(u, v, torch.tensor([0.0, 1.0, 3.0]), threshold=4.0)
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert u.grad is not None and torch.equal(u.grad, torch.zeros_like(u))


def test_ibn_batch_of_one_and_bf16():
    """One positive pair: its texts only see each other (loss 0); bf16 matches rounded fp32."""
    u, v = rand(1, 4, seed=32), rand(1, 4, seed=33)
    assert in_batch_negative_loss(u, v, torch.tensor([1.0])).item() == pytest.approx(0.0, abs=1e-6)
    ub, vb = rand(5, 8, seed=34, dtype=torch.bfloat16), rand(5, 8, seed=35, dtype=torch.bfloat16)
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    loss = in_batch_negative_loss(ub, vb, labels)
    assert loss.dtype == torch.float32
    close(loss, ref_ibn(np64(ub), np64(vb), [True, False, True, True, False], 20.0), tol=1e-4)


# --- contrastive_loss ----------------------------------------------------------------------------


def test_contrastive_loss_pairs_matches_loop():
    """Without negatives each query retrieves its positive among all positives."""
    q, p = rand(5, 8, seed=36), rand(5, 8, seed=37)
    close(contrastive_loss(q, p, tau=20.0), ref_contrastive(np64(q), np64(p), None, 20.0))


def test_contrastive_loss_triplets_matches_loop():
    """With hard negatives they join the candidates and raise the loss."""
    q, p, n = rand(5, 8, seed=38), rand(5, 8, seed=39), rand(5, 8, seed=40)
    with_neg = contrastive_loss(q, p, n, tau=10.0)
    close(with_neg, ref_contrastive(np64(q), np64(p), np64(n), 10.0))
    assert with_neg > contrastive_loss(q, p, tau=10.0)


def test_contrastive_loss_edge_cases():
    """Batch of one without negatives is 0; bf16 input matches the reference on rounded values."""
    assert contrastive_loss(rand(1, 4), rand(1, 4, seed=1)).item() == pytest.approx(0.0, abs=1e-6)
    q, p, n = (rand(4, 8, seed=s, dtype=torch.bfloat16) for s in (41, 42, 43))
    loss = contrastive_loss(q, p, n)
    assert loss.dtype == torch.float32
    close(loss, ref_contrastive(np64(q), np64(p), np64(n), 20.0), tol=1e-4)


# --- gradients -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_terms_have_finite_gradients(dtype):
    """Every term backpropagates finite, non-zero gradients, in fp32 and bf16."""
    terms = {
        "cosine": lambda u, v: cosine_loss(u, v, GRADED),
        "angle": lambda u, v: angle_loss(u, v, GRADED),
        "ibn": lambda u, v: in_batch_negative_loss(u, v, GRADED, threshold=2.0),
        "cln": lambda u, v: contrastive_loss(u, v),
    }
    for name, term in terms.items():
        u = rand(8, 8, seed=44, dtype=dtype).requires_grad_()
        v = rand(8, 8, seed=45, dtype=dtype).requires_grad_()
        term(u, v).backward()
        for g in (u.grad, v.grad):
            assert g is not None and g.dtype == dtype, name
            assert torch.isfinite(g.float()).all(), name
            assert g.float().abs().sum() > 0, name


# --- LossConfig and AngleLoss --------------------------------------------------------------------


def test_angle_loss_unknown_kwarg_raises_type_error():
    """A misspelt weight is rejected and the message lists the valid names."""
    with pytest.raises(TypeError, match=r"\['angle_weight'\].*valid: cosine_w"):
        AngleLoss(angle_weight=1.0)


@pytest.mark.parametrize(
    "kwargs", [{"cosine_w": -1.0}, {"angle_w": float("nan")}, {"ibn_tau": float("inf")}]
)
def test_angle_loss_bad_weights_raise_value_error(kwargs):
    """Negative, NaN or infinite settings raise ValueError naming the setting."""
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=name):
        AngleLoss(**kwargs)


def test_loss_config_reports_all_problems_and_allows_negative_threshold():
    """All bad settings are listed at once; a negative ibn_threshold is allowed."""
    with pytest.raises(ValueError) as info:
        LossConfig(cosine_w=-1.0, ibn_w=True, angle_tau=float("nan"))
    message = str(info.value)
    assert "cosine_w" in message and "ibn_w" in message and "angle_tau" in message
    assert LossConfig(ibn_threshold=-1.0).ibn_threshold == -1.0


@pytest.mark.parametrize(
    ("labels", "threshold"),
    [([0.0, 1.0, 1.0], 0.8), ([0.0, 2.5, 5.0], 4.0), ([-1.0, 0.0, 1.0], 0.6), ([3.0], 3.0)],
)
def test_loss_config_places_unset_threshold_on_the_label_scale(labels, threshold):
    """An unset ibn_threshold goes 80% of the way up the labels; a set one stays."""
    assert LossConfig().ibn_threshold is None
    assert LossConfig().for_labels(labels).ibn_threshold == pytest.approx(threshold)
    assert LossConfig(ibn_threshold=0.5).for_labels(labels).ibn_threshold == 0.5
    assert LossConfig().for_labels([]).ibn_threshold is None


def test_angle_loss_unset_threshold_keeps_labels_of_one():
    """Used on its own (no data to place it on), an unset threshold counts labels >= 0.5."""
    emb, labels = rand(6, 2, 8, seed=53), torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0, 0.7])
    unset = AngleLoss(cosine_w=0.0, angle_w=0.0)(emb, labels)
    assert unset.item() == pytest.approx(
        AngleLoss(cosine_w=0.0, angle_w=0.0, ibn_threshold=0.5)(emb, labels).item()
    )
    assert unset.item() != pytest.approx(
        AngleLoss(cosine_w=0.0, angle_w=0.0, ibn_threshold=0.8)(emb, labels).item()
    )


def test_angle_loss_overrides_merge_with_config():
    """Keyword overrides replace only their own fields of a given config."""
    loss = AngleLoss(LossConfig(angle_w=1.0, ibn_tau=5.0), cosine_w=0.5)
    assert (loss.config.angle_w, loss.config.ibn_tau, loss.config.cosine_w) == (1.0, 5.0, 0.5)


def test_angle_loss_scored_pairs_is_weighted_sum():
    """For scored pairs the total is the hand-weighted sum of cosine, ibn and angle terms."""
    emb = rand(8, 2, 12, seed=46)
    u, v = emb[:, 0], emb[:, 1]
    fn = AngleLoss(
        cosine_w=0.7,
        ibn_w=0.3,
        angle_w=2.0,
        cln_w=5.0,
        cosine_tau=15.0,
        ibn_tau=10.0,
        angle_tau=25.0,
        ibn_threshold=4.0,
    )
    terms = fn.terms(emb, GRADED)
    assert set(terms) == {"cosine", "ibn", "angle"}  # no contrastive term for scored pairs
    expected = (
        0.7 * ref_ranking(ref_cosines(np64(u), np64(v)), np64(GRADED), 15.0)
        + 0.3 * ref_ibn(np64(u), np64(v), [bool(y >= 4.0) for y in GRADED], 10.0)
        + 2.0 * ref_ranking(ref_angle_upstream(np64(u), np64(v)), np64(GRADED), 25.0)
    )
    close(fn(emb, GRADED), expected)
    by_hand = (
        0.7 * cosine_loss(u, v, GRADED, 15.0)
        + 0.3 * in_batch_negative_loss(u, v, GRADED, 10.0, 4.0)
        + 2.0 * angle_loss(u, v, GRADED, 25.0)
    )
    assert fn(emb, GRADED).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_angle_loss_zero_weight_drops_term():
    """A weight of 0 removes its term from terms() and from the total."""
    emb = rand(6, 2, 8, seed=47)
    labels = GRADED[:6]
    terms = AngleLoss(angle_w=0.0).terms(emb, labels)
    assert set(terms) == {"cosine", "ibn"}


def test_angle_loss_triplets_terms_and_values():
    """Triplets: cln with hard negatives, ibn on (q, p), and (q, p) ranked above (q, n)."""
    emb = rand(5, 3, 8, seed=48)
    q, p, n = (np64(emb[:, i]) for i in range(3))
    fn = AngleLoss(cosine_w=1.0, ibn_w=0.5, cln_w=2.0, angle_w=0.1)
    terms = fn.terms(emb, None)
    assert set(terms) == {"cln", "cosine", "ibn", "angle"}
    rank_u, rank_v = np.concatenate([q, q]), np.concatenate([p, n])
    rank_y = np.array([1.0] * 5 + [0.0] * 5)
    expected = {
        "cln": 2.0 * ref_contrastive(q, p, n, 20.0),
        "cosine": 1.0 * ref_ranking(ref_cosines(rank_u, rank_v), rank_y, 5.0),  # default scale
        "ibn": 0.5 * ref_ibn(q, p, [True] * 5, 20.0),
        "angle": 0.1 * ref_ranking(ref_angle_upstream(rank_u, rank_v), rank_y, 20.0),
    }
    for name, value in expected.items():
        close(terms[name], value)
    close(fn(emb), sum(expected.values()))


def test_angle_loss_query_positive_terms_and_values():
    """Query/positive pairs without labels: only cln and ibn (ranking terms would be 0)."""
    emb = rand(6, 2, 8, seed=49)
    q, p = np64(emb[:, 0]), np64(emb[:, 1])
    fn = AngleLoss(cln_w=1.5, ibn_w=0.5)
    terms = fn.terms(emb, None)
    assert set(terms) == {"cln", "ibn"}
    close(terms["cln"], 1.5 * ref_contrastive(q, p, None, 20.0))
    close(terms["ibn"], 0.5 * ref_ibn(q, p, [True] * 6, 20.0))
    close(fn(emb, None), 1.5 * ref_contrastive(q, p, None, 20.0) + 0.5 * ref_ibn(q, p, [1] * 6, 20))


def test_angle_loss_all_applicable_weights_zero_raises():
    """If every term that applies has weight 0 the loss refuses to return a constant."""
    with pytest.raises(ValueError, match="weight 0"):
        AngleLoss(cln_w=0.0, ibn_w=0.0)(rand(4, 2, 8))  # cosine/angle don't apply here
    with pytest.raises(ValueError, match="weight 0"):
        AngleLoss(cosine_w=0.0, ibn_w=0.0, angle_w=0.0)(rand(4, 2, 8), GRADED[:4])


def test_angle_loss_rejects_bad_shapes():
    """Four texts per example, or labels with triplets, raise ValueError."""
    with pytest.raises(ValueError, match="got 4"):
        AngleLoss()(rand(3, 4, 8))
    with pytest.raises(ValueError, match="triplets take no labels"):
        AngleLoss()(rand(3, 3, 8), torch.ones(3))


def test_angle_loss_bf16_backward():
    """bf16 embeddings give a float32 total with finite gradients for each example."""
    emb = rand(8, 2, 16, seed=50, dtype=torch.bfloat16).requires_grad_()
    loss = AngleLoss(ibn_threshold=4.0)(emb, GRADED)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(emb.grad.float()).all() and emb.grad.float().abs().sum() > 0


def test_ibn_reference_agrees_with_cross_entropy():
    """Sanity of the ibn reference itself: with all positives it is F.cross_entropy on 2N rows."""
    u, v = rand(4, 6, seed=51), rand(4, 6, seed=52)
    t = F.normalize(torch.stack([u, v], 1).flatten(0, 1).double(), dim=-1)
    logits = 20.0 * t @ t.T
    logits.fill_diagonal_(-math.inf)
    ce = F.cross_entropy(logits, torch.arange(8) ^ 1).item()
    assert ref_ibn(np64(u), np64(v), [True] * 4, 20.0) == pytest.approx(ce, rel=1e-9)
