"""The import rules of docs/ARCHITECTURE.md, checked on the code: every import in prunekit/, analysis/
and cli/ (module level and inside functions, read with ast) goes from a part to a part it may use,
no module imports a private name of another, the artefacts' names are spelled in prunekit/artifacts.py
alone, and there is no import cycle."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder in the repository -> the package it is installed as (pyproject.toml's package-dir)
PACKAGES = {"prunekit": "prunekit", "analysis": "prunekit.analysis", "cli": "prunekit.cli", "hub_cards": "prunekit.hub_cards"}

# The parts, bottom to top, as docs/ARCHITECTURE.md draws them: module -> part by the longest prefix.
PARTS = {
    "core": ["prunekit", "prunekit.errors", "prunekit.io", "prunekit.progress", "prunekit.languages",
             "prunekit.recipe", "prunekit.artifacts"],
    "models": ["prunekit.models", "prunekit.gguf_conversion", "prunekit.embedded", "prunekit.packing",
               "prunekit.packed_writer", "prunekit.streaming", "prunekit.remote", "prunekit.layer_inputs",
               "prunekit.checkpoint_files"],
    "data": ["prunekit.textsources", "prunekit.calibration"],
    "methods": ["prunekit.methods"],
    "engine": ["prunekit.engine", "prunekit.backend", "prunekit.staging"],
    "pipeline": ["prunekit.pipeline"],
    "evaluation": ["prunekit.evaluation"],
    "analysis": ["prunekit.analysis"],
    "hub": ["prunekit.hub", "prunekit.hub_cards"],
    "report": ["prunekit.report"],
    "sweep": ["prunekit.sweep", "prunekit.demo"],
    "cli": ["prunekit.cli"],
}
# Who may import whom (besides its own part). Data flows up: a checkpoint written by the pipeline is
# read by evaluation, analysis and the hub through prunekit.artifacts, never through the pipeline.
MAY_IMPORT = {
    "core": set(),
    "models": {"core"},
    "data": {"core", "models"},
    "methods": {"core"},
    "engine": {"core", "models", "methods"},
    "pipeline": {"core", "models", "data", "methods", "engine"},
    "evaluation": {"core", "models", "data"},
    "analysis": {"core", "models", "data", "evaluation"},  # the one layer-by-layer forward lives in evaluation
    "hub": {"core", "models"},
    "report": {"core"},
    "sweep": {"core", "models", "data", "methods", "pipeline", "evaluation", "analysis", "hub", "report"},
    "cli": {"core", "models", "data", "methods", "pipeline", "evaluation", "analysis", "hub", "report", "sweep"},
}
# Narrower rules inside the allowed parts: (importer prefix, imported prefix, why).
NEVER = [
    ("prunekit.engine", "prunekit.methods.", "the engine knows no method: it uses the Method interface of prunekit.methods"),
    ("prunekit.backend", "prunekit.methods", "the backend tunes the device, whatever the method: a method's needs come through its Method"),
    ("prunekit.models", "prunekit.hub", "models resolve and load; publishing is the hub's"),
]
# Imports that break a rule today, each with the issue that removes it. Do not add to this list.
KNOWN: dict[tuple[str, str], str] = {}
# The artefact names and kinds: spelled (as a whole string) in prunekit/artifacts.py alone. Every ``*_KIND``
# and ``*_FILE`` constant of artifacts.py counts (the sweep's kinds, the report's, the staging's, the index
# file name…), read from its source so a new one is covered the day it is added.


def artifacts_constants() -> dict[str, str]:
    tree = ast.parse((ROOT / "prunekit" / "artifacts.py").read_text(encoding="utf-8"))
    found = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
                and node.targets[0].id.endswith(("_KIND", "_FILE"))):
            found[node.targets[0].id] = node.value.value
    return found


ARTEFACT_CONSTANTS = artifacts_constants()
ARTEFACT_NAMES = set(ARTEFACT_CONSTANTS.values())


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str  # the module (a name imported from a module counts as the module)
    name: str | None  # the name taken, for ``from X import name``
    line: int
    in_face_function: bool  # inside a function of a package's __init__.py (a lazy re-export or plugin load)


def module_files() -> dict[str, Path]:
    files = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            files[".".join([package, *parts])] = path
    return files


MODULES = module_files()


def owner(name: str) -> str | None:
    """The module that ``name`` (a module, or a module + '.' + a name defined in it) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _functions(tree: ast.AST) -> set[int]:
    """ids of the nodes that lie inside a function."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    return inside


def imports_of(module: str) -> list[Import]:
    path = MODULES[module]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    face = path.name == "__init__.py"
    package = module if face else module.rpartition(".")[0]
    in_function = _functions(tree) if face else set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            targets = [(f"{base}.{alias.name}", alias.name) for alias in node.names]
        else:
            continue
        for target, name in targets:
            imported = owner(target) if target.startswith("prunekit") else None
            if imported is not None and imported != module:
                found.append(Import(module, imported, name if imported != target else None, node.lineno,
                                    id(node) in in_function))
    return found


ALL_IMPORTS = [imp for module in MODULES for imp in imports_of(module)]


def part_of(module: str) -> str | None:
    best = None
    for part, prefixes in PARTS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (part, prefix)
    return best[0] if best else None


def where(imp: Import) -> str:
    return f"{MODULES[imp.importer].relative_to(ROOT)}:{imp.line} imports {imp.imported}"


def test_every_module_belongs_to_a_part():
    lost = sorted(m for m in MODULES if part_of(m) is None)
    assert not lost, f"{lost}: add each to a part in PARTS here and in docs/ARCHITECTURE.md"


def test_every_import_goes_to_a_part_its_part_may_use():
    broken = []
    for imp in ALL_IMPORTS:
        a, b = part_of(imp.importer), part_of(imp.imported)
        if imp.in_face_function and imp.imported.startswith(imp.importer + "."):
            continue  # a package's face handing on one of its own modules lazily (prunekit.prune)
        if a != b and b not in MAY_IMPORT[a] and (imp.importer, imp.imported) not in KNOWN:
            broken.append(f"{where(imp)}: part '{a}' may not import part '{b}'")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("importer, imported, why", NEVER, ids=[f"{a}->{b}" for a, b, _ in NEVER])
def test_narrower_rules(importer, imported, why):
    broken = [
        where(imp) for imp in ALL_IMPORTS
        if (imp.importer == importer or imp.importer.startswith(importer + "."))
        and imp.imported.startswith(imported)
        and (imp.importer, imp.imported) not in KNOWN
    ]
    assert not broken, f"{why}:\n" + "\n".join(broken)


def test_evaluation_and_analysis_read_checkpoints_not_the_pruning_stack():
    pruning = ("prunekit.pipeline", "prunekit.engine", "prunekit.methods", "prunekit.calibration")
    broken = [where(imp) for imp in ALL_IMPORTS
              if part_of(imp.importer) in ("evaluation", "analysis", "hub", "report")
              and any(imp.imported == p or imp.imported.startswith(p + ".") for p in pruning)]
    assert not broken, "\n".join(broken)


def test_no_module_imports_a_private_name_of_another():
    broken = [f"{where(imp)}: private name {imp.name}" for imp in ALL_IMPORTS
              if imp.name and imp.name.startswith("_") and not imp.name.startswith("__")]
    assert not broken, "make the name public where it lives, or move the code:\n" + "\n".join(broken)


def test_artefact_names_are_spelled_in_artifacts_alone():
    broken = []
    for module, path in MODULES.items():
        if module == "prunekit.artifacts":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in ARTEFACT_NAMES:
                broken.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not broken, "use the names of prunekit.artifacts:\n" + "\n".join(broken)


def test_every_kind_and_the_index_file_name_appear_in_one_module():
    """Each artefact kind string and the safetensors index file name appear quoted (in a string, an f-string,
    a docstring's example) in prunekit/artifacts.py and in no other module of prunekit/, analysis/, cli/."""
    names = {value for key, value in ARTEFACT_CONSTANTS.items() if key.endswith("_KIND")}
    names.add(ARTEFACT_CONSTANTS["INDEX_FILE"])
    assert {"prunekit-checkpoint", "prunekit-results", "prunekit-sweep-run", "prunekit-compare", "prunekit-report",
            "prunekit-staging", "prunekit-stage-status", "model.safetensors.index.json"} <= names
    homes = {name: sorted(str(path.relative_to(ROOT)) for path in MODULES.values()
                          if f'"{name}"' in path.read_text(encoding="utf-8")
                          or f"'{name}'" in path.read_text(encoding="utf-8"))
             for name in sorted(names)}
    wrong = {name: files for name, files in homes.items() if files != ["prunekit/artifacts.py"]}
    assert not wrong, f"spell these only in prunekit/artifacts.py and import its constant: {wrong}"


def test_every_artefact_file_has_a_name_of_its_own():
    """No two artefacts share a file name: the sweep report's JSON is not called like an evaluation's results."""
    files = {key: value for key, value in ARTEFACT_CONSTANTS.items() if key.endswith("_FILE")}
    assert len(set(files.values())) == len(files), files
    assert files["REPORT_JSON_FILE"] != files["RESULTS_FILE"]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    """Only a package face's lazy imports (inside functions of an __init__.py: a re-export, or the method
    registry loading its built-ins) may point back into the package; every other import counts."""
    edges: dict[str, set[str]] = {}
    for imp in ALL_IMPORTS:
        if not imp.in_face_function:
            edges.setdefault(imp.importer, set()).add(imp.imported)
    found = cycles(edges)
    assert not found, f"import cycles (each: modules that import each other): {found}"


def test_the_cycle_check_sees_a_cycle_through_a_function_level_import():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(edges) == [["a", "b", "c"]]
    imports = {(imp.importer, imp.imported) for imp in ALL_IMPORTS}
    assert ("prunekit.sweep.stages", "prunekit.pipeline") in imports  # imported inside run_one


# --- module size ---------------------------------------------------------------------------------
MAX_MODULE_LINES = 600
# Modules over the limit for now, each with the issue that splits it: delete its line once it is split.
# Do not add to this list.
# Modules that call safetensors' safe_open on files that are not a checkpoint's weight shards.
SAFE_OPEN_ELSEWHERE = {
    "prunekit.calibration": "its own cache of tokenised calibration sets",
    "prunekit.evaluation.hidden_states": "its own cache of dense hidden states",
    "prunekit.evaluation.passes": "the dense hidden states cache, one layer at a time",
    "prunekit.packed_writer": "the part files it wrote itself (their key lists, in the files' metadata)",
}


def test_checkpoint_shards_are_opened_by_the_one_reader():
    """Only prunekit.checkpoint_files calls ``safe_open`` on a checkpoint's shards; the modules excepted above
    open files of their own that are no checkpoint."""
    callers = set()
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "safe_open":
                callers.add(module)
    assert "prunekit.checkpoint_files" in callers  # the check sees a call
    wrong = sorted(callers - {"prunekit.checkpoint_files"} - set(SAFE_OPEN_ELSEWHERE))
    assert not wrong, f"read checkpoint shards with prunekit.checkpoint_files.SafetensorsCheckpoint: {wrong}"


def test_no_module_is_over_600_lines():
    sizes = {module: len(path.read_text(encoding="utf-8").splitlines()) for module, path in MODULES.items()}
    long = [f"{MODULES[m].relative_to(ROOT)}: {n} lines" for m, n in sorted(sizes.items()) if n > MAX_MODULE_LINES]
    assert not long, f"split modules over {MAX_MODULE_LINES} lines by what they do:\n" + "\n".join(long)


# --- the package face ------------------------------------------------------------------------------
HEAVY = ("prunekit.pipeline", "prunekit.engine", "prunekit.methods")


def _loaded_after(statement: str) -> list[str]:
    import json
    import subprocess
    import sys

    code = (f"import sys, json; {statement}; "
            "print(json.dumps(sorted(m for m in sys.modules if m == 'prunekit' or m.startswith('prunekit.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("statement", [
    "import prunekit",
    "import prunekit; prunekit.__version__; prunekit.CalibrationSpec; prunekit.OutputSpec",
    "from prunekit import artifacts, io; artifacts.library_versions()",
    "from prunekit.recipe import CalibrationSpec, OutputSpec; OutputSpec('x', dtype='bfloat16')",
])
def test_the_package_face_imports_no_pipeline_engine_or_method(statement):
    """``import prunekit`` (and what reads a checkpoint's record, or makes the run's specs) loads none of the
    pipeline, the engine or the methods; ``prunekit.prune`` loads the pipeline on first use."""
    loaded = _loaded_after(statement)
    assert "prunekit" in loaded
    heavy = [m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert not heavy, f"{statement!r} imported {heavy}"


def test_prunekit_prune_is_the_pipeline_s_and_loads_it_on_first_use():
    loaded = _loaded_after("import prunekit; from prunekit.pipeline import prune; assert prunekit.prune is prune")
    assert "prunekit.pipeline" in loaded
    import prunekit
    from prunekit.pipeline import OutputSpec as from_pipeline
    from prunekit.recipe import OutputSpec

    assert prunekit.OutputSpec is OutputSpec is from_pipeline
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        prunekit.nothing  # noqa: B018


# --- the sweep's planning reads the runs dir, never the work --------------------------------------
SWEEP_WORK = ("prunekit.sweep.stages", "prunekit.pipeline", "prunekit.evaluation.suite")


def test_planning_a_sweep_imports_no_stage_work_pipeline_or_evaluation():
    """``prunekit.sweep.plan`` reads what is done through ``sweep.layout`` and ``sweep.state``: importing it (in a
    fresh process) loads neither the stages' work, nor the pipeline, nor the evaluation suite, and on the import
    graph (imports inside functions included) no chain of imports leads from it to the stages' work."""
    loaded = _loaded_after("import prunekit.sweep.plan")
    assert "prunekit.sweep.plan" in loaded and "prunekit.sweep.layout" in loaded
    assert not [m for m in loaded if m in SWEEP_WORK], f"importing prunekit.sweep.plan imported {sorted(set(loaded) & set(SWEEP_WORK))}"
    edges: dict[str, set[str]] = {}
    for imp in ALL_IMPORTS:
        edges.setdefault(imp.importer, set()).add(imp.imported)
    reached, todo = set(), ["prunekit.sweep.plan"]
    while todo:
        module = todo.pop()
        for imported in edges.get(module, ()):
            if imported not in reached:
                reached.add(imported)
                todo.append(imported)
    assert "prunekit.sweep.stages" not in reached
    assert "prunekit.sweep.stages" in {m for s in edges.values() for m in s}  # the graph does see who imports it
# --- reach: parameters, lengths, repeated keyword lists ---------------------------------------------
MAX_PARAMETERS = 10
MAX_FUNCTION_LINES = 100
MIN_REPEATED_KEYWORDS = 6
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)


def _trees() -> dict[str, ast.Module]:
    return {str(path.relative_to(ROOT)): ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for module, path in MODULES.items() if not module.startswith("prunekit.hub_cards")}


TREES = _trees()


def public_functions(tree: ast.Module):
    """(function, is a method) for the module's public functions and the public methods of its public
    classes (names without a leading underscore)."""
    for node in tree.body:
        if isinstance(node, FUNCTIONS) and not node.name.startswith("_"):
            yield node, False
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            yield from ((n, True) for n in node.body if isinstance(n, FUNCTIONS) and not n.name.startswith("_"))


def parameter_count(function: ast.FunctionDef, method: bool) -> int:
    """Every parameter (positional, keyword-only, ``*args`` and ``**kwargs`` one each), a method's
    ``self`` / ``cls`` not counted."""
    a = function.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs] + [p.arg for p in (a.vararg, a.kwarg) if p]
    return len(names) - (1 if method and names and names[0] in ("self", "cls") else 0)


def too_many_parameters(trees: dict[str, ast.Module]) -> set[str]:
    return {f"parameters {path} {function.name}" for path, tree in trees.items() if not path.startswith("cli/")
            for function, method in public_functions(tree) if parameter_count(function, method) > MAX_PARAMETERS}


def too_long(trees: dict[str, ast.Module]) -> set[str]:
    return {f"lines {path} {node.name}" for path, tree in trees.items() for node in ast.walk(tree)
            if isinstance(node, FUNCTIONS) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES}


def keyword_calls(trees: dict[str, ast.Module]) -> list[tuple[str, str, int, frozenset[str]]]:
    """(file, enclosing function or ``<module>``, line, keyword names) of every call that passes at least
    MIN_REPEATED_KEYWORDS ``name=`` keyword arguments."""
    calls = []
    for path, tree in trees.items():
        owners: dict[int, str] = {}
        for node in ast.walk(tree):  # outer functions first: an inner function's name overwrites its calls'
            if isinstance(node, FUNCTIONS):
                owners.update({id(n): node.name for n in ast.walk(node)})
        for node in ast.walk(tree):
            names = frozenset(k.arg for k in getattr(node, "keywords", ()) if k.arg is not None)
            if isinstance(node, ast.Call) and len(names) >= MIN_REPEATED_KEYWORDS:
                calls.append((path, owners.get(id(node), "<module>"), node.lineno, names))
    return calls


def repeated_keyword_lists(trees: dict[str, ast.Module]) -> dict[str, list[str]]:
    """Two calls anywhere that share MIN_REPEATED_KEYWORDS or more ``name=`` keyword names (the same list of
    options spelled twice, whatever else either call passes) -> where and which names."""
    found: dict[str, list[str]] = {}
    calls = keyword_calls(trees)
    for i, (path_a, owner_a, line_a, names_a) in enumerate(calls):
        for path_b, owner_b, line_b, names_b in calls[i + 1:]:
            shared = names_a & names_b
            if len(shared) >= MIN_REPEATED_KEYWORDS:
                a, b = sorted([f"{path_a} {owner_a}", f"{path_b} {owner_b}"])
                found.setdefault(f"keywords {a} + {b}", []).append(f"{path_a}:{line_a} and {path_b}:{line_b}: {sorted(shared)}")
    return found


def _check(found: set[str], what: str, how: str) -> None:
    assert not found, f"{what}; {how}:\n" + "\n".join(sorted(found))


def test_no_public_function_outside_cli_takes_more_than_ten_parameters():
    """Public functions and public methods of public classes in prunekit/ and analysis/ (cli/'s commands
    declare one parameter per option): at most 10 parameters, ``self``/``cls`` not counted."""
    _check(too_many_parameters(TREES), "parameters: public functions over 10",
           "group what travels together in a frozen spec (prunekit.recipe's, EvaluationSpec)")


def test_no_function_is_longer_than_a_hundred_lines():
    """Every function and method in prunekit/, analysis/ and cli/, nested ones included: at most 100 lines
    from its ``def`` to its last line."""
    _check(too_long(TREES), "lines: functions over 100", "split the body into named steps")


def test_no_keyword_list_of_six_or_more_is_repeated():
    """A repeated keyword list: two calls anywhere in prunekit/, analysis/ and cli/ (the same callee or not,
    one module or two) that both pass the same six or more keyword names as ``name=value`` (``**mapping``
    not counted), whatever other arguments either passes. Such a list is an option block spelled twice:
    pass a spec or a built mapping instead. Offenders are named by file and enclosing function."""
    found = repeated_keyword_lists(TREES)
    _check(set(found), "keywords: repeated lists of six or more",
           "pass a spec or one mapping:\n" + "\n".join(w for v in found.values() for w in v))


def test_the_reach_checks_see_what_they_check():
    """The three checks on a made-up module: each finds its offence, and only it."""
    source = (
        "def wide(a, b, c, d, e, f, g, h, i, j, k): pass\n"
        "def _private(a, b, c, d, e, f, g, h, i, j, k): pass\n"
        "class C:\n    def method(self, a, b, c, d, e, f, g, h, i, j): pass\n"
        "def long():\n" + "    x = 1\n" * 100 +
        "def one():\n    run(a=1, b=2, c=3, d=4, e=5, f=6)\n"
        "def two():\n    other(x, a=1, b=2, c=3, d=4, e=5, f=6, g=7)\n    run(a=1, b=2, c=3, d=4, e=5, **more)\n"
    )
    trees = {"prunekit/made_up.py": ast.parse(source), "cli/made_up.py": ast.parse("def cmd(a, b, c, d, e, f, g, h, i, j, k): pass")}
    assert too_many_parameters(trees) == {"parameters prunekit/made_up.py wide"}
    assert too_long(trees) == {"lines prunekit/made_up.py long"}
    assert set(repeated_keyword_lists(trees)) == {"keywords prunekit/made_up.py one + prunekit/made_up.py two"}
