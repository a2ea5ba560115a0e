"""Which run-config fields exist (from the pydantic model tree) and which the product reads (from
the source's syntax tree): the checker behind ``tests/test_config_fields.py``.

"Read" means: some product module loads ``<section>.field_name`` where ``<section>`` is an
expression the checker can tell holds that field's config section:

* an attribute named after a field holding the section: ``cfg.train.beta``, ``self.cfg.eval.judge.model``;
* a name or ``self.x`` assigned from such an attribute: ``t = cfg.train`` then ``t.beta``;
* a parameter annotated with the section's class: ``def f(teacher: TeacherConfig)`` then ``teacher.model``;
* a loop or comprehension variable over a list section: ``for m in cfg.teacher.context_messages: m.role``.

An assignment or a ``model_copy(update=...)`` key is not a read, and a field of the same name on
another object (``config.bf16`` of megatron's TransformerConfig) does not count for the config's.
What the checker cannot see (a section passed on under an unannotated parameter, ``getattr`` with
a computed name) reads as unread: the fix is to annotate, or the field really is dead.
"""

from __future__ import annotations

import ast
import types
import typing
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

Section = type[BaseModel]


def nested_model(annotation: Any) -> Section | None:
    """The config section a field holds: ``X``, ``X | None`` and ``list[X]`` -> X; else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            if (model := nested_model(arg)) is not None:
                return model
    return None


def config_fields(model: Section, prefix: str = "") -> Iterator[tuple[str, Section, str]]:
    """Every field of ``model`` and of its sections: (dotted name, the section class holding it, its name)."""
    for name, info in model.model_fields.items():
        yield prefix + name, model, name
        if (section := nested_model(info.annotation)) is not None:
            yield from config_fields(section, f"{prefix}{name}.")


def _section_names(model: Section) -> tuple[dict[str, Section], dict[str, Section]]:
    """(field name -> the section it holds, class name -> section) over the whole tree; a
    section's base classes name it too (code annotated ``RunConfig`` reads a subclass's fields)."""
    by_field: dict[str, Section] = {}
    sections = {model}
    for _dotted, owner, name in config_fields(model):
        if (section := nested_model(owner.model_fields[name].annotation)) is not None:
            by_field[name] = section
            sections.add(section)
    by_class = {base.__name__: section for section in sections for base in section.__mro__
                if issubclass(base, BaseModel) and base is not BaseModel}  # fmt: skip
    return by_field, by_class


class _Reads(ast.NodeVisitor):
    """Collects (section class name, field name) for every config read in one module."""

    def __init__(self, by_field: dict[str, Section], by_class: dict[str, Section]) -> None:
        self.by_field, self.by_class = by_field, by_class
        self.bound: dict[str, Section] = {}  # "t", "self.cfg" -> section
        self.reads: set[tuple[str, str]] = set()

    def section_of(self, expr: ast.expr) -> Section | None:
        if (key := _dotted(expr)) in self.bound:
            return self.bound[key]
        return self.by_field.get(expr.attr) if isinstance(expr, ast.Attribute) else None

    def _bind(self, target: ast.expr, value: ast.expr | None, section: Section | None = None) -> None:
        if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple):
            for t, v in zip(target.elts, value.elts):
                self._bind(t, v)
        elif (key := _dotted(target)) is not None:
            found = section or (self.section_of(value) if value is not None else None)
            if found is not None:
                self.bound[key] = found

    def _bind_arguments(self, args: ast.arguments) -> None:
        for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs]:
            nodes = list(ast.walk(arg.annotation)) if arg.annotation is not None else []
            names = {n.id for n in nodes if isinstance(n, ast.Name)}
            names |= {word for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)
                      for word in n.value.replace("|", " ").split()}  # fmt: skip
            for name in names & self.by_class.keys():
                self.bound[arg.arg] = self.by_class[name]

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:  # noqa: N802 (ast's name)
        self._bind_arguments(node.args)
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Assign(self, node: ast.Assign) -> None:  # noqa: N802
        for target in node.targets:
            self._bind(target, node.value)
        self.generic_visit(node)

    def visit_For(self, node: ast.For) -> None:  # noqa: N802
        self._bind(node.target, None, self.section_of(node.iter))
        self.generic_visit(node)

    def visit_comprehension(self, node: ast.comprehension) -> None:
        self._bind(node.target, None, self.section_of(node.iter))
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:  # noqa: N802
        if isinstance(node.ctx, ast.Load) and (section := self.section_of(node.value)) is not None:
            self.reads.add((section.__name__, node.attr))
        self.generic_visit(node)


def _dotted(expr: ast.expr | None) -> str | None:
    """``t`` -> "t", ``self.cfg`` -> "self.cfg"; other expressions -> None."""
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name):
        return f"{expr.value.id}.{expr.attr}"
    return None


def config_reads(model: Section, files: Iterable[Path]) -> set[tuple[str, str]]:
    """(section class name, field name) of every config read in ``files`` (see the module doc)."""
    by_field, by_class = _section_names(model)
    reads: set[tuple[str, str]] = set()
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        visitor = _Reads(by_field, by_class)
        # Twice: the second pass sees what is bound after its use in source order (``self.cfg``
        # set in ``__init__`` below a method, a comprehension's variable after its element).
        for _ in range(2):
            visitor.visit(tree)
        reads |= visitor.reads
    return reads


def unread_fields(model: Section, files: Iterable[Path]) -> list[str]:
    """Dotted fields of ``model`` that no file in ``files`` reads (see the module doc)."""
    reads = config_reads(model, files)
    return [dotted for dotted, owner, name in config_fields(model) if (owner.__name__, name) not in reads]


def keys_set(tree: dict[str, Any], model: Section, prefix: str = "") -> Iterator[str]:
    """The dotted fields a config tree (a loaded YAML) sets; list items of a section (e.g.
    ``teacher.context_messages``) are walked as that section. KeyError on a key ``model`` lacks."""
    for key, value in tree.items():
        info = model.model_fields[key]
        yield prefix + key
        section = nested_model(info.annotation)
        if section is not None:
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict):
                    yield from keys_set(item, section, f"{prefix}{key}.")
