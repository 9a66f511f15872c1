"""Test configuration: float64 available, implicit promotion made an error, compilation made cheap.

As in lineax/equinox, strict dtype promotion and rank promotion "raise" turn silent
float32/float64 mixing and accidental broadcasting in the library into test failures.
Shared helpers live in ``tests/helpers.py``.

Most of the suite's time is XLA compilation of small programs, not running them, so:

- XLA:CPU compiles without LLVM's expensive passes (``--xla_backend_optimization_level=0``,
  ``--xla_llvm_disable_expensive_passes``) and, where jaxlib knows the flag, with its older fusion
  emitters (``--xla_cpu_use_fusion_emitters=false``): IEEE arithmetic either way (XLA:CPU does no
  fast-math), 3-5x less compile time in all, and the large matrix kernels (LAPACK, Eigen) are
  precompiled so their speed does not change. ``KRONLIK_TEST_FULL_OPTIMIZATION=1`` keeps XLA's
  default passes, as users compile (CI's float32 CLI leg and the documentation build, which runs
  the examples and notebooks, are fresh processes with the default passes).
- The state-space form's Kalman scans run one step per loop iteration (``KRONLIK_SCAN_UNROLL=1``;
  the library unrolls 8 steps for speed): the same arithmetic per step, and a second derivative
  through them compiles about 3x faster. ``KRONLIK_TEST_FULL_OPTIMIZATION=1`` keeps the default.
- Compiled programs go to JAX's persistent cache (``.jax_cache/`` at the repository root, or
  ``KRONLIK_TEST_JAX_CACHE``), keyed by the program's HLO, JAX version and flags: a program that
  two tests, two xdist workers, a CLI test's fresh closures, or the fast and slow tiers all
  compile is compiled once, and a second run of the suite compiles almost nothing.

Both are set through the environment as well, so the subprocesses that some tests start (the
CLI's float32 leg, examples on four CPU devices) inherit them.

Tiers: tests marked ``slow`` (large shapes, fits to a dense optimum, Monte Carlo, benchmark and
example smoke runs) are deselected by ``addopts`` in pyproject.toml; ``pytest -m slow`` runs them.
"""

import os
from pathlib import Path

_FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# XLA:CPU's older LLVM IR emitters for fusions compile this suite's programs in about 60 % of the
# time of the MLIR fusion emitters that are the default in newer jaxlib. A jaxlib that does not know
# the flag aborts on it (XLA exits on an unknown flag), so it is tried once, in a subprocess; the
# answer travels to xdist's workers and the tests' subprocesses in the environment.
_LEGACY_FUSION = "--xla_cpu_use_fusion_emitters=false"


def _xla_accepts(flag: str) -> bool:
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"}
    probe = "import jax.numpy as jnp; (jnp.ones(3) + 1).block_until_ready()"
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True).returncode == 0


if not os.environ.get("KRONLIK_TEST_FULL_OPTIMIZATION"):  # set: XLA's default passes, as users compile
    if "KRONLIK_TEST_LEGACY_FUSION" not in os.environ:
        os.environ["KRONLIK_TEST_LEGACY_FUSION"] = "1" if _xla_accepts(_LEGACY_FUSION) else "0"
    if os.environ["KRONLIK_TEST_LEGACY_FUSION"] == "1":
        _FAST_COMPILE += f" {_LEGACY_FUSION}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()
_CACHE = os.environ.setdefault("KRONLIK_TEST_JAX_CACHE", str(Path(__file__).resolve().parent.parent / ".jax_cache"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
if not os.environ.get("KRONLIK_TEST_FULL_OPTIMIZATION"):  # the Kalman scans not unrolled (3x less compile)
    os.environ.setdefault("KRONLIK_SCAN_UNROLL", "1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402  (after XLA_FLAGS: the backend reads them when it starts)
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")
for _name, _value in (
    ("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"]),
    ("jax_persistent_cache_min_compile_time_secs", 0.0),
    ("jax_persistent_cache_min_entry_size_bytes", -1),
):
    try:
        jax.config.update(_name, _value)
    except AttributeError:  # an older JAX (CI's minimum-versions leg) without this option
        pass


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    # Every compiled XLA:CPU program keeps memory mappings; the suite compiles thousands, and a
    # long run hit the kernel's limit on mappings (a segfault inside the compiler). Free them
    # after each test module (the persistent cache above keeps them on disk).
    yield
    jax.clear_caches()
