"""Imports inside ``services/`` point one way: down the layers below, never up, never in a cycle.

Every ``services/**/*.py`` (but the generated gRPC code) is parsed with ``ast``; its imports of
``services.*`` are collected, at module level and inside functions alike (a function-level
import is still a dependency): ``import a.b``, ``from a import b`` (``b`` a submodule of ``a``:
an import of ``a.b``) and relative imports. Imports by name at run time (``importlib``: the
CLI's stage table, the registries' ``package="services.algorithms"``) are not imports here.

A module may import only from its own layer or a layer below it. LAYER_OF maps a module path
prefix (whole dotted components; the longest matching prefix wins) to its layer; the entries
in PACKAGE_ONLY name a package's own ``__init__`` only, so that each module of ``services.core``
is placed on its own (a new one there fails ``test_every_module_has_a_layer`` until it is).

Imports of ``services.*`` stand at module top, but for those in FUNCTION_LEVEL_IMPORTS: a
module imported inside a function is one that pulls in a heavy optional dependency (torch,
Ray, gRPC) that the importing module's other uses do without. An entry that no longer
matches an import fails too, so the list stays true.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "services"
SKIPPED = ("services.rpc.generated",)  # protoc output; imported, never importing services

LAYERS = ("cli", "stages", "driver", "services", "runtime", "base")  # top to bottom

LAYER_OF: dict[str, str] = {
    "services.cli": "cli",
    # one module per `flywheel` subcommand (validate is the CLI itself over core)
    "services.demo": "stages",  # demo
    "services.example": "stages",  # example
    "services.driver.overopt_study": "stages",  # study
    "services.driver.submit": "stages",  # submit
    "services.driver.train": "stages",  # train
    "services.learner.export": "stages",  # export
    "services.learner.reward_model": "stages",  # train-rm
    "services.learner.sft": "stages",  # sft
    "services.reward.evaluation": "stages",  # eval-rm (its statistics are services.reward.stats)
    # the RL loop and what it is made of
    "services.driver": "driver",
    "services.algorithms": "driver",
    # the services the driver builds, and their wire formats
    "services.learner": "services",
    "services.reference": "services",
    "services.reward": "services",
    "services.rollout": "services",
    "services.environments": "services",  # multi-turn environments, tools and their sandbox
    "services.rpc": "services",
    # Ray and process plumbing, metrics
    "services.core.actor_group": "runtime",
    "services.core.cluster_check": "runtime",
    "services.core.metrics": "runtime",
    "services.core.orphan_reaper": "runtime",  # kills a SIGKILLed driver's local Ray processes
    "services.core.placement": "runtime",  # the run's Ray placement group (driver and cluster_check)
    "services.core.ray_session": "runtime",  # ray.init for a run, the job's Ray address
    "services.core.service_metrics": "runtime",
    # types, math, config, data: importing nothing above them
    "services": "base",  # the empty package __init__
    "services.core": "base",  # the empty package __init__
    "services.core.batch_types": "base",
    "services.core.config": "base",
    "services.core.config_base": "base",
    "services.core.config_loading": "base",
    "services.core.config_lora": "base",  # learner.lora
    "services.core.data": "base",
    "services.core.errors": "base",
    "services.core.estimators": "base",
    "services.core.judge_settings": "base",  # the judge scorer's defaults and checks, for the config layer
    "services.core.learner_batches": "base",
    "services.core.model_files": "base",  # a model directory's safetensors files are whole (headers only)
    "services.core.out_lock": "base",  # one writer per OUT; what each command leaves there
    "services.core.packing": "base",  # sequence packing: token-budget bins, one packed row and back
    "services.core.prompts": "base",  # a prompt (string or chat messages) as text and token ids
    "services.core.reward_config": "base",  # the reward section of the config
    "services.core.rollout_config": "base",  # the rollout section of the config
    "services.core.registry": "base",
    "services.core.rl_math": "base",
    "services.core.rl_variants": "base",
    "services.core.special_tokens": "base",  # a tokenizer's pad and eos tokens, checked before a stage starts
    "services.core.tiny_model": "base",
    "services.core.toy_eval": "base",  # sampling and scoring a saved policy on the toy world (transformers on call)
    "services.core.toy_world": "base",
    "services.core.word_problems": "base",  # the GSM8K-format generator of `flywheel example`
    "services.presets": "base",
}
PACKAGE_ONLY = {"services", "services.core"}

# (module, the services module it imports inside a function): why the import waits
FUNCTION_LEVEL_IMPORTS: dict[tuple[str, str], str] = {
    ("services.cli", "services.driver.train"): "cli: torch and Ray load after `flywheel train` checked the config",
    ("services.cli", "services.driver.overopt_study"): "cli: torch and Ray only for `flywheel study`",
    ("services.cli", "services.demo"): "cli: torch and Ray only for `flywheel demo`",
    ("services.cli", "services.reward.grpc_server"): "cli: gRPC only for `flywheel serve-reward`",
    ("services.reward.aggregate", "services.core.rl_math"): "the ensemble and its gRPC client import without torch",
    ("services.reward.scorers", "services.reward.grpc_client"): "scorers: gRPC only for a remote scorer",
    ("services.reward.scorers", "services.rpc.tls"): "scorers: gRPC's TLS credentials only for a remote scorer",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of ``services`` by dotted name (package __init__ as the package)."""
    found = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    return {name: p for name, p in found.items() if not in_package(name, SKIPPED)}


def in_package(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def layer_of(name: str) -> str | None:
    """The layer of the longest LAYER_OF prefix of ``name`` (None: no prefix matches)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYER_OF and (prefix == name or prefix not in PACKAGE_ONLY):
            return LAYER_OF[prefix]
    return None


def import_targets(node: ast.Import | ast.ImportFrom, name: str, is_package: bool, known: set[str]) -> list[str]:
    """The services modules one import statement of module ``name`` imports."""
    if isinstance(node, ast.Import):
        found = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the module's own package upwards
            package = name.split(".") if is_package else name.split(".")[:-1]
            package = package[: len(package) - node.level + 1]
            base = ".".join(package + ([base] if base else []))
        found = []
        for alias in node.names:  # `from a import b`: a.b when that is a module, else a
            sub = f"{base}.{alias.name}"
            found.append(sub if sub in known or in_package(sub, SKIPPED) else base)
    return [target for target in found if in_package(target, ("services",))]


def imports_in(path: Path, name: str, known: set[str], nodes) -> list[tuple[str, int]]:
    """(imported services module, line) for the import statements among ``nodes`` (ast nodes
    of ``path``, module ``name``), in line order."""
    imports = {id(n): n for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom))}
    is_package = path.name == "__init__.py"
    found = [(t, node.lineno) for node in imports.values() for t in import_targets(node, name, is_package, known)]
    return sorted(found, key=lambda item: item[1])


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), str(path))


def imported_modules(path: Path, name: str, known: set[str]) -> list[tuple[str, int]]:
    """(imported services module, line) for every import of ``services.*`` in ``path``."""
    return imports_in(path, name, known, ast.walk(parse(path)))


def function_level_imports(path: Path, name: str, known: set[str]) -> list[tuple[str, int]]:
    """(imported services module, line) for the imports of ``services.*`` inside a function
    (or lambda) body of ``path``."""
    functions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)
    bodies = [n for fn in ast.walk(parse(path)) if isinstance(fn, functions) for n in ast.walk(fn)]
    return imports_in(path, name, known, bodies)


def all_function_level_imports() -> dict[tuple[str, str], int]:
    """(module, imported services module) -> first line, over every services module."""
    mods = modules()
    found: dict[tuple[str, str], int] = {}
    for name, path in mods.items():
        for target, line in function_level_imports(path, name, set(mods)):
            found.setdefault((name, target), line)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line importing it}, services modules only."""
    mods = modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        edges: dict[str, int] = {}
        for target, line in imported_modules(path, name, set(mods)):
            if target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (as [a, b, ..., a]) per strongly connected component with more than one
    module (Tarjan), among the modules in ``graph``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [cycle_through(graph, sorted(c)) for c in components]


def cycle_through(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """A shortest cycle from the component's first module back to it (breadth first)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w == start:
                    return paths[v] + [start]
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    following.append(w)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {component}")


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    found = []
    for name, edges in sorted(graph.items()):
        here = layer_of(name)
        for target, line in sorted(edges.items()):
            there = layer_of(target)
            if here is not None and there is not None and rank[there] < rank[here]:
                found.append(f"{name} -> {target} (layer {here} -> layer {there}, line {line})")
    return found


def test_the_layer_table_names_known_layers():
    assert set(LAYER_OF.values()) <= set(LAYERS), set(LAYER_OF.values()) - set(LAYERS)


def test_every_module_has_a_layer():
    graph = import_graph()
    missing = sorted(name for name in graph if layer_of(name) is None)
    missing += sorted({t for edges in graph.values() for t in edges if layer_of(t) is None} - set(missing))
    assert not missing, (
        "modules with no layer: add them to LAYER_OF in tests/unit/test_layers.py:\n  " + "\n  ".join(missing)
    )


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles among services modules:\n  " + "\n  ".join(str(c) for c in cycles)


def test_no_import_from_a_higher_layer():
    upward = upward_imports(import_graph())
    assert not upward, (
        f"imports from a higher layer (layers, top to bottom: {', '.join(LAYERS)}):\n  " + "\n  ".join(upward)
    )


def test_imports_inside_functions_are_only_the_allowed_ones():
    unlisted = sorted(f"{name} -> {target} (line {line})"
                      for (name, target), line in all_function_level_imports().items()
                      if (name, target) not in FUNCTION_LEVEL_IMPORTS)
    assert not unlisted, (
        "imports of services modules inside functions: move them to the module top, or (a module that pulls in "
        "torch, Ray or gRPC) add them with a reason to FUNCTION_LEVEL_IMPORTS in tests/unit/test_layers.py:\n  "
        + "\n  ".join(unlisted)
    )


def test_every_allowed_function_level_import_exists():
    found = all_function_level_imports()
    stale = sorted(f"{name} -> {target}" for name, target in FUNCTION_LEVEL_IMPORTS if (name, target) not in found)
    assert not stale, (
        "FUNCTION_LEVEL_IMPORTS entries with no such import inside a function: remove them from "
        "tests/unit/test_layers.py:\n  " + "\n  ".join(stale)
    )
    assert all(reason.strip() for reason in FUNCTION_LEVEL_IMPORTS.values())


def test_the_checks_see_what_they_should(tmp_path):
    """The parser resolves submodules, relative and function-level imports (and tells the
    latter apart); the checks report a planted cycle and an upward import."""
    pkg = tmp_path / "services"
    (pkg / "core").mkdir(parents=True)
    for name in ("__init__.py", "core/__init__.py"):
        (pkg / name).write_text("")
    (pkg / "core" / "config.py").write_text("def f():\n    from services.core import errors\n")
    (pkg / "core" / "errors.py").write_text("from . import config\nimport services.cli\n")
    known = {"services.core.config", "services.core.errors", "services.cli"}
    config = imported_modules(pkg / "core" / "config.py", "services.core.config", known)
    errors = imported_modules(pkg / "core" / "errors.py", "services.core.errors", known)
    assert config == [("services.core.errors", 2)]
    assert errors == [("services.core.config", 1), ("services.cli", 2)]
    assert function_level_imports(pkg / "core" / "config.py", "services.core.config", known) == config
    assert function_level_imports(pkg / "core" / "errors.py", "services.core.errors", known) == []
    graph = {"services.core.config": dict(config), "services.core.errors": dict(errors), "services.cli": {}}
    assert find_cycles(graph) == [["services.core.config", "services.core.errors", "services.core.config"]]
    assert upward_imports(graph) == ["services.core.errors -> services.cli (layer base -> layer cli, line 2)"]
    assert layer_of("services.core.new_module") is None and layer_of("services.core") == "base"
