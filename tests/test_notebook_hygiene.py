"""Tests of :mod:`helpers.notebooks`: the hygiene check, execution, and the committed notebooks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat import NotebookNode
from nbformat.v4 import (
    new_code_cell,
    new_markdown_cell,
    new_notebook,
    new_output,
)

from helpers.notebooks import (
    NOTEBOOK_DIR,
    REPO_ROOT,
    NotebookExecutionError,
    check_notebook,
    execute_notebook,
    main,
)

# ---------------------------------------------------------------------------------------------
# check_notebook on synthetic notebooks


def _clean() -> NotebookNode:
    """A notebook as a clean run leaves it: three code cells counted 1..3, tidy outputs."""
    return new_notebook(
        cells=[
            new_markdown_cell("# Title, with a path in prose: /home/someone is fine here"),
            new_code_cell(
                "print('hello')",
                execution_count=1,
                outputs=[new_output("stream", name="stdout", text="hello\n")],
            ),
            new_code_cell(
                "1 + 1",
                execution_count=2,
                outputs=[new_output("execute_result", data={"text/plain": "2"}, execution_count=2)],
            ),
            new_code_cell(
                "see('../figures/x.png')",
                execution_count=3,
                outputs=[
                    new_output(
                        "display_data",
                        data={"text/plain": "saved ../figures/x.png, see https://host/opt/x"},
                    )
                ],
            ),
        ]
    )


def _only(problems: list[str], cell: int) -> str:
    """The single problem reported, checking it names cell ``cell``."""
    assert len(problems) == 1, problems
    assert f"cell {cell}" in problems[0], problems
    return problems[0]


def test_clean_notebook_has_no_problems() -> None:
    assert check_notebook(_clean()) == []


def test_notebook_without_code_cells_is_clean() -> None:
    assert check_notebook(new_notebook(cells=[new_markdown_cell("text only")])) == []


def test_whitespace_only_code_cell_is_ignored() -> None:
    nb = _clean()
    nb.cells.insert(2, new_code_cell("  \n"))
    assert check_notebook(nb) == []


def test_error_output_is_reported() -> None:
    nb = _clean()
    nb.cells[2].outputs = [
        new_output("error", ename="ValueError", evalue="boom", traceback=["ValueError: boom"])
    ]
    message = _only(check_notebook(nb), 2)
    assert "error" in message
    assert "ValueError" in message


def test_stderr_stream_is_reported() -> None:
    nb = _clean()
    nb.cells[1].outputs.append(new_output("stream", name="stderr", text="WARNING: noisy\n"))
    message = _only(check_notebook(nb), 1)
    assert "stderr" in message


def test_unexecuted_cell_is_reported() -> None:
    nb = _clean()
    nb.cells.append(new_code_cell("x = 3"))
    message = _only(check_notebook(nb), 4)
    assert "not executed" in message


def test_out_of_order_counts_are_reported() -> None:
    nb = _clean()
    nb.cells[1].execution_count = 2
    nb.cells[2].execution_count = 1
    nb.cells[2].outputs[0].execution_count = 1
    problems = check_notebook(nb)
    assert len(problems) == 2, problems
    assert "cell 1" in problems[0]
    assert "cell 2" in problems[1]
    assert all("execution count" in p for p in problems)


def test_counts_not_starting_at_one_are_reported() -> None:
    nb = _clean()
    for cell in nb.cells[1:]:
        cell.execution_count += 5
        for output in cell.outputs:
            if output.output_type == "execute_result":
                output.execution_count += 5
    problems = check_notebook(nb)
    assert len(problems) == 3, problems


def test_duplicate_count_is_reported() -> None:
    nb = _clean()
    nb.cells[3].execution_count = 2
    message = _only(check_notebook(nb), 3)
    assert "duplicate" in message


def test_execute_result_count_mismatch_is_reported() -> None:
    nb = _clean()
    nb.cells[2].outputs[0].execution_count = 7
    _only(check_notebook(nb), 2)


@pytest.mark.parametrize(
    "path",
    [
        "/work/main/data/mnist.npz",
        "/root/.keras/datasets",
        "/home/alice/obd/notebooks",
        "/tmp/tmpabc123/model.keras",
        "/Users/bob/obd",
        "/usr/lib/python3/dist-packages/x.py",
        "/usr/local/lib/python3.11/x.py",
        "/opt/conda/lib/x.py",
        "venv/lib/python3.11/site-packages/keras/x.py",
        "C:\\Users\\carol\\obd",
        str(REPO_ROOT),
        str(Path.home()),
    ],
)
def test_absolute_path_in_stdout_is_reported(path: str) -> None:
    nb = _clean()
    nb.cells[1].outputs = [new_output("stream", name="stdout", text=f"saved to '{path}'\n")]
    message = _only(check_notebook(nb), 1)
    assert "absolute path" in message
    assert "stdout" in message


def test_absolute_path_in_text_plain_is_reported() -> None:
    nb = _clean()
    nb.cells[2].outputs[0].data["text/plain"] = "PosixPath('/home/alice/obd/figures')"
    message = _only(check_notebook(nb), 2)
    assert "text/plain" in message


def test_absolute_path_in_text_html_is_reported() -> None:
    nb = _clean()
    nb.cells[3].outputs[0].data["text/html"] = "<code>/tmp/x/run.log</code>"
    message = _only(check_notebook(nb), 3)
    assert "text/html" in message


def test_absolute_path_in_traceback_is_reported() -> None:
    nb = _clean()
    nb.cells[2].outputs = [
        new_output(
            "error",
            ename="KeyError",
            evalue="'w'",
            traceback=[
                "\x1b[0;31mKeyError\x1b[0m Traceback (most recent call last)",
                "File \x1b[0;32m/opt/venv/lib/python3.11/site-packages/keras/x.py:3\x1b[0m",
            ],
        )
    ]
    problems = check_notebook(nb)
    assert len(problems) == 2, problems  # the error itself and the path in it
    assert all("cell 2" in p for p in problems)
    assert any("absolute path" in p and "traceback" in p for p in problems)


def test_relative_paths_and_urls_are_not_reported() -> None:
    nb = _clean()
    nb.cells[1].outputs = [
        new_output(
            "stream",
            name="stdout",
            text="wrote ../figures/x.png and data/tmp/y; see https://example.org/home/obd\n",
        )
    ]
    assert check_notebook(nb) == []


def test_problem_messages_name_the_file(tmp_path: Path) -> None:
    nb = _clean()
    nb.cells[1].outputs.append(new_output("stream", name="stderr", text="oops\n"))
    path = tmp_path / "07_named.ipynb"
    nbformat.write(nb, path)
    message = _only(check_notebook(path), 1)
    assert message.startswith("07_named.ipynb")
    assert check_notebook(str(path)) == [message]


# ---------------------------------------------------------------------------------------------
# main --check


def test_main_check_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean = tmp_path / "clean.ipynb"
    dirty = tmp_path / "dirty.ipynb"
    nbformat.write(_clean(), clean)
    nb = _clean()
    nb.cells[1].outputs.append(new_output("stream", name="stderr", text="oops\n"))
    nbformat.write(nb, dirty)

    before = clean.read_text()
    assert main(["--check", str(clean)]) == 0
    assert main(["--check", str(dirty)]) == 1
    assert "dirty.ipynb: cell 1" in capsys.readouterr().out
    assert main(["--check", str(clean), str(dirty)]) == 1
    assert main(["--check", str(tmp_path / "missing.ipynb")]) == 2
    assert clean.read_text() == before  # --check executes and writes nothing


# ---------------------------------------------------------------------------------------------
# execute_notebook end to end (one kernel start for the clean run, one for the failing run)

_PROBE = "probe.txt"


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float, dict[int, float]]:
    """A tiny notebook with stale outputs, executed once by :func:`execute_notebook`."""
    folder = tmp_path_factory.mktemp("executed")
    nb = new_notebook(
        cells=[
            new_markdown_cell("# Tiny"),
            new_code_cell(
                "print('hello from the kernel')",
                execution_count=9,  # stale: must be cleared and renumbered
                outputs=[new_output("stream", name="stderr", text="stale\n")],
            ),
            new_code_cell("1 + 1"),
            # nbclient skips blank cells, so only execute_notebook's own clearing removes this
            new_code_cell(
                "\n",
                execution_count=5,
                outputs=[new_output("stream", name="stdout", text="stale\n")],
            ),
            new_code_cell(
                "import os, sys\n"
                f"with open({_PROBE!r}, 'w') as f:\n"
                "    f.write('\\n'.join([sys.prefix, os.environ.get('PYTHONHASHSEED', '')]))\n"
                "len(os.listdir('.'))"
            ),
        ]
    )
    nb.metadata["custom"] = {"keep": True}
    path = folder / "tiny.ipynb"
    nbformat.write(nb, path)
    cells: dict[int, float] = {}
    seconds = execute_notebook(path, timeout=60, cell_seconds=cells)
    return path, seconds, cells


def test_execute_writes_clean_outputs(executed: tuple[Path, float, dict[int, float]]) -> None:
    path, seconds, cells = executed
    assert seconds > 0
    assert sorted(cells) == [1, 2, 4]  # the executed code cells, by index (the blank one skipped)
    assert all(0 <= t <= seconds for t in cells.values())
    nb = nbformat.read(path, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == [1, 2, None, 3]
    assert code[2].outputs == []  # blank cell: stale output cleared, left unexecuted
    assert code[0].outputs == [new_output("stream", name="stdout", text="hello from the kernel\n")]
    assert code[1].outputs[0].data["text/plain"] == "2"
    assert code[1].outputs[0].execution_count == 2
    assert nb.metadata["custom"] == {"keep": True}
    assert nb.metadata["kernelspec"]["name"] == "python3"
    assert check_notebook(path) == []
    assert main(["--check", str(path)]) == 0


def test_execute_uses_notebook_folder_this_python_and_hash_seed(
    executed: tuple[Path, float, dict[int, float]],
) -> None:
    path, _, _ = executed
    probe = path.parent / _PROBE  # written relative to the kernel's cwd
    assert probe.is_file()
    prefix, hash_seed = probe.read_text().splitlines()
    assert os.path.realpath(prefix) == os.path.realpath(sys.prefix)
    assert hash_seed == "0"


def test_execute_failing_cell_names_the_cell(tmp_path: Path) -> None:
    nb = new_notebook(
        cells=[
            new_code_cell("x = 1"),
            new_markdown_cell("next one fails"),
            new_code_cell("raise ValueError('deliberate failure')"),
            new_code_cell("y = 2"),
        ]
    )
    path = tmp_path / "broken.ipynb"
    nbformat.write(nb, path)
    before = path.read_text()
    with pytest.raises(NotebookExecutionError) as info:
        execute_notebook(path, timeout=60)
    assert info.value.cell_index == 2
    message = str(info.value)
    assert "broken.ipynb" in message
    assert "cell 2" in message
    assert "deliberate failure" in message
    assert path.read_text() == before  # a failed run does not overwrite the notebook


# ---------------------------------------------------------------------------------------------
# every committed notebook


def _committed() -> list[object]:
    """One param per committed notebook, or a single skipped param when there are none."""
    paths = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    if not paths:
        return [pytest.param(None, marks=pytest.mark.skip(reason="no committed notebooks yet"))]
    return [pytest.param(path, id=path.name) for path in paths]


@pytest.mark.parametrize("path", _committed())
def test_committed_notebook_is_clean(path: Path) -> None:
    assert check_notebook(path) == []
