"""megatron-core on a CPU: the bridge over its CUDA assumptions (active only without CUDA).

megatron-core 0.16.1 calls ``torch.cuda`` as if a GPU were always there: devices from
``torch.cuda.current_device()``, ``device="cuda"`` literals, stream waits and synchronizes,
a CUDA RNG tracker, ``param.type() == 'torch.cuda.FloatTensor'`` filters. Nothing about the
maths needs a GPU, so with gloo it trains fine on CPU once those calls are answered.

How the bridge stays narrow:

* **Only megatron's modules see it.** Each ``megatron.core.*`` module's global ``torch`` is
  replaced by a :class:`~.cuda_stand_ins.TorchView`, a module object that forwards every
  attribute to the real ``torch`` except ``torch.cuda`` (a :class:`~.cuda_stand_ins.CudaView`)
  and the tensor factories, whose ``device="cuda"`` becomes the CPU. The real ``torch`` and
  ``torch.cuda`` are never modified, so transformers (or anything else) in the same process
  computes exactly what it did (a process-wide patch of the factories once turned
  transformers' logits into NaN: it poisoned ``torch.utils._device._device_constructors``'
  cache).
* **A few functions are replaced by name** where the CUDA dependence is not a ``torch``
  lookup (a ``.cuda()`` call, a tensor-type string, a fused kernel). Each is listed in
  :data:`REPLACED` with a hash of the source it was written against;
  ``tests/test_parallel_cpu.py`` fails when megatron-core changes one of them.
* **RNG**: the CUDA RNG tracker becomes :class:`~.cuda_stand_ins.CpuRNGStatesTracker`, which
  keeps named CPU generator states with the same ``add`` / ``fork`` / ``get_states`` /
  ``set_states`` contract, so model-parallel seeding (``model_parallel_cuda_manual_seed``) and
  dropout forks behave as on GPU; the "CUDA generator" activation recompute saves and restores
  (``tensor_parallel.random``'s ``_get/_set_cuda_rng_state``, see :data:`RNG_FUNCTIONS`) is the
  CPU generator.
* **MoE token dispatch**: the ``alltoall`` dispatcher copies its per-rank split sizes from the GPU
  into numpy arrays (``maybe_move_tensor_to_cpu(..., as_numpy=True)``), which gloo's
  ``all_to_all_single`` takes as integer lists; already on the CPU they stayed tensors, which it
  refuses (``TypeError: all_to_all_single(): incompatible function arguments``). The dispatcher's
  name for that helper is pointed at one that makes the same numpy copy of a CPU tensor
  (:data:`DISPATCHER_FUNCTIONS`).

``enable_cpu_support()`` is idempotent and a no-op when CUDA is available. Call it after
importing megatron-core modules (our builders do): modules imported later are covered by
calling it again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import inspect
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from gad_megatron.parallel.cuda_stand_ins import CpuRNGStatesTracker, TorchView


def _get_cpu_rng_state(*_args: Any, **_kwargs: Any) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *_args: Any, **_kwargs: Any) -> None:
    torch.set_rng_state(new_state)


# megatron.core.tensor_parallel.random's CUDA generator accessors (used by activation recompute's
# CheckpointFunction) -> (source hash they were written against, the CPU stand-in). The setter
# would otherwise queue its call with torch.cuda._lazy_call forever, one stack trace per call.
RNG_FUNCTIONS: dict[str, tuple[str, Callable[..., Any]]] = {
    "_get_cuda_rng_state": ("aa26caaa069c5c4f", _get_cpu_rng_state),
    "_set_cuda_rng_state": ("b179c9d95438b61c", _set_cpu_rng_state),
}

def _to_host(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """``moe_utils.maybe_move_tensor_to_cpu`` as on a GPU: a tensor comes back as numpy when asked."""
    return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor


# megatron.core.transformer.moe.token_dispatcher's imported helpers -> (source hash of the
# moe_utils function they were written against, the CPU stand-in).
DISPATCHER_MODULE = "megatron.core.transformer.moe.token_dispatcher"
DISPATCHER_FUNCTIONS: dict[str, tuple[str, Callable[..., Any]]] = {
    "maybe_move_tensor_to_cpu": ("8fc5847a887d7319", _to_host),
}

_TENSOR_TYPE = torch.Tensor.type
_GPU_VIEW_DEPTH = 0
_TORCH_VIEW: TorchView | None = None
_ORIGINALS: dict[tuple[str, str], Any] = {}


def _type_as_on_gpu(self: torch.Tensor, dtype: Any = None, non_blocking: bool = False, **kwargs: Any) -> Any:
    if dtype is None and not kwargs and self.device.type == "cpu":
        return _TENSOR_TYPE(self).replace("torch.", "torch.cuda.", 1)
    return _TENSOR_TYPE(self, dtype, non_blocking, **kwargs)


def _cuda_stays_on_cpu(self: torch.Tensor, *_args: Any, **_kwargs: Any) -> torch.Tensor:
    return self


@contextlib.contextmanager
def _tensors_as_on_gpu() -> Iterator[None]:
    """While a replaced megatron-core function runs: ``t.type()`` names CUDA types, ``t.cuda()``
    keeps ``t`` on the CPU. Restored on exit (nesting counted), so no other code sees it."""
    global _GPU_VIEW_DEPTH
    if _GPU_VIEW_DEPTH == 0:
        torch.Tensor.type = _type_as_on_gpu  # type: ignore[method-assign]
        torch.Tensor.cuda = _cuda_stays_on_cpu  # type: ignore[method-assign]
    _GPU_VIEW_DEPTH += 1
    try:
        yield
    finally:
        _GPU_VIEW_DEPTH -= 1
        if _GPU_VIEW_DEPTH == 0:
            # Both live on torch._C.TensorBase: deleting the overrides restores them exactly.
            del torch.Tensor.type
            del torch.Tensor.cuda


def _run_as_on_gpu(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def bridged(*args: Any, **kwargs: Any) -> Any:
        with _tensors_as_on_gpu():
            return fn(*args, **kwargs)

    return bridged


@dataclass(frozen=True)
class Replacement:
    """A megatron-core function run with tensors that look CUDA-resident, and why.

    ``source_sha256`` is the hash of the function's source in the pinned megatron-core: a test
    fails when an upgrade changes the function, so the bridge is re-checked, not trusted.
    """

    module: str
    qualname: str  # "function" or "Class.method"
    source_sha256: str
    why: str

    def owner_and_name(self) -> tuple[Any, str]:
        owner: Any = sys.modules[self.module]
        *path, name = self.qualname.split(".")
        for part in path:
            owner = getattr(owner, part)
        return owner, name


def source_sha256(obj: Any) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


_OPT = "megatron.core.optimizer"
_CKPT = "megatron.core.dist_checkpointing.exchange_utils"
REPLACED: tuple[Replacement, ...] = (
    Replacement(f"{_OPT}.clip_grads", "clip_grad_by_total_norm_fp32", "8edb9da5365045a5",
                "asserts grad.type() == 'torch.cuda.FloatTensor' before scaling"),
    Replacement(f"{_OPT}.optimizer", "Float16OptimizerWithFloat16Params.__init__", "1d470dedcf8e2f0e",
                "sorts bf16/fp16/fp32 params by CUDA type names, raises on CPU ones"),
    Replacement(f"{_OPT}.optimizer", "MegatronOptimizer.restore_from_cpu", "de89315ed4ce856a",
                "moves offloaded params back with .cuda()"),
    Replacement(f"{_OPT}.distrib_optimizer", "DistributedOptimizer._build_model_and_main_param_groups", "1b9f0ec06718f817",
                "sorts params by CUDA type names, raises on CPU ones"),
    Replacement(f"{_OPT}.distrib_optimizer", "DistributedOptimizer.get_parameter_state_dp_zero", "812c52ea4568b0ff",
                "gathers optimizer state through .cuda() buffers"),
    Replacement("megatron.core.models.common.language_module.language_module",
                "LanguageModule.setup_embeddings_and_output_layer", "005bdd3315b0611b",
                "tied embeddings with PP > 1: .cuda() on the output layer copy"),
    Replacement(_CKPT, "exchange_loaded_tensors_gather_rounds", "c94a7f0509291a8f", "moves loaded shards with .cuda()"),
    Replacement(_CKPT, "exchange_loaded_tensors_broadcast", "f407cf439a0a7f6b", "moves loaded shards with .cuda()"),
)  # fmt: skip
def cuda_available() -> bool:
    return torch.cuda.is_available()


def bridged_modules() -> list[str]:
    """Names of the megatron-core modules that currently see the CPU view of ``torch``."""
    return sorted(
        name for name, mod in list(sys.modules.items())
        if name.startswith("megatron.core") and isinstance(getattr(mod, "torch", None), TorchView)
    )  # fmt: skip


def _rebind_imported_names(original: Any, wrapped: Any) -> None:
    """``from .clip_grads import clip_grad_by_total_norm_fp32`` copies the function into other
    megatron-core modules: point those names at the wrapper too."""
    for name, mod in list(sys.modules.items()):
        if name.startswith("megatron.core"):
            for attr, value in list(vars(mod).items()):
                if value is original:
                    setattr(mod, attr, wrapped)


def _bridge_module(mod: types.ModuleType) -> None:
    if getattr(mod, "torch", None) is torch and _TORCH_VIEW is not None:
        mod.torch = _TORCH_VIEW


class _BridgeLoader(importlib.abc.Loader):
    """Runs a megatron-core module's own loader, then gives the module the CPU view of torch."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.inner.exec_module(module)
        _bridge_module(module)


class _BridgeFinder(importlib.abc.MetaPathFinder):
    """Covers megatron-core modules imported lazily, mid-call (e.g. dist-checkpoint writers)."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if not name.startswith("megatron.core"):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _BridgeLoader(spec.loader)
                return spec
        return None


def enable_cpu_support() -> bool:
    """Bridge every imported megatron-core module to the CPU; return whether it is active.

    A no-op returning False when CUDA is available. Idempotent; call again after importing
    more megatron-core modules.
    """
    global _TORCH_VIEW
    if cuda_available():
        return False
    import megatron.core.tensor_parallel.random as mc_random

    if _TORCH_VIEW is None:
        _TORCH_VIEW = TorchView()
        sys.meta_path.insert(0, _BridgeFinder())
    for name, mod in list(sys.modules.items()):
        if name.startswith("megatron.core"):
            _bridge_module(mod)
    for rep in REPLACED:
        if (rep.module, rep.qualname) in _ORIGINALS:
            continue
        importlib.import_module(rep.module)
        owner, name = rep.owner_and_name()
        raw = inspect.getattr_static(owner, name)
        _ORIGINALS[(rep.module, rep.qualname)] = raw
        if isinstance(raw, classmethod):
            setattr(owner, name, classmethod(_run_as_on_gpu(raw.__func__)))
        elif isinstance(raw, staticmethod):
            setattr(owner, name, staticmethod(_run_as_on_gpu(raw.__func__)))
        else:
            wrapped = _run_as_on_gpu(raw)
            setattr(owner, name, wrapped)
            _rebind_imported_names(raw, wrapped)
    for name, (_sha, stand_in) in RNG_FUNCTIONS.items():
        _ORIGINALS.setdefault((mc_random.__name__, name), getattr(mc_random, name))
        setattr(mc_random, name, stand_in)
    dispatcher = importlib.import_module(DISPATCHER_MODULE)
    for name, (_sha, stand_in) in DISPATCHER_FUNCTIONS.items():
        _ORIGINALS.setdefault((DISPATCHER_MODULE, name), getattr(dispatcher, name))
        setattr(dispatcher, name, stand_in)
    if not isinstance(mc_random._CUDA_RNG_STATE_TRACKER, CpuRNGStatesTracker):
        mc_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
        mc_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    return True


def original(rep: Replacement) -> Any:
    """The megatron-core function as shipped (before the bridge wrapped it)."""
    raw = _ORIGINALS.get((rep.module, rep.qualname))
    if raw is None:
        importlib.import_module(rep.module)
        owner, name = rep.owner_and_name()
        raw = inspect.getattr_static(owner, name)
    return raw.__func__ if isinstance(raw, (classmethod, staticmethod)) else raw
