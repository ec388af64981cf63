"""The package layering: every import points down, and no package reaches into another's private modules."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import klas

ROOT = Path(klas.__file__).parent

#: Lower numbers sit lower; a module may import its own package and packages of a lower rank only.
RANK = {
    "errors": 0, "units": 0,
    "klas": 1,  # klas/__init__.py: the version and KlasError
    "fs": 1, "settings": 1, "term": 1, "process": 1,
    "config": 1.5,  # CacheConfig, SearchConfig and the option vocabularies: torch-free, read by the CLI
    "utils": 2, "optim": 2, "metrics": 2,
    "models": 3, "data": 3,
    "zoo": 4,  # the demo family: registers itself with klas.models, which never imports it
    "probes": 5, "stitch": 5,
    "cache": 6, "score": 6, "select": 6,  # the cache times the stitch layers search may propose
    "run": 7,
    "search": 8, "train": 8,
    "quality": 9, "heterogeneous": 9, "tree": 9,  # the Stitch Tree stage trains with klas.train's core
    "export": 10,
    "cli": 11, "__main__": 12,
}


def _package(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return "klas" if parts == ("__init__",) else parts[0]


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported klas module, line) for every import in a file, function-local ones included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "klas":
            if node.module == "klas":
                found += [(f"klas.{a.name}", node.lineno) for a in node.names]
            else:
                found.append((node.module, node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.split(".")[0] == "klas"]
    return found


def test_every_import_points_down():
    files = sorted(ROOT.rglob("*.py"))
    assert {_package(f) for f in files} <= set(RANK), "a new package needs a place in RANK"
    bad = []
    for f in files:
        own = _package(f)
        for module, line in _imports(f):
            parts = module.split(".")
            target = parts[1] if len(parts) > 1 else "klas"
            if target == own:
                continue
            if RANK[target] >= RANK[own]:
                bad.append(f"{f.relative_to(ROOT.parent)}:{line} imports {module} (rank {RANK[target]} >= {RANK[own]})")
            if any(p.startswith("_") and not p.startswith("__") for p in parts[2:]):
                bad.append(f"{f.relative_to(ROOT.parent)}:{line} imports the private module {module}")
    assert not bad, "\n".join(bad)


def test_models_layer_loads_without_the_demo_zoo():
    code = "import sys, klas.models; assert 'klas.zoo' not in sys.modules, 'klas.models imported klas.zoo'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
