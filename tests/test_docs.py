"""Documentation that runs: every fenced `bash` and `python` block of README.md and docs/*.md.

One test per block, named `FILE:LINE` (the line of the opening fence). Shell blocks run under
`bash -e`; Python blocks run as written, top-level `await` included. Each block runs in a fresh
home and working directory, with a fresh cache folder (`SHOAL_CACHE_DIR`) that reuses the joined
model weights and the converted embedder of the real cache, and with the repository's `.venv/bin`
first on PATH. The working directory holds links to the repository's `.venv` and `examples`, so
a block reads as if run from a checkout.

A comment line right before a fence says what to do with it instead:

    <!-- docs-test: skip (why it cannot run in a test) -->    reported as skipped, with the reason
    <!-- docs-test: file examples/fleet.yaml -->               the block must equal that file

Other fences (YAML, plain text) are not run.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from shoal.settings import default_cache_dir

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN = {"bash", "python"}
# Fence languages that look runnable but are not run: a block must say bash or python.
LOOKS_RUNNABLE = {"sh", "shell", "console", "zsh", "py", "python3", "pycon"}
# What the blocks reuse from the real cache: the joined weights and the converted embedder.
SHARED_CACHE = ("weights", "embedders")
LINKED = (".venv", "examples")  # what a block finds in its working directory
TIMEOUT_S = 180

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
_SKIP = re.compile(r"^skip\s+\((?P<reason>.+)\)$")
_FILE = re.compile(r"^file\s+(?P<path>\S+)$")

# Runs a Python block as written, top-level `await` allowed, as the module `__main__` (so that
# import paths such as `__main__:Verdict` resolve) with nothing of the runner in its namespace,
# and with the Markdown file's own line numbers in tracebacks.
_PYTHON_RUNNER = """\
import ast, asyncio, inspect, sys, types

def run(source_path, shown_as):
    with open(source_path, encoding="utf-8") as f:
        source = f.read()
    code = compile(source, shown_as, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    module = types.ModuleType("__main__")
    module.__file__ = shown_as
    sys.modules["__main__"] = module
    sys.argv = [shown_as]
    result = eval(code, module.__dict__)
    if inspect.iscoroutine(result):
        asyncio.run(result)

run(sys.argv[1], sys.argv[2])
"""


@dataclass(frozen=True)
class Block:
    """One fenced block of a Markdown file."""

    path: Path
    shown: str  # the file as tests name it: its path in the repository
    line: int  # 1-based line of the opening fence
    lang: str
    text: str  # the lines between the fences, without the fence's indentation
    marker: str | None  # the docs-test marker right before the fence, if any

    @property
    def name(self) -> str:
        return f"{self.shown}:{self.line}"


def blocks_of(path: Path, rel: str) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a Markdown file, and the problems with its docs-test markers."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    pending: tuple[int, str] | None = None  # a marker waiting for its fence
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = _MARKER.match(line)
        if marker:
            if pending is not None:
                problems.append(f"{rel}:{pending[0]}: docs-test marker not followed by a fence")
            pending = (i + 1, marker.group("body"))
            i += 1
            continue
        fence = _FENCE.match(line)
        if not fence:
            if pending is not None:
                problems.append(f"{rel}:{pending[0]}: docs-test marker not right before a fence")
                pending = None
            i += 1
            continue
        indent, mark = len(fence.group("indent")), fence.group("fence")
        info = fence.group("info").strip()
        start = i
        body: list[str] = []
        i += 1
        closing = re.compile(rf"^ *{re.escape(mark[0])}{{{len(mark)},}}\s*$")
        while i < len(lines) and not closing.match(lines[i]):
            text = lines[i]
            body.append(text[indent:] if text[:indent].strip() == "" else text.lstrip())
            i += 1
        if i == len(lines):
            problems.append(f"{rel}:{start + 1}: fence never closed")
        i += 1
        lang = info.split()[0].lower() if info else ""
        blocks.append(
            Block(path, rel, start + 1, lang, "\n".join(body), pending[1] if pending else None)
        )
        pending = None
    if pending is not None:
        problems.append(f"{rel}:{pending[0]}: docs-test marker at the end of the file")
    return blocks, problems


def all_blocks() -> tuple[list[Block], list[str]]:
    blocks: list[Block] = []
    problems: list[str] = []
    for path in DOCS:
        found, wrong = blocks_of(path, str(path.relative_to(ROOT)))
        blocks += found
        problems += wrong
    return blocks, problems


BLOCKS, MARKER_PROBLEMS = all_blocks()


def _params() -> tuple[list[object], list[object]]:
    """(runnable blocks, file-checked blocks) as pytest params; skipped blocks carry a skip."""
    runs: list[object] = []
    files: list[object] = []
    for block in BLOCKS:
        marker = block.marker
        if marker is not None and (skip := _SKIP.match(marker)):
            reason = f"{block.name}: {skip.group('reason')}"
            runs.append(pytest.param(block, id=block.name, marks=pytest.mark.skip(reason=reason)))
        elif marker is not None and _FILE.match(marker):
            files.append(pytest.param(block, id=block.name))
        elif block.lang in RUN or marker is not None:
            # A marker that is neither a skip nor a file check fails in the test.
            runs.append(pytest.param(block, id=block.name))
    return runs, files


RUNNABLE, FILE_CHECKED = _params()


# -- the sandbox a block runs in -------------------------------------------------------------------


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A fresh working directory and the environment to run a block in."""
    home, work, cache = tmp_path / "home", tmp_path / "work", tmp_path / "cache"
    for folder in (home, work, cache):
        folder.mkdir()
    real_cache = default_cache_dir()
    for name in SHARED_CACHE:
        shared = real_cache / name
        shared.mkdir(parents=True, exist_ok=True)  # the first block to need it fills it
        (cache / name).symlink_to(shared, target_is_directory=True)
    for name in LINKED:
        (work / name).symlink_to(ROOT / name, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    env.pop("XDG_CACHE_HOME", None)
    env.pop("VIRTUAL_ENV", None)
    env |= {
        "HOME": str(home),
        "SHOAL_CACHE_DIR": str(cache),
        "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        "PYTHONDONTWRITEBYTECODE": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    return work, env


def _run(command: list[str], work: Path, env: dict[str, str], block: Block) -> None:
    # A session of its own: on a timeout, everything the block started is stopped with it.
    with subprocess.Popen(
        command,
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            pytest.fail(
                f"{block.name}: still running after {TIMEOUT_S} s\n{_tail(stderr)}", pytrace=False
            )
        finally:
            with contextlib.suppress(ProcessLookupError):  # nothing it started outlives it
                os.killpg(process.pid, signal.SIGKILL)
    if process.returncode != 0:
        pytest.fail(
            f"{block.name} ({block.lang}) exited with {process.returncode}\n"
            f"--- stdout ---\n{_tail(stdout)}\n--- stderr ---\n{_tail(stderr)}",
            pytrace=False,
        )


def _tail(text: str, chars: int = 6000) -> str:
    return text[-chars:]


# -- the tests -----------------------------------------------------------------------------------


def test_markers_are_well_formed() -> None:
    assert not MARKER_PROBLEMS, MARKER_PROBLEMS


def test_no_block_looks_runnable_but_is_not_run() -> None:
    quiet = [b.name for b in BLOCKS if b.lang in LOOKS_RUNNABLE and b.marker is None]
    assert not quiet, f"write these fences as ```bash or ```python so that they run: {quiet}"


def test_docs_are_collected() -> None:
    assert any(b.lang == "bash" for b in BLOCKS)
    assert any(b.lang == "python" for b in BLOCKS)


@pytest.mark.parametrize("block", FILE_CHECKED)
def test_block_equals_file(block: Block) -> None:
    assert block.marker is not None
    found = _FILE.match(block.marker)
    assert found is not None
    target = ROOT / found.group("path")
    assert target.is_file(), f"{block.name}: {found.group('path')} does not exist"
    shipped = target.read_text(encoding="utf-8")
    assert block.text + "\n" == shipped, (
        f"{block.name} differs from {found.group('path')}: the block and the file must match"
    )


@pytest.mark.parametrize("block", RUNNABLE)
def test_block_runs(block: Block, sandbox: tuple[Path, dict[str, str]]) -> None:
    if block.marker is not None:
        pytest.fail(
            f"{block.name}: unknown docs-test marker {block.marker!r} "
            "(write 'skip (reason)' or 'file PATH')"
        )
    work, env = sandbox
    # Blank lines first, so that errors name the line of the Markdown file.
    source = "\n" * block.line + block.text + "\n"
    script = work.parent / ("block.sh" if block.lang == "bash" else "block.py")
    script.write_text(source, encoding="utf-8")
    if block.lang == "bash":
        _run(["bash", "-e", str(script)], work, env, block)
    else:
        runner = [sys.executable, "-c", _PYTHON_RUNNER, str(script), str(block.path)]
        _run(runner, work, env, block)


# -- the collector and the runner themselves -------------------------------------------------------


def test_collector_reads_fences_and_markers(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n"
        "<!-- docs-test: skip (runs forever) -->\n"
        "```bash\nshoal serve\n```\n"
        "- a list item:\n\n"
        "  ```python\n  print('indented')\n  ```\n"
        "<!-- docs-test: file examples/x.yaml -->\n"
        "````yaml\na: 1\n```\n````\n"
        "<!-- docs-test: skip (orphan) -->\n\n"
        "text\n",
        encoding="utf-8",
    )
    blocks, problems = blocks_of(page, "page.md")
    assert [(b.name, b.lang, b.marker) for b in blocks] == [
        ("page.md:3", "bash", "skip (runs forever)"),
        ("page.md:8", "python", None),
        ("page.md:12", "yaml", "file examples/x.yaml"),
    ]
    assert blocks[1].text == "print('indented')"
    assert blocks[2].text == "a: 1\n```"
    assert problems == ["page.md:16: docs-test marker not right before a fence"]


def test_python_blocks_run_as_main_with_top_level_await(tmp_path: Path) -> None:
    block = tmp_path / "block.py"
    block.write_text(
        "import asyncio\n"
        "await asyncio.sleep(0)\n"
        "assert __name__ == '__main__'\n"
        "assert 'run' not in globals() and 'ast' not in globals(), sorted(globals())\n"
        "raise SystemExit(3)\n",
        encoding="utf-8",
    )
    done = subprocess.run(
        [sys.executable, "-c", _PYTHON_RUNNER, str(block), "page.md"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 3, done.stderr
