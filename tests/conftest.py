import os

# Tests compare float32 numerics; keep XLA from using reduced-precision matmuls.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# Compile afresh in every run and write nothing to the user's cache (opt in by setting it).
os.environ.setdefault("GEMMALENS_COMPILATION_CACHE", "off")

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Each test module starts without the compiled programs of the ones before it. The
    suite compiles thousands of programs in one process; kept to the end they only grow
    its memory (one full run, with other JAX processes beside it on the 2-core machine,
    ended in a segmentation fault inside XLA's compiler three quarters of the way in)."""
    yield
    jax.clear_caches()
