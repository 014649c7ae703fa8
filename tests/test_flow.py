"""Rectified-flow functions (noise levels, noising, targets). The ODE solvers: tests/test_solvers.py."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sorajax import flow
from tests.helpers import FIXTURES


def test_flow_match_sigmas_equal_diffusers():
    ref = json.loads((FIXTURES / "flow_sigmas.json").read_text())
    for key, sig in ref.items():
        shift, steps = key.split("_")
        ours = flow.flow_match_sigmas(int(steps), float(shift))
        np.testing.assert_allclose(ours, np.asarray(sig, np.float32), atol=1e-6, err_msg=key)


def test_noising_and_target():
    x0 = jnp.ones((2, 3, 4, 4, 2))
    n = -jnp.ones_like(x0)
    s = jnp.array([0.0, 1.0])
    xt = flow.add_noise(x0, n, s)
    np.testing.assert_allclose(xt[0], x0[0])
    np.testing.assert_allclose(xt[1], n[1])
    np.testing.assert_allclose(flow.velocity_target(x0, n), n - x0)
    sig = flow.sample_sigmas(jax.random.key(0), (4096,), shift=3.0)
    assert float(sig.min()) > 0 and float(sig.max()) < 1
    assert float(jnp.mean(sig)) > 0.6  # shift > 1 moves mass to high noise
    assert flow.shift_for_tokens(1024, 256, 1.0) == pytest.approx(2.0)
