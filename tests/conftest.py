# The environment (float32 matmul precision, the compilation cache off, XLA flags) is set
# in the repository's root conftest.py, which pytest loads before this file.
import os

import jax
import pytest


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Each test module starts without the compiled programs of the ones before it. The
    suite compiles thousands of programs in one process; kept to the end they only grow
    its memory and its memory mappings (one full run ended in a segmentation fault inside
    XLA's compiler three quarters of the way in: each CPU program keeps its code in about a
    hundred mappings, and Linux allows a process 65,530; see docs/compilation-cache.md,
    "Long sessions on the CPU", for the guard gemmalens now has)."""
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
