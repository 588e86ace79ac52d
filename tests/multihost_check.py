"""One model on a mesh spanning two processes (two simulated CPU devices each), as on two
hosts: run by tests/test_sharding.py as

    python -m tests.multihost_check PORT PROCESS_ID OUT.json     (for process 0 and 1)

Each process joins through `gemmalens.sharding.initialize_distributed`, loads the Gemma 3
teaching model onto a (data=1, model=4) mesh over all four devices, runs a forward pass and
a capture, gathers them and writes them with the shapes its own devices hold.
"""

from __future__ import annotations

import json
import os
import sys

os.environ["XLA_FLAGS"] = (
    f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
)

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import gemmalens as gl  # noqa: E402

TOKENS = np.random.RandomState(0).randint(3, 400, (2, 9))


def main(port: str, process_id: str, path: str) -> None:
    gl.sharding.initialize_distributed(f"localhost:{port}", 2, int(process_id))
    mesh = gl.sharding.make_mesh(model=4)
    m = gl.load(gl.teaching_model_path("gemma3"), mesh=mesh)
    logits, cache = m.run_with_cache(TOKENS, "blocks.3.hook_resid_post")
    gathered = cache.gather()
    out = {
        "process_count": jax.process_count(),
        "devices": len(jax.devices()),
        "local_devices": len(jax.local_devices()),
        "logits": np.asarray(multihost_utils.process_allgather(logits, tiled=True)).tolist(),
        "resid": np.asarray(gathered["blocks.3.hook_resid_post"]).tolist(),
        "local_q_proj_shards": [
            list(shape)
            for shape in gl.sharding.device_shapes(m)["blocks.0.attn.q_proj.weights"].values()
        ],
    }
    with open(path, "w") as f:
        json.dump(out, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
