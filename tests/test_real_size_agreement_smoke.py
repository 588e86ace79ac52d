"""``benchmarks/real_size_agreement.py`` on tiny configs, on the CPU.

The real-size figures come from GPU runs (docs/benchmarks.md); this checks that the script's
whole path runs and that what it measures is what it says: transformers writes the
checkpoint, gemmalens reads it back as the same config, float32 agrees to rounding (logits,
every layer's residual streams, the sparse-gate masks, the experts chosen), and the float64
reference and the bfloat16-vs-float32 comparisons are filled in.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests import background

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "real_size_agreement.py"


# The script runs in its own process, beside the rest of the suite (`tests.background`).
BACKGROUND = {
    "real_size_agreement": background.Job(
        (
            str(SCRIPT),
            "--tiny",
            "--presets",
            "gemma3n_e4b,gemma4_26b_a4b@bfloat16",
            "--dtype",
            "bfloat16,float32",
            "--f64",
            "gemma3n_e4b",
            "--workdir",
            "{out}",
            "--out",
            "{out}/agreement.json",
        ),
        {"JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""},
        timeout=600,
    )
}


def test_real_size_agreement_tiny():
    run = background.result("real_size_agreement", BACKGROUND["real_size_agreement"])
    assert run.returncode == 0, run.stderr[-4000:]
    assert "| gemma3n_e4b | float32 |" in run.stdout, run.stdout[-2000:]

    results = json.loads((run.out / "agreement.json").read_text())
    e4b, moe = results["presets"]
    assert "error" not in e4b and "error" not in moe, (e4b.get("traceback"), moe.get("traceback"))
    # Checkpoints are removed after use.
    assert not any(p.name.startswith("real_size_") for p in run.out.iterdir())

    f32 = e4b["float32"]
    assert f32["config_differences"] == [] and e4b["bfloat16"]["config_differences"] == []
    assert f32["vs_transformers"]["max_rel"] < 1e-4
    assert f32["vs_transformers"]["top1"] == 1.0
    layers = f32["layers_vs_transformers"]
    assert len(layers) == 7 and max(layers) < 1e-4
    assert len(f32["layers_gemmalens_vs_f64"]) == len(f32["layers_transformers_vs_f64"]) == 7
    # Three sparse layers, no neuron kept on one side and cut on the other at these sizes.
    assert f32["sparse_flips_gemmalens_vs_f64"] == [0, 0, 0]
    assert f32["gemmalens_vs_transformers_f64"]["max_rel"] < 1e-4

    bf16 = e4b["bfloat16"]
    for key in ("gemmalens_vs_transformers_f32", "transformers_vs_transformers_f32"):
        assert 0 < bf16[key]["max_rel"] < 1.0

    assert set(moe) >= {"bfloat16"} and "float32" not in moe
    experts = moe["bfloat16"]["experts_vs_transformers"]
    assert len(experts["per_layer"]) == 6 and experts["same_set"] > 0.5
    assert moe["bfloat16"]["experts_vs_transformers_f32"]["same_set"] > 0.5
