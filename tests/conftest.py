import os

# Tests compare float32 numerics; keep XLA from using reduced-precision matmuls.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# Compile afresh in every run and write nothing to the user's cache (opt in by setting it).
os.environ.setdefault("GEMMALENS_COMPILATION_CACHE", "off")
# Most of the suite's time is XLA compiling tiny CPU programs, and most of that is LLVM
# optimising machine code that then runs for microseconds: the tests compile without it
# (17% less time on tests/test_patching.py and tests/test_gemma4.py). The program XLA
# builds, its fusions and its float32 arithmetic are the same; only the host code
# generation is unoptimised. Subprocesses inherit it (the scripts append their own flags).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402  (after the environment above)
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Each test module starts without the compiled programs of the ones before it. The
    suite compiles thousands of programs in one process; kept to the end they only grow
    its memory (one full run, with other JAX processes beside it on the 2-core machine,
    ended in a segmentation fault inside XLA's compiler three quarters of the way in)."""
    yield
    jax.clear_caches()


@pytest.hookimpl(trylast=True)  # after -k / -m have deselected
def pytest_collection_modifyitems(session, config, items):
    """Modules with subprocess jobs (a ``BACKGROUND`` dict, `tests.background`) run last,
    and their jobs start now, beside the rest of the suite."""
    from tests import background

    with_jobs: dict = {}
    for item in items:
        module = getattr(item, "module", None)
        if getattr(module, "BACKGROUND", None):
            with_jobs.setdefault(module, []).append(item)
    if not with_jobs:
        return
    later = [item for its in with_jobs.values() for item in its]
    items[:] = [item for item in items if getattr(item, "module", None) not in with_jobs] + later
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Under pytest-xdist every worker collects every test but runs only its share: a
        # job runs when its test needs it, beside the other worker's tests.
        return
    jobs = []
    for module, its in with_jobs.items():
        names = [name for item in its for name in (item.name, *getattr(item, "fixturenames", ()))]
        jobs += background.needed(module.BACKGROUND, names)
    background.schedule(jobs)
