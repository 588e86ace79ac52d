"""Settings for every test process, the notebooks' kernels included (they inherit this
environment): set here, at the repository's root, so that a run of the notebooks alone
(``pytest notebooks/03_activation_patching.ipynb``) gets them too."""

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
