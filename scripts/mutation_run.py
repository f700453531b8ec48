"""Mutation testing of the math: does a deliberate small change to a formula make a test fail?

  python scripts/mutation_run.py [--workers 2] [--only MODULE ...] [--out mutation.json]
  python scripts/mutation_run.py --survivors-of mutation.json     # again, only the mutants that survived

For each function listed in TARGETS, every site of the mutation operators below becomes one mutant: the
module is rewritten with that single change in a copy of the repository, and the module's fast test
subset runs in a fresh process (`pytest -x`). A failing (or timing-out) run kills the mutant; a passing
one lets it survive. Prints, per module, the mutants generated, killed, timed out and survived, then each
survivor with its line and change; --out writes them all as JSON.

Operators: + <-> -, * <-> /, ** -> *; < <-> <=, > <-> >=, == <-> !=; -x -> x; a number c -> c + 1 (ints)
or 2c (floats; 0 -> 1); jnp.sum <-> jnp.mean, jnp.maximum <-> jnp.minimum, jnp.max <-> jnp.min; axis=a ->
axis=a+1 (or 0 for -1); and <-> or.

Why a script and not mutmut or cosmic-ray: mutmut 3 runs each mutant in a child forked from a process that
has already started JAX, and those children hang (mutants a fresh process kills in a second are reported as
timeouts); cosmic-ray would add eight dependencies for what a hundred lines do here. A fresh process per
mutant costs JAX's start-up (about 3 s) each time: the full run takes about half an hour on 2 cores.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# module -> (functions or "Class.method" to mutate, the fast tests that judge them)
TARGETS = {
    "cvae_jax/objectives.py": (
        ["gaussian_kl", "gaussian_kl_per_dim", "elbo_terms", "gaussian_kl_between", "log_importance_weights",
         "k_sample_terms", "decoder_log_likelihood", "free_bits_kl", "loss_and_metrics"],
        ["tests/test_objectives.py", "tests/test_multisample.py", "tests/test_quadrants.py::test_kl_between_gaussians_matches_closed_forms",
         "tests/test_quadrants.py::test_sampled_kl_has_the_closed_form_as_its_expectation",
         "tests/test_quadrants.py::test_bound_with_a_conditional_prior_is_exact_under_the_exact_posterior",
         "tests/test_estimators.py", "tests/test_collapse.py::test_free_bits_in_the_train_step"]),
    "cvae_jax/likelihoods.py": (
        ["bernoulli_log_prob", "continuous_bernoulli_log_norm", "continuous_bernoulli_log_prob",
         "continuous_bernoulli_mean", "gaussian_mean_scale", "gaussian_log_prob", "categorical_log_prob"],
        ["tests/test_objectives.py", "tests/test_molecules.py::test_categorical_log_prob_matches_closed_forms"]),
    "cvae_jax/estimators.py": (
        ["map_over_split", "make_evaluate", "make_posterior_stats", "mutual_information", "active_units",
         "importance_weighted_bound", "iwae_bound", "make_iwae"],
        ["tests/test_estimators.py", "tests/test_collapse.py::test_mutual_information_against_the_closed_form",
         "tests/test_quadrants.py::test_bound_with_a_conditional_prior_is_exact_under_the_exact_posterior"]),
    "cvae_jax/evaluators/anomaly.py": (
        ["make_scores", "detection_metrics", "class_log_prior"],
        ["tests/test_anomaly.py::test_infinite_scores_rank_and_nan_scores_are_counted",
         "tests/test_anomaly.py::test_infinite_scores_keep_the_order_of_the_finite_ones",
         "tests/test_anomaly.py::test_metrics_by_hand", "tests/test_anomaly.py::test_vae_scores_with_one_sample_agree",
         "tests/test_anomaly.py::test_cvae_marginal_and_best_label_scores",
         "tests/test_anomaly.py::test_autoencoder_score_is_its_reconstruction_loss",
         "tests/test_anomaly.py::test_the_class_prior_is_the_normalized_label_frequency"]),
    "cvae_jax/tasks/quadrants.py": (
        ["output_mask", "hide", "fill", "masked_log_likelihood", "Networks.baseline_loss", "Networks.prior",
         "Networks.log_likelihood_fn", "Networks.cvae_terms", "Networks.conditional_nll"],
        ["tests/test_quadrants.py"]),
    "cvae_jax/tasks/molecules.py": (
        ["canonical", "generation_metrics", "property_errors"],
        ["tests/test_molecules.py::test_rdkit_properties_and_moses_metrics_have_known_values"]),
}

SWAP_BINOP = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult}
SWAP_CMP = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq}
SWAP_CALL = {"sum": "mean", "mean": "sum", "maximum": "minimum", "minimum": "maximum", "max": "min", "min": "max"}


def mutations(node: ast.AST):
  """(description, mutate) for every mutation site of one node; mutate() changes the node in place."""
  if isinstance(node, ast.BinOp) and type(node.op) in SWAP_BINOP:
    new = SWAP_BINOP[type(node.op)]
    yield f"{type(node.op).__name__} -> {new.__name__}", lambda n=node, new=new: setattr(n, "op", new())
  elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in SWAP_CMP:
    new = SWAP_CMP[type(node.ops[0])]
    yield f"{type(node.ops[0]).__name__} -> {new.__name__}", lambda n=node, new=new: setattr(n, "ops", [new()])
  elif isinstance(node, ast.BoolOp):
    new = ast.Or if isinstance(node.op, ast.And) else ast.And
    yield f"{type(node.op).__name__} -> {new.__name__}", lambda n=node, new=new: setattr(n, "op", new())
  elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
    yield "-x -> x", lambda n=node: setattr(n, "op", ast.UAdd())
  elif isinstance(node, ast.Constant) and type(node.value) in (int, float):
    value = node.value + 1 if isinstance(node.value, int) else (node.value * 2 if node.value else 1.0)
    yield f"{node.value!r} -> {value!r}", lambda n=node, v=value: setattr(n, "value", v)
  elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in SWAP_CALL:
    new = SWAP_CALL[node.func.attr]
    yield f"{node.func.attr} -> {new}", lambda n=node, new=new: setattr(n.func, "attr", new)
  if isinstance(node, ast.Call):
    for kw in node.keywords:
      if kw.arg == "axis" and isinstance(kw.value, (ast.Constant, ast.UnaryOp)):
        old = ast.literal_eval(kw.value)
        if isinstance(old, int):
          new = 0 if old == -1 else old + 1
          yield f"axis={old} -> axis={new}", lambda k=kw, new=new: setattr(k, "value", ast.Constant(new))


def target_nodes(tree: ast.Module, names: list[str]):
  """The function definitions named (top level, or Class.method)."""
  top = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
  for name in names:
    cls, _, method = name.rpartition(".")
    node = top[cls] if cls else top[name]
    if cls:
      node = next(n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == method)
    yield name, node


def mutants(module: str, functions: list[str]):
  """Every mutant of the module: (function, line, description, mutated source)."""
  source = (REPO / module).read_text()
  tree = ast.parse(source)
  sites = []
  for name, fn in target_nodes(tree, functions):
    body = [stmt for stmt in fn.body if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant))]
    for stmt in body:  # the docstring's numbers are not code
      for node in ast.walk(stmt):
        for index, (description, _) in enumerate(mutations(node)):
          sites.append((name, node, index, description))
  out = []
  for name, node, index, description in sites:
    mutated = copy.deepcopy(tree)
    twin = next(n for n in ast.walk(mutated) if _same(n, node))
    list(mutations(twin))[index][1]()
    out.append((name, node.lineno, description, ast.unparse(mutated)))
  return out


def _same(a: ast.AST, b: ast.AST) -> bool:
  return (type(a) is type(b) and getattr(a, "lineno", None) == b.lineno and getattr(a, "col_offset", None) == b.col_offset
          and getattr(a, "end_col_offset", None) == getattr(b, "end_col_offset", None))


def workspace() -> Path:
  """A copy of the repository (code, tests, configs, data) in which one mutant at a time is written."""
  root = Path(tempfile.mkdtemp(prefix="mutation_"))
  for part in ("cvae_jax", "tests", "conf", "data", "pyproject.toml", "hydra_plugins"):
    source = REPO / part
    (shutil.copytree if source.is_dir() else shutil.copy)(source, root / part)
  return root


def run_tests(root: Path, tests: list[str], timeout: float) -> str:
  env = dict(os.environ, PYTHONPATH=str(root), TF_CPP_MIN_LOG_LEVEL="2")
  try:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=root,
                          env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return "timeout"
  return "survived" if proc.returncode == 0 else "killed"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--only", nargs="+", help="modules to mutate (default: every module in TARGETS)")
  parser.add_argument("--out", type=Path, help="write every mutant's outcome here as JSON")
  parser.add_argument("--survivors-of", type=Path, help="run only the mutants that survived in this earlier --out")
  args = parser.parse_args()
  earlier = json.loads(args.survivors_of.read_text()) if args.survivors_of else None
  survived = {(r["module"], r["function"], r["line"], r["mutation"]) for r in earlier or [] if r["outcome"] == "survived"}
  modules = args.only or ([m for m in TARGETS if any(s[0] == m for s in survived)] if earlier else list(TARGETS))
  roots = [workspace() for _ in range(args.workers)]
  jobs = []
  for module in modules:
    functions, tests = TARGETS[module]
    clean = time.perf_counter()
    if run_tests(roots[0], tests, 1800) != "survived":
      sys.exit(f"error: the tests of {module} fail without any mutation: fix them first")
    timeout = 3 * (time.perf_counter() - clean) + 30
    jobs += [(module, tests, timeout, *m) for m in mutants(module, functions)
             if earlier is None or (module, *m[:3]) in survived]
  print(f"{len(jobs)} mutants of {len(modules)} modules, {args.workers} workers", flush=True)
  free = list(roots)
  results = []

  def one(job):
    module, tests, timeout, function, line, description, source = job
    root = free.pop()
    try:
      (root / module).write_text(source)
      outcome = run_tests(root, tests, timeout)
      (root / module).write_text((REPO / module).read_text())
    finally:
      free.append(root)
    return {"module": module, "function": function, "line": line, "mutation": description, "outcome": outcome}

  with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
    for i, result in enumerate(pool.map(one, jobs), 1):
      results.append(result)
      if result["outcome"] == "survived":
        print(f"  [{i}/{len(jobs)}] survived: {result['module']}:{result['line']} {result['function']}: "
              f"{result['mutation']}", flush=True)
  for root in roots:
    shutil.rmtree(root, ignore_errors=True)
  print("\n| module | mutants | killed | timed out | survived |\n| --- | --- | --- | --- | --- |")
  for module in modules:
    rows = [r for r in results if r["module"] == module]
    count = lambda outcome: sum(r["outcome"] == outcome for r in rows)
    print(f"| {module} | {len(rows)} | {count('killed')} | {count('timeout')} | {count('survived')} |")
  if args.out:
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
  main()
