"""Test configuration: float64 available, and implicit promotion made an error.

As in lineax/equinox, strict dtype promotion and rank promotion "raise" turn silent
float32/float64 mixing and accidental broadcasting in the library into test failures.
Shared helpers live in ``tests/helpers.py``.
"""

import jax
import numpy as np
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    # Every compiled XLA:CPU program keeps memory mappings; the suite compiles thousands, and a
    # long run hit the kernel's limit on mappings (a segfault inside the compiler). Free them
    # after each test module.
    yield
    jax.clear_caches()
