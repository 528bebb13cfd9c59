"""The layers import in one direction, and the server does not import the offline stack."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = ("sklearn", "matplotlib", "probes.eval")


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("probes/lm", ("guard", "probes.probe", "probes.features", "probes.train", "probes.registry", "probes.eval")),
        ("probes", ("guard",)),
        ("guard", ("probes.eval",)),  # the online side: only its CLI's offline commands reach the evaluation stack
    ],
)
def test_lower_layers_never_import_higher_ones(package, forbidden):
    for path in sorted((ROOT / package).rglob("*.py")):
        if package == "guard" and path.name == "cli.py":
            continue
        for name in imports(path):
            assert not name.startswith(forbidden), f"{path.relative_to(ROOT)} imports {name}"


@pytest.mark.parametrize("module", ["guard.server.app", "guard.cli"])
def test_serving_imports_no_offline_stack(module):
    """Importing the server (or the CLI that starts it) loads neither scikit-learn, matplotlib nor the dataset
    readers: the server starts faster and cannot depend on them."""
    code = f"import json, sys, {module}; print(json.dumps(sorted(m for m in sys.modules if m.startswith({OFFLINE!r}))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    loaded = [m for m in json.loads(out) if m != "probes.eval"]  # the package itself is a docstring
    if module == "guard.cli":  # the CLI names the presets and sources in its help; they read nothing at import
        loaded = [
            m for m in loaded if m not in ("probes.eval.presets", "probes.eval.sources", "probes.eval.jailbreaks")
        ]
    assert loaded == []
