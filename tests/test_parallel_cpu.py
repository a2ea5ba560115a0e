"""megatron-core on CPU: the bridge is pinned to megatron-core's source, trains like a GPU would
(TP=2 equals TP=1), and leaves the rest of the process (transformers, torch) untouched."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from gad_megatron.parallel import cpu
from gad_megatron.parallel.cuda_stand_ins import CpuRNGStatesTracker, CudaView, TorchView
from gad_megatron.parallel.mcore_fixes import ROUTER_TARGET, ROUTER_TARGET_SHA256, TARGET, TARGET_SHA256
from tests.helpers.torchrun import run_torchrun

HELPER = Path(__file__).parent / "helpers" / "cpu_bridge_run.py"
CUDA_USES = Path(__file__).parent / "data" / "mcore_cuda_uses.json"


def megatron_cuda_uses(module_names: list[str]) -> dict[str, list[str]]:
    """Per megatron-core module: its ``torch.cuda.<attr>`` uses, ``device='cuda'`` literals,
    ``.cuda()`` calls and CUDA tensor-type strings, as sorted ``kind:name xcount`` entries."""
    patterns = {
        "attr": r"torch\.cuda\.([A-Za-z_]+)",
        "literal": r"device\s*=\s*['\"](cuda)['\"]",
        "call": r"\.(cuda)\(\)",
        "typestr": r"'(torch\.cuda\.[A-Za-z0-9]+Tensor)'",
    }
    uses: dict[str, list[str]] = {}
    for name in module_names:
        source = Path(sys.modules[name].__file__).read_text()
        found = []
        for kind, pattern in patterns.items():
            counts: dict[str, int] = {}
            for match in re.findall(pattern, source):
                counts[match] = counts.get(match, 0) + 1
            found += [f"{kind}:{key} x{n}" for key, n in sorted(counts.items())]
        if found:
            uses[name] = found
    return uses


@pytest.fixture(scope="module")
def tp1_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bridge") / "tp1.json"
    run_torchrun(HELPER, 1, str(out), "--tp", "1")
    return json.loads(out.read_text())


def test_replaced_functions_are_those_the_bridge_was_written_for() -> None:
    import megatron.core.optimizer  # noqa: F401 (imports every replaced module)

    changed = [
        f"{rep.module}.{rep.qualname}" for rep in cpu.REPLACED
        if cpu.source_sha256(cpu.original(rep)) != rep.source_sha256
    ]  # fmt: skip
    assert not changed, f"megatron-core changed {changed}: re-check the CPU bridge for them, then update REPLACED"
    random_module = "megatron.core.tensor_parallel.random"
    for name, (sha, _stand_in) in cpu.RNG_FUNCTIONS.items():
        shipped = cpu._ORIGINALS.get((random_module, name)) or getattr(sys.modules[random_module], name)
        assert cpu.source_sha256(shipped) == sha, f"megatron-core changed {name}: re-check RNG_FUNCTIONS"
    for name, (sha, _stand_in) in cpu.DISPATCHER_FUNCTIONS.items():
        shipped = getattr(sys.modules["megatron.core.transformer.moe.moe_utils"], name)
        assert cpu.source_sha256(shipped) == sha, f"megatron-core changed {name}: re-check DISPATCHER_FUNCTIONS"
    for (module, qualname), sha in ((TARGET, TARGET_SHA256), (ROUTER_TARGET, ROUTER_TARGET_SHA256)):
        owner = sys.modules[module] if module in sys.modules else __import__(module, fromlist=["_"])
        for part in qualname.split("."):
            owner = getattr(owner, part)
        assert cpu.source_sha256(getattr(owner, "__wrapped__", owner)) == sha, f"megatron-core changed {qualname}"


def test_cuda_uses_on_the_training_path_are_the_ones_bridged(tp1_run: dict) -> None:
    """A new ``torch.cuda`` call, ``.cuda()`` or CUDA literal in a module our runs import fails here.

    Regenerate after re-checking the bridge:
    ``python -c "from tests.test_parallel_cpu import regenerate; regenerate()"``.
    """
    import importlib

    for name in tp1_run["bridged"]:
        importlib.import_module(name)
    recorded = json.loads(CUDA_USES.read_text())
    assert megatron_cuda_uses(tp1_run["bridged"]) == recorded


def regenerate() -> None:
    import tempfile

    out = Path(tempfile.mkdtemp()) / "run.json"
    run_torchrun(HELPER, 1, str(out), "--tp", "1")
    names = json.loads(out.read_text())["bridged"]
    import importlib

    for name in names:
        importlib.import_module(name)
    CUDA_USES.write_text(json.dumps(megatron_cuda_uses(names), indent=1, sort_keys=True) + "\n")


def test_every_cuda_attribute_used_on_the_path_is_answered_or_harmless() -> None:
    recorded = json.loads(CUDA_USES.read_text())
    used = {entry.split(" ")[0].split(":", 1)[1] for uses in recorded.values() for entry in uses
            if entry.startswith("attr:")}  # fmt: skip
    answered = {name for name in vars(CudaView) if not name.startswith("_")}
    # Attributes that only name types or are read where CUDA is checked first.
    harmless = {"FloatTensor", "HalfTensor", "BFloat", "is_available", "nvtx", "amp", "CUDAGraph",
                "MemPool", "OutOfMemoryError", "graph", "graphs", "random", "default_generators",
                "ExternalStream", "use_mem_pool", "graph_pool_handle", "memory", "set_device",
                "get_device_properties", "get_device_capability", "empty_cache", "memory_stats",
                "set_stream", "_lazy_call", "_lazy_init", "device", "utilization", "temperature",
                "power_draw", "clock_rate", "is_current_stream_capturing", "get_device_name"}  # fmt: skip
    assert used - answered - harmless == set()


def test_tensor_parallel_training_equals_one_process(tmp_path: Path, tp1_run: dict) -> None:
    """DDP + distributed optimizer + grad clipping at TP=2 on gloo: the same losses and grad norms."""
    out = tmp_path / "tp2.json"
    run_torchrun(HELPER, 2, str(out), "--tp", "2", "--distributed-optimizer")
    tp2 = json.loads(out.read_text())
    assert tp2["losses"] == pytest.approx(tp1_run["losses"], abs=1e-5)
    assert tp2["grad_norms"] == pytest.approx(tp1_run["grad_norms"], rel=1e-5)
    assert min(tp1_run["grad_norms"]) > 0.2  # clipping to 0.2 really scaled the gradients
    assert tp1_run["losses"][-1] < tp1_run["losses"][0]


def test_pipeline_parallel_training_equals_one_process(tmp_path: Path) -> None:
    """PP=2 (1F1B over 2 micro-batches, tied embedding split across stages): the same losses and
    grad norms as one process from the same weights."""
    runs = {}
    for pp in (1, 2):
        out = tmp_path / f"pp{pp}.json"
        run_torchrun(HELPER, pp, str(out), "--pp", str(pp), "--named-init")
        runs[pp] = json.loads(out.read_text())
    assert runs[2]["losses"] == pytest.approx(runs[1]["losses"], abs=1e-5)
    assert runs[2]["grad_norms"] == pytest.approx(runs[1]["grad_norms"], rel=1e-5)
    assert min(runs[1]["grad_norms"]) > 0.2 and runs[1]["losses"][-1] < runs[1]["losses"][0]


def test_transformers_in_the_same_process_computes_the_same(tiny_model_dir: Path) -> None:
    """Bridge enabled and a megatron forward/backward done: an HF model's logits are bit-identical,
    and torch's own ``cuda`` namespace, tensor methods and device-constructor cache are untouched."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(3))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        before = model(ids).logits
    constructors = set(torch.utils._device._device_constructors())
    current_device = torch.cuda.current_device

    from megatron.core.optimizer import clip_grads

    from gad_megatron.parallel.launch import destroy_distributed, init_distributed

    init_distributed(1, 1, seed=0)
    try:
        assert cpu.bridged_modules(), "the bridge should be active without CUDA"
        grad = torch.ones(3)
        param = torch.nn.Parameter(torch.zeros(3))
        param.grad = grad
        clip_grads.clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=4.0)  # a replaced function
        assert torch.allclose(param.grad, torch.full((3,), 0.25), atol=1e-6)
        with torch.no_grad():
            after = model(ids).logits
    finally:
        destroy_distributed()
    assert torch.equal(before, after)
    assert torch.cuda.current_device is current_device
    assert "type" not in vars(torch.Tensor) and "cuda" not in vars(torch.Tensor)
    assert torch.zeros(2).type() == "torch.FloatTensor"
    assert set(torch.utils._device._device_constructors()) == constructors
    assert torch.ones(2, device="cpu").device.type == "cpu"


def test_cpu_rng_tracker_forks_and_restores() -> None:
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 7)
    torch.manual_seed(0)
    outside = torch.rand(3)
    torch.manual_seed(0)
    with tracker.fork("model-parallel-rng"):
        first = torch.rand(3)
    assert torch.equal(torch.rand(3), outside)  # the outer stream did not move
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(first, torch.rand(3)) and not torch.equal(first, second)
    with pytest.raises(ValueError, match="already used"):
        tracker.add("other", 7)
    with pytest.raises(ValueError, match="never added"):
        with tracker.fork("missing"):
            pass


def test_factories_move_only_cuda_requests_to_the_cpu() -> None:
    view = TorchView()
    assert view.zeros(2, device="cuda").device.type == "cpu"
    assert view.empty_like(torch.ones(2), device=torch.device("cuda", 0)).device.type == "cpu"
    assert view.arange(3).tolist() == [0, 1, 2]
    assert view.nn is torch.nn and view.float32 is torch.float32
    assert view.cuda.current_device() == torch.device("cpu")
