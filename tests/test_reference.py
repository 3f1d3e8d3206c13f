"""The float64 reference against PyTorch's own cross_entropy: the oracle is checked first."""
import itertools

import numpy as np
import pytest

from numba_ce import reference
from helpers import random_logits, random_target, torch_loss_and_grad

OPTIONS = list(itertools.product(["mean", "sum", "none"], [None, "weight"], [0.0, 0.2],
                                 [0.0, 1e-3], [None, 4.0], [0.0, 0.3]))


@pytest.mark.parametrize("reduction,weight,smoothing,z_loss,softcap,ignored", OPTIONS)
def test_reference_matches_torch(rng, reduction, weight, smoothing, z_loss, softcap, ignored):
    logits = random_logits(rng, 7, 11)
    target = random_target(rng, 7, 11, ignored_share=ignored)
    w = rng.random(11) + 0.5 if weight else None
    grad_output = rng.standard_normal(7) if reduction == "none" else 0.7
    options = dict(weight=w, reduction=reduction, label_smoothing=smoothing, z_loss=z_loss,
                   softcap=softcap)
    expected_loss, expected_grad = torch_loss_and_grad(logits, target, grad_output=grad_output,
                                                       **options)
    res = reference.cross_entropy_with_grad(logits, target, grad_output=grad_output, **options)
    np.testing.assert_allclose(res.loss, expected_loss, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(res.grad, expected_grad, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(reference.cross_entropy(logits, target, **options), expected_loss,
                               rtol=1e-12, atol=1e-12)


def test_reference_all_ignored_mean_is_nan(rng):
    logits = random_logits(rng, 3, 5)
    target = np.full(3, -100)
    assert np.isnan(reference.cross_entropy(logits, target))
    res = reference.cross_entropy_with_grad(logits, target)
    assert not res.grad.any() and not res.lse.any()
