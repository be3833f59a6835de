"""The student edition: the committed (instructor) notebooks with every answer replaced by a stub.

A code cell tagged `solution` holds answers only, and its first line states the task:

    # TASK: write kv_bytes_per_token(config, dtype): bytes of K and V one token takes in the cache
    def kv_bytes_per_token(config, dtype):
        \"\"\"Bytes per token (int) ...\"\"\"
        ...the instructor's body...
    answer_ms = 12.5   # ms

becomes, in the student edition,

    # TASK: write kv_bytes_per_token(config, dtype): bytes of K and V one token takes in the cache
    def kv_bytes_per_token(config, dtype):
        \"\"\"Bytes per token (int) ...\"\"\"
        raise NotImplementedError("write kv_bytes_per_token: see its docstring")
    answer_ms = ...   # ms

Top-level assignments become `name = ...` (a comment at the end of the line stays: say units
there, never the answer); function definitions keep their signature and docstring. Anything
else in a solution cell (imports, calls, a loop) is an error when the edition is built, so a
solution cell stays a pure answer. A markdown cell tagged `solution` (an explanation that gives
the answer away) is replaced by a one-line note. Outputs are stripped, and a first code cell
turns strict checks on, so the edition stops "Run All" at the first unsolved exercise however it
is launched. `labkit notebooks student OUT` (or `make student`) writes it.
"""

from __future__ import annotations

import argparse
import ast
import copy
import io
import json
import tokenize
from pathlib import Path
from typing import Any

SOLUTION_TAG = "solution"
STUB_TAG = "exercise"
EDITION_TAG = "student-edition"
TASK_PREFIX = "# TASK:"
STRICT_CELL = (
    '# Student edition: each exercise\'s check stops "Run All" until you solve it.\n'
    "from labkit.exercises import student_edition\n"
    "student_edition()"
)
HIDDEN_TEXT = "*(The instructor edition explains the answer here: solve the exercise above first.)*"


class EditionError(ValueError):
    """A solution cell the builder cannot turn into a stub; the message names the notebook and cell."""


def _comments(src: str) -> dict[int, str]:
    """Line number -> the comment ending that line, for lines with code before the comment."""
    out: dict[int, str] = {}
    lines = src.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT and lines[tok.start[0] - 1][: tok.start[1]].strip():
            out[tok.start[0]] = tok.string
    return out


def stub_source(src: str, where: str = "solution cell") -> str:
    """The student's stub for one solution cell's source; EditionError when the cell holds more than answers."""
    lines = src.splitlines()
    tasks = [ln for ln in lines if ln.startswith(TASK_PREFIX)]
    if not tasks or not tasks[0][len(TASK_PREFIX) :].strip():
        raise EditionError(f"{where}: a solution cell states its task on a line of its own, '{TASK_PREFIX} ...'")
    try:
        tree = ast.parse(src)
    except SyntaxError as e:
        raise EditionError(
            f"{where}: not plain Python ({e.msg}, line {e.lineno}); a solution cell holds only "
            "assignments and function definitions"
        ) from None
    if not tree.body:
        raise EditionError(f"{where}: a solution cell with a task but no answer")
    comments = _comments(src)
    out = list(tasks)
    for node in tree.body:
        if isinstance(node, ast.Assign):
            if len(node.targets) != 1 or not isinstance(node.targets[0], ast.Name):
                raise EditionError(
                    f"{where}, line {node.lineno}: assign one name per statement "
                    f"(`{ast.unparse(node.targets[0])} = ...` cannot become a stub)"
                )
            stub = f"{node.targets[0].id} = ..."
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            stub = f"{node.target.id}: {ast.unparse(node.annotation)} = ..."
        elif isinstance(node, ast.FunctionDef):
            out.extend(_function_stub(node, lines, where))
            continue
        else:
            code = ast.unparse(node).splitlines()[0][:60]
            raise EditionError(
                f"{where}, line {node.lineno}: a solution cell holds only assignments and function "
                f"definitions (the answers); move `{code}` to a cell of its own"
            )
        comment = comments.get(node.end_lineno or node.lineno, "")
        out.append(f"{stub}   {comment}" if comment else stub)
    return "\n".join(out)


def _function_stub(node: ast.FunctionDef, lines: list[str], where: str) -> list[str]:
    if node.decorator_list:
        raise EditionError(f"{where}, line {node.lineno}: {node.name} is decorated; the stub keeps only a plain def")
    doc = node.body[0]
    if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
        raise EditionError(
            f"{where}, line {node.lineno}: {node.name} needs a docstring: it is the learner's "
            "specification (what it returns, with units)"
        )
    if doc.lineno == node.lineno:
        raise EditionError(f"{where}, line {node.lineno}: put {node.name}'s body on lines of its own")
    indent = " " * doc.col_offset
    return (
        lines[node.lineno - 1 : doc.lineno - 1]
        + lines[doc.lineno - 1 : doc.end_lineno]
        + [f'{indent}raise NotImplementedError("write {node.name}: see its docstring")']
    )


def _source(cell: Any) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else str(src)


def student_notebook(nb: dict[str, Any], name: str = "notebook") -> dict[str, Any]:
    """The student edition of one notebook (a new dict; `nb` is left as it is)."""
    out = copy.deepcopy(nb)
    cells = []
    for i, cell in enumerate(out.get("cells", [])):
        meta = cell.setdefault("metadata", {})
        tags = list(meta.get("tags", []))
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
            meta.pop("execution", None)
        if SOLUTION_TAG in tags:
            where = f"{name}, cell {i}"
            if cell.get("cell_type") == "code":
                cell["source"] = stub_source(_source(cell), where)
                meta["tags"] = [STUB_TAG if t == SOLUTION_TAG else t for t in tags]
            elif cell.get("cell_type") == "markdown":
                cell["source"] = HIDDEN_TEXT
                meta["tags"] = [t for t in tags if t != SOLUTION_TAG]
            else:
                raise EditionError(f"{where}: a {cell.get('cell_type')} cell cannot be a solution")
        cells.append(cell)
    first_code = next((i for i, c in enumerate(cells) if c.get("cell_type") == "code"), len(cells))
    strict_cell: dict[str, Any] = {
        "cell_type": "code",
        "execution_count": None,
        "outputs": [],
        "metadata": {"tags": [EDITION_TAG]},
        "source": STRICT_CELL,
    }
    if any("id" in c for c in cells):
        strict_cell["id"] = "student-edition"
    cells.insert(first_code, strict_cell)
    out["cells"] = cells
    out.setdefault("metadata", {}).pop("widgets", None)
    return out


def has_solutions(nb: dict[str, Any]) -> bool:
    """Whether a notebook has exercises in the new format (a cell tagged `solution`)."""
    return any(SOLUTION_TAG in c.get("metadata", {}).get("tags", []) for c in nb.get("cells", []))


def build_student_edition(
    out_dir: str | Path, src_dir: str | Path | None = None, names: list[str] | None = None
) -> list[Path]:
    """Writes the student edition of every notebook in `src_dir` (default: the checkout's notebooks/)
    to `out_dir`; returns the paths written. Raises EditionError before writing anything if a
    solution cell cannot become a stub."""
    from labkit.config import repo_root

    src = Path(src_dir) if src_dir else repo_root() / "notebooks"
    paths = sorted(src.glob("*.ipynb"))
    if names:
        wanted = {n.removesuffix(".ipynb") for n in names}
        paths = [p for p in paths if p.stem in wanted or p.stem.split("_")[0] in wanted]
        if not paths:
            raise FileNotFoundError(f"no notebook in {src} matches {sorted(wanted)}")
    built = [(p.name, student_notebook(json.loads(p.read_text()), p.name)) for p in paths]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, nb in built:
        path = out / fname
        path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
        written.append(path)
    return written


# --- the `labkit notebooks` command ---------------------------------------------------------


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    st = sub.add_parser("student", help="write the learner's edition: answers replaced by stubs, checks strict")
    st.add_argument("out", help="output directory (make student: build/student)")
    st.add_argument("notebooks", nargs="*", help="only these notebooks (names or numbers like 01); default: all")
    st.add_argument("--src", default=None, help="the instructor notebooks (default: this checkout's notebooks/)")
    st.set_defaults(func=_cli_student)
    from labkit.notebook_times import register_actions  # `time` and `guide`: the instructor guide's numbers

    register_actions(sub)


def _cli_student(args: argparse.Namespace) -> int:
    try:
        written = build_student_edition(args.out, args.src, args.notebooks or None)
    except (EditionError, FileNotFoundError) as e:
        print(f"labkit notebooks student: {e}")
        return 1
    for p in written:
        print(f"wrote {p}")
    return 0
