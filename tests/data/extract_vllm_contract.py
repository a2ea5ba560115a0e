"""Write the part of vLLM's API that ``gad_megatron/rollout/vllm_engine.py`` uses to ``vllm_contract.json``.

It reads vLLM's source with ``ast`` and imports nothing from it, so it runs on a machine without
CUDA or vLLM. For a new pin X.Y.Z, from the repository root:

    pip download vllm==X.Y.Z --no-deps --only-binary :all: \\
        --platform manylinux_2_28_x86_64 --python-version 3.12 -d /tmp/vllm
    unzip -q -o /tmp/vllm/vllm-X.Y.Z-*.whl 'vllm/*' -d /tmp/vllm/src
    python tests/data/extract_vllm_contract.py /tmp/vllm/src > tests/data/vllm_contract.json

A git checkout of vllm-project/vllm at the release tag works as the source root too. Then run
``tests/test_vllm_contract.py``: it fails where the engine no longer matches the new API.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

# contract name -> (file under the source root, qualified function name)
SIGNATURES = {
    "LLM.__init__": ("vllm/entrypoints/llm.py", "LLM.__init__"),
    "LLM.generate": ("vllm/entrypoints/llm.py", "LLM.generate"),
    "LLM.collective_rpc": ("vllm/entrypoints/llm.py", "LLM.collective_rpc"),
    "LLM.reset_prefix_cache": ("vllm/entrypoints/llm.py", "LLM.reset_prefix_cache"),
    "LLM.sleep": ("vllm/entrypoints/llm.py", "LLM.sleep"),
    "LLM.wake_up": ("vllm/entrypoints/llm.py", "LLM.wake_up"),
    # collective_rpc hands a callable the wrapper, which forwards attributes to the Worker.
    "WorkerWrapperBase.__getattr__": ("vllm/v1/worker/worker_base.py", "WorkerWrapperBase.__getattr__"),
    "GPUModelRunner.get_model": ("vllm/v1/worker/gpu_model_runner.py", "GPUModelRunner.get_model"),
    # Worker.reload_weights(*args, **kwargs) forwards to the model runner's.
    "GPUModelRunner.reload_weights": ("vllm/v1/worker/gpu_model_runner.py", "GPUModelRunner.reload_weights"),
    "Platform.is_sleep_mode_available": ("vllm/platforms/interface.py", "Platform.is_sleep_mode_available"),
    "UnquantizedEmbeddingMethod.process_weights_after_loading": (
        "vllm/model_executor/layers/vocab_parallel_embedding.py", "UnquantizedEmbeddingMethod.process_weights_after_loading"),
    "LlamaForCausalLM.load_weights": ("vllm/model_executor/models/llama.py", "LlamaForCausalLM.load_weights"),
    "Qwen2ForCausalLM.load_weights": ("vllm/model_executor/models/qwen2.py", "Qwen2ForCausalLM.load_weights"),
}
# contract name -> (file, class, what to read): "fields" (dataclass / msgspec.Struct / TypedDict
# annotations, bases in the same file included), "attributes" (every ``self.x =`` in its methods)
# or "methods" (public methods of the class body).
RECORDS = {
    "SamplingParams": ("vllm/sampling_params.py", "SamplingParams", "fields"),
    "TokensPrompt": ("vllm/inputs/llm.py", "TokensPrompt", "fields"),
    "EngineArgs": ("vllm/engine/arg_utils.py", "EngineArgs", "fields"),
    "RequestOutput": ("vllm/outputs.py", "RequestOutput", "attributes"),
    "CompletionOutput": ("vllm/outputs.py", "CompletionOutput", "fields"),
    "Logprob": ("vllm/logprobs.py", "Logprob", "fields"),
    "Worker": ("vllm/v1/worker/gpu_worker.py", "Worker", "attributes"),
    "WorkerMethods": ("vllm/v1/worker/gpu_worker.py", "Worker", "methods"),
}
# Submodules the engine imports a name from: (file, name its module-level __getattr__ or body defines)
SUBMODULE_NAMES = {"vllm.platforms": ("vllm/platforms/__init__.py", ["current_platform"])}
# module-level tuples / frozensets of strings
CONSTANTS = {
    "SLEEP_TAGS": ("vllm/v1/executor/abstract.py", "SLEEP_TAGS"),
    "FINISH_REASON_STRINGS": ("vllm/v1/engine/__init__.py", "FINISH_REASON_STRINGS"),
}
# ``X = Literal[...]`` aliases: a parameter or field annotated with one records its choices
LITERAL_FILES = [
    "vllm/config/model.py",
    "vllm/config/parallel.py",
    "vllm/model_executor/model_loader/__init__.py",
]


def parse(root: Path, rel: str) -> ast.Module:
    return ast.parse((root / rel).read_text(), filename=rel)


def find_class(module: ast.Module, name: str) -> ast.ClassDef:
    for node in module.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise KeyError(name)


def find_function(module: ast.Module, qualname: str) -> ast.FunctionDef:
    cls_name, func_name = qualname.split(".")
    defs = [n for n in find_class(module, cls_name).body if isinstance(n, ast.FunctionDef) and n.name == func_name]
    # @overload stubs come first; the implementation is the last definition.
    return defs[-1]


def literal_aliases(root: Path) -> dict[str, list[str]]:
    aliases = {}
    for rel in LITERAL_FILES:
        for node in ast.walk(parse(root, rel)):
            target, value = None, None
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                target, value = node.targets[0].id, node.value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                target, value = node.target.id, node.value
            if isinstance(value, ast.Subscript) and isinstance(value.value, ast.Name) and value.value.id == "Literal":
                elts = value.slice.elts if isinstance(value.slice, ast.Tuple) else [value.slice]
                if all(isinstance(e, ast.Constant) for e in elts):  # Literal[OTHER, ...] is not a value list
                    aliases[target] = [e.value for e in elts]
    return aliases


def choices(annotation: ast.expr | None, aliases: dict[str, list[str]]) -> list[str] | None:
    if annotation is None:
        return None
    names = {n.id for n in ast.walk(annotation) if isinstance(n, ast.Name)}
    found = [value for name in sorted(names & aliases.keys()) for value in aliases[name]]
    return found or None


def signature(func: ast.FunctionDef, aliases: dict[str, list[str]]) -> list[dict[str, Any]]:
    args = func.args
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params = []

    def add(arg: ast.arg, kind: str, has_default: bool) -> None:
        entry: dict[str, Any] = {"name": arg.arg, "kind": kind, "default": has_default}
        if found := choices(arg.annotation, aliases):
            entry["choices"] = found
        params.append(entry)

    for i, (arg, default) in enumerate(zip(positional, defaults)):
        add(arg, "POSITIONAL_ONLY" if i < len(args.posonlyargs) else "POSITIONAL_OR_KEYWORD", default is not None)
    if args.vararg:
        add(args.vararg, "VAR_POSITIONAL", False)
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        add(arg, "KEYWORD_ONLY", default is not None)
    if args.kwarg:
        add(args.kwarg, "VAR_KEYWORD", False)
    return params


def fields(module: ast.Module, cls: ast.ClassDef, aliases: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Annotated class-body names (ClassVars and private ``_x`` left out), same-file bases first."""
    out: list[dict[str, Any]] = []
    for base in cls.bases:
        if isinstance(base, ast.Name):
            try:
                out += fields(module, find_class(module, base.id), aliases)
            except KeyError:
                pass  # a base from another module (TypedDict, msgspec.Struct, ...)
    for node in cls.body:
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        name, text = node.target.id, ast.unparse(node.annotation)
        if name.startswith("_") or text.startswith("ClassVar"):
            continue
        entry: dict[str, Any] = {"name": name, "required": node.value is None and not text.startswith("NotRequired")}
        if found := choices(node.annotation, aliases):
            entry["choices"] = found
        out.append(entry)
    return out


def attributes(cls: ast.ClassDef) -> list[str]:
    """Public names its methods assign on ``self``."""
    names = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        for target in targets:
            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
                if not target.attr.startswith("_"):
                    names.add(target.attr)
    return sorted(names)


def methods(cls: ast.ClassDef) -> list[str]:
    """Public methods defined in the class body."""
    return sorted(n.name for n in cls.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_"))


def module_names(module: ast.Module, wanted: list[str]) -> list[str]:
    """Those of ``wanted`` the module defines at top level or answers in its ``__getattr__``."""
    defined = {t.id for n in module.body if isinstance(n, (ast.Assign, ast.AnnAssign))
               for t in (n.targets if isinstance(n, ast.Assign) else [n.target]) if isinstance(t, ast.Name)}
    defined |= {n.name for n in module.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    for node in module.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            defined |= {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    return sorted(set(wanted) & defined)


def constant(module: ast.Module, name: str) -> list[str]:
    for node in module.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            value = node.value
            if isinstance(value, ast.Call):  # frozenset((...))
                value = value.args[0]
            return sorted(ast.literal_eval(value))
    raise KeyError(name)


def exports(root: Path) -> list[str]:
    """Names ``import vllm; vllm.X`` resolves (its lazy ``MODULE_ATTRS`` table and ``__all__``)."""
    names: set[str] = set()
    for node in parse(root, "vllm/__init__.py").body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == "MODULE_ATTRS":
                names |= set(ast.literal_eval(node.value))
            elif node.targets[0].id == "__all__":
                names |= set(ast.literal_eval(node.value))
    return sorted(names)


def version(root: Path) -> dict[str, str]:
    generated = root / "vllm" / "_version.py"
    if generated.is_file():  # a wheel: setuptools-scm wrote the version and the short commit
        values = {}
        for node in parse(root, "vllm/_version.py").body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        values[target.id] = node.value.value
        commit = values["__commit_id__"].removeprefix("g")
        return {"version": values["__version__"], "commit": commit, "source": "PyPI wheel"}
    git = ["git", "-C", str(root)]
    return {
        "version": subprocess.check_output([*git, "describe", "--tags"], text=True).strip().removeprefix("v"),
        "commit": subprocess.check_output([*git, "rev-parse", "HEAD"], text=True).strip(),
        "source": "git checkout",
    }


def extract(root: Path) -> dict[str, Any]:
    aliases = literal_aliases(root)
    contract: dict[str, Any] = {**version(root), "exports": exports(root), "signatures": {}, "records": {}}
    for name, (rel, qualname) in SIGNATURES.items():
        contract["signatures"][name] = signature(find_function(parse(root, rel), qualname), aliases)
    for name, (rel, cls_name, kind) in RECORDS.items():
        module = parse(root, rel)
        cls = find_class(module, cls_name)
        contract["records"][name] = (fields(module, cls, aliases) if kind == "fields"
                                     else methods(cls) if kind == "methods" else attributes(cls))
    contract["submodules"] = {name: module_names(parse(root, rel), wanted)
                              for name, (rel, wanted) in SUBMODULE_NAMES.items()}
    contract["constants"] = {name: constant(parse(root, rel), var) for name, (rel, var) in CONSTANTS.items()}
    return contract


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} VLLM_SOURCE_ROOT  (the directory holding vllm/)")
    json.dump(extract(Path(sys.argv[1])), sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
