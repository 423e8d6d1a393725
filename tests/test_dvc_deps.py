"""Every library module a stage runs is a dep of that stage in dvc.yaml, so an edit to it reruns
the stage (`dvc repro`), and no stage lists a module it never runs.

What a stage runs is the transitive closure of the `veritune` modules its script imports, read
with `ast`: module-level imports and those inside functions alike (a lazy import still runs).
A package's `__init__.py` holds a docstring only (checked below), so importing a package
runs nothing that could change an output and the packages themselves are not deps.
When a test here fails, its message lists the dvc.yaml lines to add or drop.
"""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from tests.conftest import REPO

PACKAGE = "veritune"


def module_file(name: str, root: Path) -> Path | None:
    """The file of module `name` under `root` (a module or a package's __init__.py), if any."""
    path = root.joinpath(*name.split("."))
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    return None


def imported_modules(path: Path, root: Path) -> set[Path]:
    """Files of the `PACKAGE` modules that `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports would hide a module's package from this reading
                raise AssertionError(f"{path}: use absolute imports (from {PACKAGE}.... import ...)")
            # `from pkg import name`: `name` may be a module of the package as well as an attribute.
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                file = module_file(name, root)
                if file is not None and file.name != "__init__.py":
                    found.add(file)
    return found


def stage_modules(script: Path, root: Path) -> set[Path]:
    """The module files `script` runs, directly or through other modules, relative to `root`."""
    seen: set[Path] = set()
    todo = [script]
    while todo:
        for module in imported_modules(todo.pop(), root):
            if module not in seen:
                seen.add(module)
                todo.append(module)
    return {m.relative_to(root) for m in seen}


def dep_problems(stages: dict, root: Path) -> dict[str, dict[str, list[str]]]:
    """Per stage: library modules it runs that dvc.yaml does not list (`missing`, a directory
    dep covers what is under it) and library files it lists but never runs (`unused`)."""
    out = {}
    for name, stage in stages.items():
        deps = [Path(d) for d in stage.get("deps", [])]
        modules = stage_modules(root / "stages" / f"{name}.py", root)
        missing = sorted(str(m) for m in modules if not any(d == m or d in m.parents for d in deps))
        unused = sorted(str(d) for d in deps if d.parts[0] == PACKAGE and d.suffix == ".py" and d not in modules)
        if missing or unused:
            out[name] = {"missing": missing, "unused": unused}
    return out


def test_every_stage_lists_exactly_the_library_modules_it_runs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    problems = dep_problems(stages, REPO)
    assert not problems, "dvc.yaml deps out of date (add `missing`, drop `unused`):\n" + yaml.safe_dump(problems)


def test_packages_run_nothing_on_import():
    """A package's __init__.py is a docstring (and at most `__version__`): what a stage runs is
    then exactly its modules, which the deps above list."""
    for init in sorted((REPO / PACKAGE).rglob("__init__.py")):
        body = ast.parse(init.read_text(encoding="utf-8")).body
        code = [
            n
            for n in body
            if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
            and not (isinstance(n, ast.Assign) and [t.id for t in n.targets] == ["__version__"])
        ]
        assert not code, f"{init.relative_to(REPO)} runs code on import; move it into a module"


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")


def test_the_check_catches_a_missing_transitive_dep(tmp_path):
    """A stage imports a, a imports b inside a function, b imports c: listing a and b is not enough."""
    _write(
        tmp_path,
        {
            "veritune/__init__.py": '"""A package."""\n',
            "veritune/sub/__init__.py": '"""A subpackage."""\n',
            "veritune/a.py": "def run():\n    from veritune.sub import b\n    return b.go()\n",
            "veritune/sub/b.py": "from veritune.sub.c import VALUE\n\ndef go():\n    return VALUE\n",
            "veritune/sub/c.py": "VALUE = 1\n",
            "stages/s.py": "from veritune.a import run\n\n\ndef main():\n    run()\n",
        },
    )
    assert stage_modules(tmp_path / "stages/s.py", tmp_path) == {
        Path("veritune/a.py"),
        Path("veritune/sub/b.py"),
        Path("veritune/sub/c.py"),
    }
    listed = {"s": {"deps": ["stages/s.py", "veritune/a.py", "veritune/sub/b.py"]}}
    assert dep_problems(listed, tmp_path) == {"s": {"missing": ["veritune/sub/c.py"], "unused": []}}
    # Listing c, or the directory holding it, makes the stage complete; a module it never runs is flagged.
    assert dep_problems({"s": {"deps": ["stages/s.py", "veritune/a.py", "veritune/sub"]}}, tmp_path) == {}
    stale = {"s": {"deps": ["stages/s.py", "veritune/a.py", "veritune/sub", "veritune/old.py"]}}
    assert dep_problems(stale, tmp_path) == {"s": {"missing": [], "unused": ["veritune/old.py"]}}
