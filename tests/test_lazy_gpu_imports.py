"""Importing any gad_megatron module never imports a GPU-only package (vLLM, Transformer Engine,
NVML): they load inside the functions that use them, so a CPU install imports everything."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

GPU_PACKAGES = ("vllm", "transformer_engine", "pynvml")

# Runs in a fresh interpreter: a meta-path finder makes the GPU packages unimportable and records
# each gad_megatron module that imports one itself (megatron-core's optional probes are not ours).
PROBE = textwrap.dedent("""
    import importlib, json, pkgutil, sys

    GPU = set(json.loads(sys.argv[1]))
    attempts = []

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] not in GPU:
                return None
            frame = sys._getframe(1)
            while frame.f_globals.get("__name__", "").startswith(("importlib", "_frozen_importlib")):
                frame = frame.f_back  # up to the module whose import statement this is
            module = frame.f_globals.get("__name__", "")
            if module.startswith("gad_megatron"):
                attempts.append(f"{module} imports {name}")
            raise ImportError(f"{name} is blocked by the lazy-import test")

    sys.meta_path.insert(0, Refuse())
    import gad_megatron
    names = [m.name for m in pkgutil.walk_packages(gad_megatron.__path__, "gad_megatron.")]
    for name in names:
        importlib.import_module(name)
    print(json.dumps({"modules": names, "attempts": attempts}))
""")


def test_no_module_imports_a_gpu_package_at_import_time() -> None:
    proc = subprocess.run([sys.executable, "-c", PROBE, json.dumps(GPU_PACKAGES)], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report["modules"]) > 40  # the walk really covered the package
    assert "gad_megatron.rollout.vllm_engine" in report["modules"]
    assert "gad_megatron.models.precision" in report["modules"]
    assert report["attempts"] == []
