"""Stand-ins for ``torch.cuda`` on a CPU, as megatron-core modules see them (:mod:`.cpu` installs them).

* :class:`TorchView`: a module object forwarding every attribute to the real ``torch`` but
  ``cuda`` (a :class:`CudaView`) and the tensor factories, whose ``device="cuda"`` becomes the CPU.
* :class:`CudaView`: current device, streams, events, synchronize, RNG state and memory counters
  answered for the CPU (streams are no-ops: CPU work is already ordered).
* :class:`CpuRNGStatesTracker`: megatron-core's CUDA RNG tracker contract on CPU generator states.
"""

from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch

_CPU = torch.device("cpu")
_FACTORIES = (
    "arange", "empty", "empty_strided", "eye", "full", "linspace", "ones", "rand", "randint",
    "randn", "randperm", "tensor", "zeros", "as_tensor", "empty_like", "zeros_like", "ones_like",
    "full_like",
)  # fmt: skip


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, int):
        return True  # an ordinal from torch.cuda.current_device() semantics
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _cpu_factory(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(fn)
    def factory(*args: Any, **kwargs: Any) -> torch.Tensor:
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)

    return factory


class _NullStream:
    """Stands in for a CUDA stream or event: CPU work is already ordered."""

    def wait_stream(self, _other: Any) -> None: ...
    def wait_event(self, _event: Any) -> None: ...
    def record_event(self, _event: Any = None) -> _NullStream:
        return self

    def record(self, _stream: Any = None) -> None: ...
    def synchronize(self) -> None: ...
    def query(self) -> bool:
        return True

    def __enter__(self) -> _NullStream:
        return self

    def __exit__(self, *exc: object) -> None: ...


class CudaView(types.ModuleType):
    """``torch.cuda`` as megatron-core sees it on a CPU machine."""

    def __init__(self) -> None:
        super().__init__("torch.cuda")

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return _CPU

    @staticmethod
    def device_count() -> int:
        return 0

    @staticmethod
    def synchronize(_device: Any = None) -> None: ...

    @staticmethod
    def current_stream(_device: Any = None) -> _NullStream:
        return _NullStream()

    default_stream = current_stream

    @staticmethod
    def Stream(*_args: Any, **_kwargs: Any) -> _NullStream:  # noqa: N802 (torch's name)
        return _NullStream()

    Event = Stream

    @staticmethod
    def stream(_stream: Any) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    @staticmethod
    def get_rng_state(_device: Any = "cuda") -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, _device: Any = "cuda") -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def memory_allocated(_device: Any = None) -> int:
        return 0

    max_memory_allocated = memory_allocated
    memory_reserved = memory_allocated
    max_memory_reserved = memory_allocated

    @staticmethod
    def nvtx_range_push(_msg: str) -> None: ...

    @staticmethod
    def nvtx_range_pop() -> None: ...


class TorchView(types.ModuleType):
    """``torch`` as megatron-core sees it: the real module but for ``cuda`` and the factories."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = CudaView()
        for name in _FACTORIES:
            setattr(self, name, _cpu_factory(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class CpuRNGStatesTracker:
    """Named CPU RNG states with the CUDA tracker's contract (``add``, ``fork``, states).

    ``fork(name)`` swaps the process's CPU generator to the named state for the block and
    back afterwards, so tensor-parallel ranks draw from their own streams for dropout and
    weight init exactly as they would from CUDA generators.
    """

    def __init__(self, *_args: Any, **_kwargs: Any) -> None:
        self.reset()

    def reset(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()
        self._is_initialized = False

    def is_initialized(self) -> bool:
        return self._is_initialized

    def get_states(self) -> dict[str, torch.Tensor]:
        return dict(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._is_initialized = True
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"RNG seed {seed} already used by another tracked state")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already exists")
        self._is_initialized = True
        self.seeds_.add(seed)
        outer = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(outer)

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng") -> Iterator[None]:
        if name not in self.states_:
            raise ValueError(f"RNG state {name!r} was never added")
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)
