"""The shape of the code: the import graph (the library core at the bottom, the feature packages
above it, serve/ above them, the CLI, handlers and jobs on top; no cycles), the public face, and
one copy of what the services share."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FEATURES = ("classify", "intervene")  # one package per feature, each on the core only
TOP = ("handlers", "training", "bench")  # import anything; nothing in ldmprobe imports them


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def sources() -> dict[str, Path]:
    out = {}
    for top in ("ldmprobe", *TOP):
        for path in (ROOT / top).rglob("*.py"):
            out[module_name(path)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module `name` imports (at any depth of the file: lazy imports count), resolved to
    the known modules it names."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in known else origin for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # a name inside a module → the module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def graph() -> dict[str, set[str]]:
    found = sources()
    known = set(found) | {"ts_adapter"}
    return {name: imports(name, path, known) for name, path in found.items()}


def rank(module: str) -> int:
    """0 the core, 1 the feature packages, 2 serve/, 3 the CLI and the public face, 4 on top."""
    parts = module.split(".")
    if parts[0] != "ldmprobe":
        return 4
    if module in ("ldmprobe", "ldmprobe.cli"):
        return 3
    if parts[1] == "serve":
        return 2
    return 1 if parts[1] in FEATURES else 0


def test_imports_go_down_the_layers():
    wrong = []
    for module, targets in graph().items():
        for target in targets:
            if target.startswith(TOP + ("ts_adapter",)) and module.startswith("ldmprobe"):
                wrong.append(f"{module} imports {target}: the library imports nothing of the jobs or handlers")
            elif rank(target) > rank(module):
                wrong.append(f"{module} (layer {rank(module)}) imports {target} (layer {rank(target)})")
            elif rank(module) == rank(target) == 1 and target.split(".")[1] != module.split(".")[1]:
                wrong.append(f"{module} imports {target}: feature packages stand on the core alone")
            elif target.startswith("ldmprobe.serve") and module.startswith(("training", "bench")):
                wrong.append(f"{module} imports {target}: only the CLI and the handlers use serve/")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    edges = {m: {t for t in ts if t.startswith("ldmprobe")} for m, ts in graph().items() if m.startswith("ldmprobe")}
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " → ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_the_graph_sees_the_imports():
    """The walker itself: relative, absolute, lazy (inside a function) and package imports."""
    g = graph()
    assert "ldmprobe.probes" in g["ldmprobe.intervene.optimisation"]  # from ..probes import Probe
    assert "ldmprobe.generate" in g["ldmprobe.probes.bank"]  # lazy, inside step_map
    assert "ldmprobe.serve.probe" in g["handlers.probe_handler"]
    assert "ldmprobe.metrics" in g["training.fit"]  # from ldmprobe import metrics as M
    assert rank("ldmprobe.serve.base") == 2 and rank("ldmprobe.intervene.run") == 1 and rank("ldmprobe.store") == 0


def test_the_public_face():
    import ldmprobe
    from ldmprobe import GenerationSettings, Intervention, ProbeBank, Sampler, load_model
    from ldmprobe.generate import Sampler as CoreSampler
    from ldmprobe.intervene.run import Intervention as RunIntervention
    from ldmprobe.models import load_model as core_load
    from ldmprobe.probes.bank import ProbeBank as BankProbeBank
    from ldmprobe.schemas import GenerationSettings as CoreSettings

    assert (load_model, Sampler, ProbeBank, Intervention, GenerationSettings) == \
        (core_load, CoreSampler, BankProbeBank, RunIntervention, CoreSettings)
    assert set(ldmprobe.__all__) >= {"load_model", "Sampler", "ProbeBank", "Intervention", "GenerationSettings"}


def _defined(name: str) -> list[str]:
    """Where in ldmprobe/ a function or method called `name` is defined."""
    out = []
    for module, path in sources().items():
        if module.startswith("ldmprobe"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef) and node.name == name:
                    out.append(module)
    return out


def test_one_copy_of_the_service_loop_padding_and_map_pngs():
    assert _defined("handle") == ["ldmprobe.serve.base"]  # the one service loop, and its grouping:
    assert [m for m in _defined("groups") if m.startswith("ldmprobe.serve")] == ["ldmprobe.serve.base"]
    assert _defined("bucket") == ["ldmprobe.serve.base", "ldmprobe.serve.base"]  # the function and Service.bucket
    assert _defined("first_rows") == ["ldmprobe.generate"]  # batch padding: Sampler.generate(pad_to=) alone
    assert _defined("grey_map") == ["ldmprobe.probes.heads"] and _defined("map_png") == ["ldmprobe.serve.base"]
    texts = {m: p.read_text() for m, p in sources().items() if m.startswith("ldmprobe")}
    assert [m for m, t in texts.items() if re.search(r"(?<!class )PngScale\(", t)] == ["ldmprobe.serve.base"]
    assert [m for m, t in texts.items() if "* [prompts[-1]]" in t or "[prompts[-1]] *" in t] == []
