"""The documentation's Python runs: every ```python block of README.md and docs/**/*.md.

Each file's blocks run in order in one fresh namespace (a later block uses what an earlier one made),
in a temporary working directory, with ``HF_HUB_OFFLINE=1``. A block that needs the network or data
that is not here says so in its info string (```python skip) or with a ``<!-- skip -->`` comment on
the line before it; skipped blocks are counted and reported.
The Sphinx build itself is not run here (too slow): CI runs ``make docs``.
"""

from __future__ import annotations

import importlib.util
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_LIMIT = 12288  # bytes
MAX_SKIPPED = 4  # skip markers are for blocks that need the network or big data, and should stay rare
SKIP_COMMENT = "<!-- skip -->"

_OPEN = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int  # 1-based line of the block's first line of code
    code: str
    skip: bool

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def doc_files() -> list[Path]:
    docs = sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.relative_to(ROOT).parts)
    return [README, *docs]


def python_blocks(path: Path) -> list[Block]:
    """The fenced blocks whose info string starts with ``python`` (CommonMark fences: ``` or ~~~)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    previous = ""  # the last non-blank line before a fence
    i = 0
    while i < len(lines):
        m = _OPEN.match(lines[i])
        if m is None or (m["fence"][0] == "`" and "`" in m["info"]):
            if lines[i].strip():
                previous = lines[i].strip()
            i += 1
            continue
        fence, words = m["fence"], m["info"].split()
        close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        end = i + 1
        while end < len(lines) and not close.match(lines[end]):
            end += 1
        if words and words[0] == "python":
            skip = "skip" in words[1:] or previous == SKIP_COMMENT
            blocks.append(Block(path, i + 2, "\n".join(lines[i + 1 : end]) + "\n", skip))
        previous = ""
        i = end + 1
    return blocks


def run_blocks(blocks: list[Block]) -> None:
    """Execute ``blocks`` in order in one fresh namespace; a traceback names the Markdown file and
    the line in it (each block is compiled at its own line numbers)."""
    namespace: dict[str, object] = {"__name__": "__main__"}
    for b in blocks:
        exec(compile("\n" * (b.line - 1) + b.code, str(b.path), "exec"), namespace)


def _files_with_python() -> list[Path]:
    return [p for p in doc_files() if python_blocks(p)]


@pytest.fixture
def _restore_tasks() -> Iterator[None]:
    """Unregister any task an example registered (the registry is process-wide)."""
    from pvt.tasks import task_names, unregister_task

    before = set(task_names())
    yield
    for name in set(task_names()) - before:
        unregister_task(name)


@pytest.mark.usefixtures("_restore_tasks")
@pytest.mark.parametrize("path", _files_with_python(), ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(path)
    runnable = [b for b in blocks if not b.skip]
    if not runnable:
        pytest.skip(f"all {len(blocks)} python block(s) of {path.name} are marked skip")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    run_blocks(runnable)


def test_skipped_blocks_are_few_and_reported() -> None:
    skipped = [b.where for p in doc_files() for b in python_blocks(p) if b.skip]
    total = sum(len(python_blocks(p)) for p in doc_files())
    if skipped:
        warnings.warn(
            f"{len(skipped)} of {total} python blocks in the docs are marked skip: {', '.join(skipped)}",
            stacklevel=1,
        )
    assert total > 0
    assert len(skipped) <= MAX_SKIPPED, f"too many python blocks marked skip ({len(skipped)}): {skipped}"


def test_block_parser(tmp_path: Path) -> None:
    text = (
        "intro\n\n```python\nx = 1\n```\n\n<!-- skip -->\n```python\nfetch()\n```\n"
        "````{eval-rst}\n```python\nnot_a_block()\n```\n````\n"
        "~~~python skip\nalso_skipped()\n~~~\n```bash\necho hi\n```\n"
    )
    path = tmp_path / "page.md"
    path.write_text(text, encoding="utf-8")
    blocks = python_blocks(path)
    assert [(b.line, b.code, b.skip) for b in blocks] == [
        (4, "x = 1\n", False),
        (9, "fetch()\n", True),
        (17, "also_skipped()\n", True),
    ]


def test_readme_size() -> None:
    size = README.stat().st_size
    assert size <= README_LIMIT, f"README.md is {size} bytes; the limit is {README_LIMIT}: move detail into docs/"


def test_readme_zoo_table_is_generated() -> None:
    spec = importlib.util.spec_from_file_location("readme_zoo", ROOT / "docs" / "_ext" / "readme_zoo.py")
    assert spec is not None and spec.loader is not None
    readme_zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme_zoo)
    assert readme_zoo.check(), "README.md's zoo table is stale: run python docs/_ext/readme_zoo.py --write"


def test_readme_relative_links_exist() -> None:
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\((?!https?:|#|mailto:)([^)#\s]+)(?:#[^)]*)?\)", text)
    assert targets
    missing = sorted({t for t in targets if not (ROOT / t).exists()})
    assert not missing, f"README.md links to missing files: {missing}"


def test_every_extra_is_in_the_extras_tables() -> None:
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    for doc in (README, ROOT / "docs" / "getting-started.md"):
        rows = [line for line in doc.read_text(encoding="utf-8").splitlines() if line.startswith("| `")]
        named = set(re.findall(r"`([a-z0-9_-]+)`", " ".join(row.split("|")[1] for row in rows)))
        missing = sorted(set(extras) - named)
        assert not missing, f"{doc.relative_to(ROOT)}: extras missing from its table: {missing}"
