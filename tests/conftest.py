import os

# Tests compare float32 numerics; keep XLA from using reduced-precision matmuls.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# Compile afresh in every run and write nothing to the user's cache (opt in by setting it).
os.environ.setdefault("GEMMALENS_COMPILATION_CACHE", "off")
