"""The structure of recog, read from its source with `ast`: imports run one way (no circle), the service that
answers "what is this photo?" imports nothing from training, functions stay short, and the README's Layout
names every module that exists and nothing that does not."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "recog"
LONGEST_FUNCTION = 60  # lines, from `def` to the last line of the body

# Modules that exist to train: a process that only reads exports and indexes has no use for them.
TRAINING = {"recog.train", "recog.build", "recog.checkpoint", "recog.config", "recog.data.sampler", "recog.loss",
            "recog.parallel", "recog.step", "recog.model", "recog.export", "recog.dist", "recog.rundir"}


# What `python -m recog.serve` imports, all of it: a change here is a choice, made in this list.
SERVE_IMPORTS = {
    "recog.errors", "recog.files", "recog.shell", "recog.preempt", "recog.listen",  # the shell
    "recog.exported",  # the export format and its reader
    "recog.index_files", "recog.gallery", "recog.shard_server", "recog.identify",  # the index and its search
    "recog.data.decode", "recog.data.gpu_decode", "recog.data.loader", "recog.data.manifest",
    "recog.data.offsets", "recog.data.random_access", "recog.data.source",  # gallery images read from shards
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """recog's modules that `path` imports anywhere in it (at the top, inside functions, for type checking)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph = {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}
    for name in graph:  # importing recog.a.b runs recog/__init__.py and recog/a/__init__.py first: not an arrow
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    return graph


def reached_from(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports (a -> b -> ... -> a), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (circle := visit(nxt, path + [nxt])):
                return circle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (circle := visit(start, [start])):
            return circle
    return None


def test_the_import_graph_has_no_circle():
    graph = import_graph()
    assert len(graph) > 30 and sum(map(len, graph.values())) > 80  # the reading found the house, not an empty one
    assert find_circle(graph) is None, " -> ".join(find_circle(graph))


def test_the_circle_finder_finds_one():  # so that the test above can fail
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None


def test_recog_serve_imports_no_training_code():
    graph = import_graph()
    served = reached_from("recog.serve", graph)
    assert not served & TRAINING, sorted(served & TRAINING)
    assert served == SERVE_IMPORTS, sorted(served)
    for command in ("recog.identify", "recog.index"):  # the other readers of exports and indexes
        assert not reached_from(command, graph) & TRAINING, (command, sorted(reached_from(command, graph) & TRAINING))
    assert {"recog.checkpoint", "recog.model"} <= reached_from("recog.export", graph)  # the writer may: found


def function_lengths() -> list[tuple[int, str]]:
    lengths = []
    for path in modules().values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lengths.append((node.end_lineno - node.lineno + 1, f"{path.relative_to(ROOT)}:{node.lineno} "
                                                                    f"{node.name}"))
    return lengths


def test_no_function_in_recog_is_longer_than_60_lines():
    lengths = function_lengths()
    assert len(lengths) > 300
    too_long = sorted((n, where) for n, where in lengths if n > LONGEST_FUNCTION)
    assert not too_long, too_long


def layout_paths() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("\n## Layout\n", 1)[1].split("```", 2)[1]
    return [m.group(1) for line in block.splitlines() if (m := re.match(r"(\S+)\s", line + " "))
            if m.group(1) != "text"]


def test_the_readme_layout_lists_every_module_and_only_what_exists():
    listed = layout_paths()
    assert "recog/train.py" in listed and "train.py" in listed
    missing = [p for p in listed if not (ROOT / p.rstrip("/")).exists()]
    assert not missing, f"README's Layout lists what does not exist: {missing}"
    unlisted = [str(p.relative_to(ROOT)) for p in modules().values() if str(p.relative_to(ROOT)) not in listed]
    assert not unlisted, f"README's Layout does not list: {unlisted}"


