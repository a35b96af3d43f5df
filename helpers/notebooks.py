"""Re-execute the notebooks in a fresh kernel and check their committed outputs.

Run from the repository root::

    python -m helpers.notebooks                        # execute every notebooks/*.ipynb
    python -m helpers.notebooks notebooks/01_x.ipynb   # execute just these
    python -m helpers.notebooks --check                # only check the committed outputs

Each notebook is cleared, executed top to bottom by :mod:`nbclient` (working directory: the
notebook's own folder) and written back with :func:`nbformat.write`, so the committed copy
always shows one clean run. The kernel is always the interpreter running this module
(``sys.executable``), whatever Jupyter kernel specs are installed, with ``PYTHONHASHSEED=0``.

:func:`check_notebook` is the hygiene check applied after every run (and by ``--check`` and the
tests): no error outputs, nothing on stderr, every code cell executed with counts 1..N in order,
and no absolute path of the machine that ran it in any text output.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nbformat
from ipykernel.kernelspec import get_kernel_dict
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbformat import NotebookNode
from traitlets import default

__all__ = [
    "KERNEL_NAME",
    "NOTEBOOK_DIR",
    "REPO_ROOT",
    "NotebookExecutionError",
    "check_notebook",
    "execute_notebook",
    "find_notebooks",
    "main",
]

REPO_ROOT: Path = Path(__file__).resolve().parent.parent
"""The repository root: the folder that holds the ``helpers`` package."""

NOTEBOOK_DIR: Path = REPO_ROOT / "notebooks"
"""Where the numbered notebooks live."""

KERNEL_NAME = "python3"
"""Kernel name used for execution; it is always pinned to ``sys.executable``."""

KERNEL_ENV: dict[str, str] = {
    "PYTHONHASHSEED": "0",  # deterministic hash()/set order
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",  # silence debugpy's frozen-modules warning
    # TensorFlow's default numeric path on x86 (oneDNN kernels), whatever the shell says: the
    # test suite checks the committed outputs under the other one (the root conftest.py), so a
    # checked output that depends on rounding fails on the machine that executed it.
    "TF_ENABLE_ONEDNN_OPTS": "1",
}
"""Extra environment variables for the kernel process."""

DEFAULT_KERNELSPEC: dict[str, str] = {
    "display_name": "Python 3 (ipykernel)",
    "language": "python",
    "name": KERNEL_NAME,
}
"""Notebook ``metadata.kernelspec`` written when a notebook has none."""

# Markers of an absolute path of the machine that ran a notebook. A marker only counts when it
# is not glued to a preceding word character, dot or dash (so ``https://host/opt/...`` and
# ``../home/...`` are not flagged); ``site-packages`` counts anywhere.
_PATH_MARKERS: tuple[str, ...] = (
    "/work/",
    "/root/",
    "/home/",
    "/tmp/",
    "/Users/",
    "/usr/lib/",
    "/usr/local/lib/",
    "/opt/",
)
_NOT_GLUED = r"(?<![\w.\-])"
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_TEXT_MIME = ("text/plain", "text/html", "text/markdown", "text/latex")


class NotebookExecutionError(RuntimeError):
    """A cell of a notebook raised (or timed out) during :func:`execute_notebook`."""

    def __init__(self, path: Path, cell_index: int | None, source: str, detail: str) -> None:
        self.path = path
        self.cell_index = cell_index
        self.source = source
        self.detail = detail
        where = f"cell {cell_index}" if cell_index is not None else "kernel start-up"
        first_line = next((line for line in source.splitlines() if line.strip()), "")
        snippet = f" ({first_line.strip()[:80]!r})" if first_line else ""
        super().__init__(f"{path.name}: {where}{snippet} failed:\n{detail}")


class _PinnedKernelSpecManager(KernelSpecManager):
    """Kernel spec manager whose ``python3`` kernel is always the current interpreter."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        """Return the pinned spec for :data:`KERNEL_NAME`, the installed one otherwise.

        The pinned spec is ipykernel's own native spec for this interpreter, with ``argv[0]``
        forced to ``sys.executable`` and :data:`KERNEL_ENV` added to its environment.
        """
        if kernel_name != KERNEL_NAME:
            return super().get_kernel_spec(kernel_name)
        spec = get_kernel_dict()
        spec["argv"] = [sys.executable, *spec["argv"][1:]]
        spec["env"] = {**spec.get("env", {}), **KERNEL_ENV}
        return KernelSpec(name=KERNEL_NAME, **spec)


class _PinnedKernelManager(AsyncKernelManager):
    """Kernel manager using :class:`_PinnedKernelSpecManager`."""

    @default("kernel_spec_manager")
    def _pinned_kernel_spec_manager_default(self) -> KernelSpecManager:
        return _PinnedKernelSpecManager(data_dir=self.data_dir)


def find_notebooks(paths: Sequence[str | Path] = ()) -> list[Path]:
    """Resolve command-line paths to notebook files.

    No paths: every ``notebooks/*.ipynb`` of the repository, sorted. A folder stands for the
    ``*.ipynb`` files directly inside it. Raises :class:`FileNotFoundError` for a missing path.
    """
    if not paths:
        return sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(path.glob("*.ipynb")))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such notebook: {path}")
    return found


def _clear(nb: NotebookNode) -> None:
    """Remove outputs, execution counts and execution timings from every code cell."""
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
            cell.metadata.pop("execution", None)


def execute_notebook(
    path: Path, timeout: int = 1200, cell_seconds: dict[int, float] | None = None
) -> float:
    """Clear, execute top to bottom in a fresh kernel and write back the notebook at ``path``.

    The kernel is ``sys.executable`` running ipykernel, started in the notebook's folder with
    ``PYTHONHASHSEED=0``; ``timeout`` is the limit per cell in seconds. The notebook is only
    written back if every cell ran; otherwise the file is left untouched and
    :class:`NotebookExecutionError` (naming the notebook and the cell index) is raised.

    Returns the wall-clock seconds the execution took; if ``cell_seconds`` is given, it is
    filled with each code cell's wall-clock seconds, by cell index.
    """
    path = Path(path).resolve()
    nb = nbformat.read(path, as_version=4)
    _clear(nb)
    nb.metadata.setdefault("kernelspec", dict(DEFAULT_KERNELSPEC))

    current: dict[str, Any] = {"index": None}

    def on_cell_execute(cell: NotebookNode, cell_index: int, **_: Any) -> None:
        current["index"] = cell_index
        current["start"] = time.perf_counter()

    def on_cell_executed(cell: NotebookNode, cell_index: int, **_: Any) -> None:
        if cell_seconds is not None:
            cell_seconds[cell_index] = time.perf_counter() - current["start"]

    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=KERNEL_NAME,
        kernel_manager_class=_PinnedKernelManager,
        resources={"metadata": {"path": str(path.parent)}},
        on_cell_execute=on_cell_execute,
        on_cell_executed=on_cell_executed,
        record_timing=False,
        allow_errors=False,
    )
    start = time.perf_counter()
    try:
        client.execute()
    except Exception as exc:
        index = current["index"]
        source = nb.cells[index].source if index is not None else ""
        detail = _ANSI.sub("", str(exc)).strip() or type(exc).__name__
        raise NotebookExecutionError(path, index, source, detail) from exc
    elapsed = time.perf_counter() - start
    nbformat.write(nb, path)
    return elapsed


def _text(value: Any) -> str:
    """Join a multiline notebook string (str or list of str) into one string."""
    if isinstance(value, list):
        return "".join(str(part) for part in value)
    return "" if value is None else str(value)


def _path_patterns() -> list[re.Pattern[str]]:
    """Regular expressions that find an absolute path of this machine in a text."""
    patterns = [re.compile(_NOT_GLUED + re.escape(marker)) for marker in _PATH_MARKERS]
    patterns.append(re.compile(re.escape("site-packages")))
    patterns.append(re.compile(r"(?<![A-Za-z])[A-Z]:\\"))
    local: set[str] = {str(REPO_ROOT), os.path.realpath(REPO_ROOT)}
    try:
        home = str(Path.home())
        local |= {home, os.path.realpath(home)}
    except RuntimeError:  # no home directory can be determined
        pass
    for root in sorted(local):
        if len(root.strip("/\\")) >= 2:  # never "/" on its own
            patterns.append(re.compile(_NOT_GLUED + re.escape(root) + r"(?![\w.\-])"))
    return patterns


def _find_path(text: str, patterns: Sequence[re.Pattern[str]]) -> str | None:
    """The first absolute path found in ``text`` (shortened), or ``None``."""
    text = _ANSI.sub("", text)
    for pattern in patterns:
        match = pattern.search(text)
        if match:
            rest = text[match.start() :]
            token = re.split(r"[\s'\"<>()\[\]{},;]", rest, maxsplit=1)[0] or match.group(0)
            return token[:80]
    return None


def _output_texts(output: NotebookNode) -> list[tuple[str, str]]:
    """(label, text) pairs of an output that are checked for absolute paths."""
    kind = output.get("output_type")
    if kind == "stream":
        return [(output.get("name", "stream"), _text(output.get("text")))]
    if kind in ("execute_result", "display_data", "update_display_data"):
        data = output.get("data", {})
        return [(mime, _text(data[mime])) for mime in _TEXT_MIME if mime in data]
    if kind == "error":
        traceback = "\n".join(_text(line) for line in output.get("traceback", []))
        return [("error traceback", f"{output.get('evalue', '')}\n{traceback}")]
    return []


def check_notebook(path_or_nb: str | Path | NotebookNode) -> list[str]:
    """Hygiene problems of a committed notebook; an empty list means clean.

    ``path_or_nb`` is a notebook file or an already-loaded :class:`nbformat.NotebookNode`.
    Flags error outputs, stderr streams, code cells never executed, execution counts that are
    not exactly 1..N in order, ``execute_result`` counts that disagree with their cell, and
    absolute paths of the machine (``/home/``, ``/tmp/``, ``site-packages``, ``C:\\``, the
    repository root, the home directory, ...) in stream, ``text/*`` and traceback outputs.
    Code cells with only whitespace are ignored (nbclient skips them). Each message names the
    notebook file and the cell index (0-based, counting all cells).
    """
    if isinstance(path_or_nb, (str, Path)):
        name = Path(path_or_nb).name
        nb = nbformat.read(path_or_nb, as_version=4)
    else:
        name = "<notebook>"
        nb = path_or_nb
    patterns = _path_patterns()
    problems: list[str] = []
    expected = 1
    seen: set[int] = set()
    for index, cell in enumerate(nb.cells):
        if cell.get("cell_type") != "code" or not _text(cell.get("source")).strip():
            continue
        where = f"{name}: cell {index}"
        count = cell.get("execution_count")
        if count is None:
            problems.append(f"{where}: code cell was not executed (execution_count is None)")
        else:
            if count != expected:
                note = ", duplicate" if count in seen else ""
                problems.append(
                    f"{where}: execution count {count}, expected {expected}"
                    f" (counts must run 1..N in order{note})"
                )
            seen.add(count)
            expected += 1
        for output in cell.get("outputs", []):
            kind = output.get("output_type")
            if kind == "error":
                problems.append(
                    f"{where}: error output {output.get('ename', '?')}: {output.get('evalue', '')}"
                )
            elif kind == "stream" and output.get("name") == "stderr":
                first = _text(output.get("text")).strip().splitlines()
                problems.append(f"{where}: stderr output {first[0][:100] if first else ''!r}")
            elif kind == "execute_result" and count is not None:
                result_count = output.get("execution_count")
                if result_count is not None and result_count != count:
                    problems.append(
                        f"{where}: execute_result count {result_count} != cell count {count}"
                    )
            for label, text in _output_texts(output):
                found = _find_path(text, patterns)
                if found is not None:
                    problems.append(f"{where}: absolute path {found!r} in {label} output")
    return problems


def _display(path: Path) -> str:
    """``path`` relative to the repository root when it lies inside, else as given."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status (0 = all clean).

    Executes (or with ``--check`` only checks) the given notebooks, default all
    ``notebooks/*.ipynb``. Stops at the first notebook whose execution fails (exit 1);
    hygiene problems are printed one per line and also give exit 1.
    """
    parser = argparse.ArgumentParser(
        prog="python -m helpers.notebooks",
        description="Re-execute notebooks in a fresh kernel and check their outputs.",
    )
    parser.add_argument(
        "paths", nargs="*", help="notebooks or folders (default: notebooks/*.ipynb)"
    )
    parser.add_argument(
        "--check", action="store_true", help="only check committed outputs, execute nothing"
    )
    parser.add_argument(
        "--timeout", type=int, default=1200, help="per-cell timeout in seconds (default 1200)"
    )
    parser.add_argument(
        "--slowest",
        type=int,
        default=5,
        metavar="N",
        help="after each notebook, print its N slowest cells (default 5; 0 = none)",
    )
    args = parser.parse_args(argv)

    try:
        notebooks = find_notebooks(args.paths)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not notebooks:
        print("no notebooks found")
        return 0

    status = 0
    for path in notebooks:
        shown = _display(path)
        if not args.check:
            print(f"{shown}: executing ...", flush=True)
            try:
                cells: dict[int, float] = {}
                seconds = execute_notebook(path, timeout=args.timeout, cell_seconds=cells)
            except NotebookExecutionError as exc:
                print(f"FAILED {shown}: {exc}", file=sys.stderr)
                return 1
            print(f"{shown}: executed in {seconds:.1f} s", flush=True)
            for index, cell_time in sorted(cells.items(), key=lambda kv: -kv[1])[: args.slowest]:
                print(f"  cell {index}: {cell_time:.1f} s", flush=True)
        problems = check_notebook(path)
        for problem in problems:
            print(f"  {problem}")
        if problems:
            status = 1
        elif args.check:
            print(f"{shown}: clean")
    if status and args.check:
        print("hygiene check failed", file=sys.stderr)
    elif status:
        print("hygiene check failed after execution", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
