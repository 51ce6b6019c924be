"""Sphinx directives that generate reference tables from the code, so nothing is retyped.

``recipe-fields``
    One table (field, type, default, description) of a config dataclass, e.g.
    ``pvt.engine.config.OptimConfig``. Descriptions come from the field's trailing ``#`` comment,
    the comment lines just above it, or a string literal right after it.
``task-recipe-fields``
    For every registered task: its ``data`` section (``Task.data_config``) and, where the task
    extends it, its ``model`` section (``Task.model_config``).
``model-zoo``
    Every registered model's card (``pvt.list_models()`` / ``pvt.model_card()``): stored numbers,
    no model is built.
``published-weights``
    Every row of ``pvt.hub.list_sources()``.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import io
import textwrap
import tokenize
from typing import Any, ClassVar

from docutils import nodes
from docutils.parsers.rst import Directive, directives
from sphinx.util import logging

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Table building


def _inline(text: str) -> list[nodes.Node]:
    """Plain text with ``code`` spans (single or double backticks) as literal nodes."""
    out: list[nodes.Node] = []
    parts = text.replace("``", "`").split("`")
    for i, part in enumerate(parts):
        if not part:
            continue
        out.append(nodes.literal(part, part) if i % 2 else nodes.Text(part))
    return out


def _cell(value: Any) -> nodes.entry:
    entry = nodes.entry()
    para = nodes.paragraph()
    if isinstance(value, nodes.Node):
        para += value
    elif isinstance(value, list):
        for v in value:
            para += v
    else:
        para.extend(_inline(str(value)))
    entry += para
    return entry


def code(text: str) -> nodes.literal:
    return nodes.literal(text, text)


def table(headers: list[str], rows: list[list[Any]], widths: list[int] | None = None) -> nodes.table:
    tbl = nodes.table(classes=["pvt-generated"])
    group = nodes.tgroup(cols=len(headers))
    tbl += group
    for w in widths or [1] * len(headers):
        group += nodes.colspec(colwidth=w)
    head = nodes.thead()
    group += head
    row = nodes.row()
    for h in headers:
        row += _cell(h)
    head += row
    body = nodes.tbody()
    group += body
    for values in rows:
        row = nodes.row()
        for v in values:
            row += _cell(v)
        body += row
    return tbl


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


# --------------------------------------------------------------------------------------------
# Config dataclasses


def _field_notes(cls: type) -> dict[str, tuple[str, str]]:
    """field name -> (annotation as written, description from comments / attribute docstrings)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    comments: dict[int, str] = {}  # 1-based line -> comment text
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    class_def = ast.parse(source).body[0]
    assert isinstance(class_def, ast.ClassDef)
    notes: dict[str, tuple[str, str]] = {}
    body = class_def.body
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        text: list[str] = []
        # comment lines directly above the field (not separated by a blank line)
        above: list[str] = []
        line = node.lineno - 1
        while line >= 1 and lines[line - 1].strip().startswith("#"):
            above.insert(0, comments.get(line, ""))
            line -= 1
        text.extend(above)
        # trailing comments on the field's own lines
        end = node.end_lineno or node.lineno
        text.extend(comments[n] for n in range(node.lineno, end + 1) if n in comments)
        # an attribute docstring right after it
        nxt = body[i + 1] if i + 1 < len(body) else None
        if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
            text.append(inspect.cleandoc(nxt.value.value))
        notes[node.target.id] = (ast.unparse(node.annotation), " ".join(t for t in text if t))
    return notes


def _default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "(required)"


def fields_table(cls: type, skip: tuple[str, ...] = ()) -> nodes.table:
    notes: dict[str, tuple[str, str]] = {}
    for klass in reversed(cls.__mro__):  # inherited fields keep their own comments
        if dataclasses.is_dataclass(klass):
            notes.update(_field_notes(klass))
    rows = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        annotation, text = notes.get(f.name, (str(f.type), ""))
        rows.append([code(f.name), code(annotation), code(_default(f)), text])
    return table(["field", "type", "default", "description"], rows, [2, 2, 2, 5])


class RecipeFields(Directive):
    """``.. recipe-fields:: dotted.path.ToAConfigDataclass``"""

    required_arguments = 1
    option_spec: ClassVar[dict[str, Any]] = {"section": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        cls = _import(self.arguments[0])
        intro = nodes.paragraph()
        section = self.options.get("section")
        if section:
            intro += nodes.Text("Section ")
            intro += code(section)
            intro += nodes.Text(": ")
        intro += code(f"{cls.__module__}.{cls.__qualname__}")
        return [intro, fields_table(cls)]


def registered_tasks() -> list[tuple[str, Any]]:
    """(name, task object) for every task in the registry (``pvt.tasks``)."""
    tasks = importlib.import_module("pvt.tasks")
    return [(name, tasks.get_task(name)) for name in tasks.task_names()]


class TaskRecipeFields(Directive):
    """Every registered task's ``data`` section and, where it extends it, its ``model`` section."""

    def run(self) -> list[nodes.Node]:
        from pvt.engine.config import ModelConfig

        out: list[nodes.Node] = []
        for name, task in registered_tasks():
            sect = nodes.section(ids=[f"task-{name}"])
            sect += nodes.title(text=f"Task {name}")
            for label, cls in (("data", task.data_config), ("model", task.model_config)):
                if label == "model" and cls is ModelConfig:
                    para = nodes.paragraph()
                    para += nodes.Text("Section ")
                    para += code("model")
                    para += nodes.Text(": the engine's ")
                    para += code("ModelConfig")
                    para += nodes.Text(" (above), unchanged.")
                    sect += para
                    continue
                para = nodes.paragraph()
                para += nodes.Text("Section ")
                para += code(label)
                para += nodes.Text(": ")
                para += code(f"{cls.__module__}.{cls.__qualname__}")
                sect += para
                sect += fields_table(cls)
            out.append(sect)
        return out


# --------------------------------------------------------------------------------------------
# Model zoo and published weights


class ModelZoo(Directive):
    """The registry's model cards (stored numbers, checked against the built models by the tests)."""

    def run(self) -> list[nodes.Node]:
        import pvt

        rows = []
        for name in pvt.list_models():
            c = pvt.model_card(name)
            rows.append(
                [
                    code(name),
                    c.family,
                    f"{c.params_m:.3f}",
                    f"{c.paper_params_m:.1f}",
                    f"{c.paper_gmacs:.1f}",
                    f"{c.top1:.1f}",
                    f"{c.drop_path_rate:g}",
                    "-" if c.clip_grad is None else str(c.clip_grad),
                ]
            )
        headers = [
            "model",
            "family",
            "params (M)",
            "paper params (M)",
            "paper GFLOPs @224",
            "ImageNet top-1 (paper)",
            "drop path",
            "clip grad",
        ]
        return [table(headers, rows)]


class PublishedWeights(Directive):
    """Every row of the published-weights table (``pvt.hub.list_sources()``)."""

    option_spec: ClassVar[dict[str, Any]] = {"task": directives.unchanged}

    def run(self) -> list[nodes.Node]:
        from pvt.hub import list_sources

        rows = []
        for s in list_sources(task=self.options.get("task")):
            rows.append([code(s.name), s.task, s.arch, s.host, s.metric_text(), s.license, s.note])
        headers = ["NAME:TAG", "task", "arch", "host", "published metric", "licence", "note"]
        return [table(headers, rows, [3, 1, 2, 1, 2, 1, 4])]


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("recipe-fields", RecipeFields)
    app.add_directive("task-recipe-fields", TaskRecipeFields)
    app.add_directive("model-zoo", ModelZoo)
    app.add_directive("published-weights", PublishedWeights)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
