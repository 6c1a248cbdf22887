"""The layering of the code (docs/design.md), read from the import statements of every module:
`cli` -> `stages/` -> library (nanochat/*.py, tasks/) -> primitives, pointing down only."""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# import no other module of ours
PRIMITIVES = {"nanochat.common", "nanochat.calculator", "nanochat.execution", "nanochat.files", "nanochat.sandbox_child"}
ENTRY = {"nanochat.cli", "nanochat.__main__"}


def modules():
    """{module name: path} of every module of nanochat/ and tasks/ (the HF remote code aside: it
    must run without nanochat installed, so it imports nothing of ours)."""
    out = {}
    for top in ("nanochat", "tasks"):
        for root, _, files in os.walk(os.path.join(REPO, top)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(root, f), REPO)[:-3].replace(os.sep, ".")
                    out[rel.removesuffix(".__init__")] = os.path.join(root, f)
    return out


def ours(name):
    return name.split(".")[0] in ("nanochat", "tasks")


def imports(path):
    """[(imported module, line, inside a function?)] of one file (ours only)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if ours(a.name))
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0 and ours(child.module):
                # `from nanochat import checkpoint` imports the module nanochat.checkpoint
                names = [f"{child.module}.{a.name}" for a in child.names]
                found.extend((n if n in MODULES else child.module, child.lineno, in_function) for n in names)
            visit(child, inner)
    visit(tree, False)
    return found


MODULES = modules()
IMPORTS = {name: imports(path) for name, path in MODULES.items()}


def layer(name):
    if name in ENTRY:
        return "cli"
    if name.startswith("nanochat.stages"):
        return "stage"
    if name in PRIMITIVES:
        return "primitive"
    return "library"


def test_the_scan_sees_the_code():
    # a scan that found nothing would pass every rule below
    assert {"nanochat.gpt", "nanochat.stages.train_base", "nanochat.cli", "tasks.arc"} <= set(MODULES)
    assert "nanochat.training" in [m for m, _, _ in IMPORTS["nanochat.stages.train_base"]]
    assert ("nanochat.common", True) in [(m, inside) for m, _, inside in IMPORTS["nanochat.cli"]]
    assert all(IMPORTS[m] for m in ("nanochat.stages.train_mid", "nanochat.chat_train", "nanochat.gpt"))


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer(n) == "stage" and n != "nanochat.stages"))
def test_a_stage_never_imports_another_stage(name):
    bad = [(m, line) for m, line, _ in IMPORTS[name] if m.startswith("nanochat.stages") or m in ENTRY]
    assert not bad, f"{name} imports {bad}: move the shared piece down into the library"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if layer(n) in ("library", "primitive")))
def test_the_library_never_imports_a_stage_or_the_cli(name):
    bad = [(m, line) for m, line, _ in IMPORTS[name] if layer(m) in ("stage", "cli")]
    assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("name", sorted(PRIMITIVES))
def test_primitives_import_nothing_of_ours(name):
    assert not IMPORTS[name], f"{name} imports {IMPORTS[name]}"


def test_hf_remote_code_imports_nothing_of_ours():
    for name in ("nanochat.hf.modeling_nanochat", "nanochat.hf.configuration_nanochat"):
        assert not [m for m, _, _ in IMPORTS[name] if not m.startswith("nanochat.hf")], name


def test_imports_are_at_module_level():
    # a function-local import hides the dependency graph; the one allowed is the cli's, which
    # keeps `nanochat --help` from importing torch
    local = {(name, m) for name, found in IMPORTS.items() for m, _, inside in found if inside}
    assert local == {("nanochat.cli", "nanochat.common")}, sorted(local)
