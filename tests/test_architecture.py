"""Structure checks (issues 13, 25): no import cycles between modules or folders (every subpackage is a folder;
string-based importlib targets count as imports), few imports inside functions and each with its reason, no
oversized module, the model's packages never import the evals, and the block math in one place."""
import ast
import os
import re

from helpers import REPO

ROOTS = {"dba_jax": os.path.join(REPO, "dba_jax"), "dba_kernels": os.path.join(REPO, "kernels", "dba_kernels")}
MAX_LINES = 720
MAX_FUNCTION_IMPORTS = 40
MODEL_PACKAGES = ("dba_jax.ops", "dba_jax.attention", "dba_jax.hope", "dba_jax.layers", "dba_jax.model",
                  "dba_kernels")


def _subpackages() -> tuple:
  """Every folder with an __init__.py, as a dotted name."""
  out = []
  for pkg, root in ROOTS.items():
    for d, _, files in os.walk(root):
      if "__init__.py" in files:
        rel = os.path.relpath(d, root)
        out.append(pkg if rel == "." else f"{pkg}.{rel.replace(os.sep, '.')}")
  return tuple(sorted(p for p in out if p != "dba_jax"))


SUBPACKAGES = _subpackages()
# "dba_jax.x.y" or "dba_jax.x:fn" in a string: a module some registry imports by name.
STRING_IMPORT = re.compile(r"^(dba_jax(?:\.\w+)+)(?::\w+)?$")


def _modules() -> dict:
  """{dotted module name: file path} for every module of the library and the kernels."""
  out = {}
  for pkg, root in ROOTS.items():
    for d, _, files in os.walk(root):
      for f in files:
        if f.endswith(".py"):
          rel = os.path.relpath(os.path.join(d, f), root)[:-3].replace(os.sep, ".")
          name = pkg if rel == "__init__" else f"{pkg}.{rel.removesuffix('.__init__')}"
          out[name] = os.path.join(d, f)
  return out


def _imports(name: str, path: str, known: set) -> set:
  """Every library module `name` imports, at any depth (function-level imports count)."""
  tree = ast.parse(open(path).read())
  pkg = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(pkg.split(".")[:len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
      for a in node.names:  # `from pkg import module` imports the module; `from module import name` the module
        found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    elif isinstance(node, ast.Constant) and isinstance(node.value, str) and (m := STRING_IMPORT.match(node.value)):
      found.add(m.group(1))
  # The top-level dba_jax/__init__ loads lazily and is no dependency.
  return {m for m in found if m in known and m != name and m != "dba_jax"}


def _node(module: str) -> str:
  """Modules of a subpackage collapse into one node (a folder); top-level modules stay themselves."""
  return next((p for p in SUBPACKAGES if module == p or module.startswith(p + ".")), module)


def _cycle(graph: dict):
  """One cycle as a list of nodes, or None."""
  state, stack = {}, []

  def visit(n):
    state[n] = "open"
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if state.get(m) == "open":
        return stack[stack.index(m):] + [m]
      if m not in state and (c := visit(m)):
        return c
    stack.pop()
    state[n] = "done"
    return None

  for n in sorted(graph):
    if n not in state and (c := visit(n)):
      return c
  return None


def test_no_import_cycles_between_modules_or_folders():
  mods = _modules()
  deps = {name: _imports(name, path, set(mods)) for name, path in mods.items()}
  assert "dba_jax.ops.base" in deps["dba_jax.ops.standard"] and "dba_jax.ops" in deps["dba_jax.model"]  # parsed
  modules = {n: {m for m in ds if not (m.startswith(n + ".") or n.startswith(m + "."))} for n, ds in deps.items()}
  assert _cycle(modules) is None, f"module import cycle: {' -> '.join(_cycle(modules))}"
  folders: dict = {}
  for n, ds in deps.items():
    folders.setdefault(_node(n), set()).update(_node(m) for m in ds if _node(m) != _node(n))
  assert _cycle(folders) is None, f"folder import cycle: {' -> '.join(_cycle(folders))}"


def test_every_subpackage_is_a_folder_node():
  for pkg in ("dba_jax.ops", "dba_jax.attention", "dba_jax.evals", "dba_jax.hope", "dba_jax.latentwire",
              "dba_jax.addition", "dba_jax.formats", "dba_kernels"):
    assert pkg in SUBPACKAGES


def test_model_packages_never_import_evals():
  mods = _modules()
  for name, path in mods.items():
    if name.startswith(MODEL_PACKAGES):
      bad = sorted(m for m in _imports(name, path, set(mods)) if m.startswith("dba_jax.evals"))
      assert not bad, f"{name} imports {bad}"


def _function_imports(path: str) -> list:
  """(line number, source line) of every import inside a function."""
  lines = open(path).read().splitlines()
  out = []
  for node in ast.walk(ast.parse("\n".join(lines))):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      out += [(s.lineno, lines[s.lineno - 1]) for s in ast.walk(node) if isinstance(s, (ast.Import, ast.ImportFrom))]
  return sorted(set(out))


def test_imports_inside_functions_are_few_and_say_why():
  """Only to keep a heavy optional dependency lazy (torch, matplotlib, libtpu, ...) or a measured start-up cost;
  each such line carries `# lazy: <reason>`."""
  found = [(path, n, line) for path in _modules().values() for n, line in _function_imports(path)]
  unexplained = [f"{os.path.relpath(p, REPO)}:{n}: {line.strip()}" for p, n, line in found if "# lazy:" not in line]
  assert not unexplained, "imports inside functions without a `# lazy: <reason>`:\n" + "\n".join(unexplained)
  assert len(found) <= MAX_FUNCTION_IMPORTS, f"{len(found)} imports inside functions (at most {MAX_FUNCTION_IMPORTS})"


def test_no_module_is_oversized():
  big = {os.path.relpath(p, REPO): n for p in _modules().values() if (n := len(open(p).read().splitlines())) > MAX_LINES}
  assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_the_cycle_finder_finds_one():
  assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _cycle({"a": {"b"}, "b": set()}) is None


def test_block_math_lives_only_in_the_model():
  """Callers reach the layers through Decoder.forward: no library module but the model and the attention kinds calls
  a block's norms, MLP, projections or output projection, and softmax attention math is only in dba_jax.ops (the
  attention kinds materialise logits only for the coordinate check) and the addition model."""
  layer_calls = re.compile(r"\.(attn_norm|mlp_norm|mlp|project|streams|out)\(")
  attention_math = re.compile(r"einsum\([^)]*(bhts|bkgts|bts)")
  for name, path in _modules().items():
    text = "\n".join(line.split("#")[0] for line in open(path).read().splitlines())  # code, not comments
    if name == "dba_jax.torch_gpt":  # the PyTorch speed baseline: a torch model of its own, like addition.torch_ref
      continue
    if not name.startswith(("dba_jax.model", "dba_jax.attention", "dba_jax.addition")):  # addition: its own family
      assert not layer_calls.search(text), f"{path} calls a layer's internals: {layer_calls.search(text).group(0)}"
    if not name.startswith(("dba_jax.ops", "dba_jax.model", "dba_jax.attention", "dba_jax.addition", "dba_kernels")):
      assert not attention_math.search(text), f"{path} computes attention logits itself"
