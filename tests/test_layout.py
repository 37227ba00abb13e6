"""The architecture read from the file tree: imports point down the layers, no module imports itself
back through another, the command-line tools stay on top, and no module grows past a readable size."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("demo_cascade", "photo_sr4x")  # folders of weights that carry copies of the pipeline files

# From the top down: a module may import its own room and any room below it, never one above it.
LAYERS = [
    ["cdm.cli"],
    ["cdm.experiments"],
    ["cdm.app", "cdm.hub"],
    ["cdm.measure"],
    ["cdm.train"],
    ["cdm.upscaling"],
    ["cdm.cascade"],
    ["cdm.stage_io"],
    ["cdm.models"],
    ["cdm.config"],
    ["cdm.devices", "cdm.files", "cdm.images", "cdm.seeding", "cdm.errors"],
]
MAX_LINES = 600


def module_files(root: Path = ROOT / "cdm") -> dict[str, Path]:
    files = {}
    for path in root.rglob("*.py"):
        if any(part in SHIPPED for part in path.relative_to(ROOT).parts):
            continue
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        files[name] = path
    return files


def imports(path: Path, known: set[str]) -> set[str]:
    """The cdm modules a file imports (`from cdm.x import y` counts cdm.x.y when y is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names} & known
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name == "cdm" or name.startswith("cdm.")}


def graph(files: dict[str, Path]) -> dict[str, set[str]]:
    known = set(files)
    return {name: imports(path, known) & known - {name, "cdm"} for name, path in files.items()}


def layer(module: str) -> int:
    for depth, rooms in enumerate(LAYERS):
        if any(module == room or module.startswith(room + ".") for room in rooms):
            return depth
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle found by a depth-first walk, as the list of modules around it."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_the_checks_find_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert layer("cdm.train.loop") > layer("cdm.measure.sr") > layer("cdm.cli.eval")


def test_no_module_imports_itself_back():
    assert cycles(graph(module_files())) == []


def test_imports_point_down_the_layers():
    upward = [
        f"{module} imports {target}"
        for module, targets in graph(module_files()).items()
        for target in targets
        if layer(target) < layer(module)
    ]
    assert upward == []


def test_only_the_command_line_tools_import_cdm_cli():
    users = [
        m for m, targets in graph(module_files()).items() if any(t.startswith("cdm.cli") for t in targets)
    ]
    assert all(m.startswith("cdm.cli") for m in users), users


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines").glob("*.py")), ids=lambda p: p.name)
def test_a_pipeline_file_imports_nothing_of_cdm(path):
    assert imports(path, set()) == set()


def test_no_module_is_over_600_lines():
    long = {
        name: n
        for name, path in module_files().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}
