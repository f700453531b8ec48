"""The shape of the package: no import cycle, imports flowing one way through the layers, no task named in
the generic modules."""
import ast
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "cvae_jax"

# Lower layers never import higher ones: data -> models -> objectives -> engine -> tasks -> command lines.
LAYERS = [
    ["cvae_jax", "cvae_jax.config", "cvae_jax.keys", "cvae_jax.xla_cpu", "cvae_jax.registry", "cvae_jax.resources"],
    ["cvae_jax.data"],
    ["cvae_jax.likelihoods"],
    ["cvae_jax.models"],
    ["cvae_jax.objectives", "cvae_jax.annealing"],
    ["cvae_jax.estimators", "cvae_jax.schema"],
    ["cvae_jax.engine"],
    ["cvae_jax.generation", "cvae_jax.figures", "cvae_jax.evaluators"],
    ["cvae_jax.tasks"],
    ["cvae_jax.experiment", "cvae_jax.batched"],
    ["cvae_jax.api"],
    ["cvae_jax.train", "cvae_jax.evaluate", "cvae_jax.generate", "cvae_jax.detect", "cvae_jax.report", "cvae_jax.molecules"],
]
# The engine, the trainer and the generic evaluation modules know no task.
GENERIC = ["engine/*.py", "train.py", "estimators.py", "evaluators/*.py", "experiment.py", "batched.py", "report.py",
           "evaluate.py", "generate.py", "detect.py", "tasks/base.py", "figures.py", "generation.py"]
TASK_WORDS = ("moses", "tokens", "vocab", "quadrant", "cvae_neg_elbo", "molecule")


def module_name(path: Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
  """Every cvae_jax module `name` imports, at any depth of its code (module level or inside a function)."""
  path = MODULES[name]
  package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # relative import
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
      for alias in node.names:  # `from pkg import submodule` imports the submodule
        found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
  return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def layer(name: str) -> int:
  for i, names in enumerate(LAYERS):  # the package itself ("cvae_jax") by its exact name, others with their modules
    if any(name == n or (n != "cvae_jax" and name.startswith(n + ".")) for n in names):
      return i
  raise AssertionError(f"{name} is in no layer of this test: add it to LAYERS")


def test_no_import_cycle():
  cycles, state = [], {}

  def visit(name, stack):
    state[name] = "open"
    for dep in sorted(GRAPH[name]):
      if state.get(dep) == "open":
        cycles.append(stack[stack.index(dep):] + [dep])
      elif dep not in state:
        visit(dep, stack + [dep])
    state[name] = "done"

  for name in sorted(GRAPH):
    if name not in state:
      visit(name, [name])
  assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_cycle(monkeypatch):
  monkeypatch.setitem(GRAPH, "cvae_jax.config", GRAPH["cvae_jax.config"] | {"cvae_jax.train"})
  with pytest.raises(AssertionError, match="import cycles: .*cvae_jax.train"):
    test_no_import_cycle()


# `cvae_jax.load` is the package's one lazy attribute (PEP 562): imported when first used, not with the package.
LAZY = {("cvae_jax", "cvae_jax.api")}


def test_imports_flow_one_way():
  upward = [f"{name} (layer {layer(name)}) imports {dep} (layer {layer(dep)})"
            for name, deps in GRAPH.items() for dep in deps if layer(dep) > layer(name) and (name, dep) not in LAZY]
  assert not upward, "\n".join(upward)


def test_the_generic_modules_name_no_task():
  found = []
  for pattern in GENERIC:
    for path in sorted(PACKAGE.glob(pattern)):
      for number, line in enumerate(path.read_text().lower().splitlines(), 1):
        found += [f"{path.relative_to(REPO)}:{number}: {word}" for word in TASK_WORDS if word in line]
  assert not found, "\n".join(found)


def test_importing_the_library_changes_no_environment():
  import subprocess
  import sys
  script = "import os; before = dict(os.environ); import cvae_jax.experiment, cvae_jax.train; print(before == dict(os.environ))"
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO)
  assert out.stdout.strip() == "True"


def test_the_package_imports_light_and_loads_the_api_on_first_use():
  import subprocess
  import sys
  script = ("import sys, cvae_jax; light = 'jax' not in sys.modules and 'cvae_jax.api' not in sys.modules; "
            "load = cvae_jax.load; print(light, load.__module__)")
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO)
  assert out.stdout.split() == ["True", "cvae_jax.api"]


def test_the_layer_check_finds_an_upward_import(monkeypatch):
  monkeypatch.setitem(GRAPH, "cvae_jax.data", GRAPH["cvae_jax.data"] | {"cvae_jax.tasks"})
  with pytest.raises(AssertionError, match="cvae_jax.data .layer 1. imports cvae_jax.tasks"):
    test_imports_flow_one_way()
