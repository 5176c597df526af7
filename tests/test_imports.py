"""The package's imports point one way: no module imports, even inside a function, a
module that imports it back (directly or through others)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fada_jax"


def import_graph(package: pathlib.Path) -> dict[str, set[str]]:
  """module -> the package's modules it imports anywhere in its source."""
  modules = {}
  for path in package.rglob("*.py"):
    name = ".".join(path.relative_to(package.parent).with_suffix("").parts)
    modules[name.removesuffix(".__init__")] = path
  graph = {}
  for name, path in modules.items():
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        for alias in node.names:
          submodule = f"{node.module}.{alias.name}"
          imported.add(submodule if submodule in modules else node.module)
      elif isinstance(node, ast.Import):
        imported.update(alias.name for alias in node.names)
    graph[name] = {m for m in imported if m in modules and m != name}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle (a list of modules, first = last), or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(module: str) -> list[str] | None:
    state[module] = 1
    path.append(module)
    for imported in sorted(graph[module]):
      if state.get(imported) == 1:
        return path[path.index(imported):] + [imported]
      if imported not in state:
        cycle = visit(imported)
        if cycle:
          return cycle
    path.pop()
    state[module] = 2
    return None

  for module in sorted(graph):
    if module not in state:
      cycle = visit(module)
      if cycle:
        return cycle
  return None


def test_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles():
  graph = import_graph(PACKAGE)
  assert "fada_jax.train.loop" in graph and "fada_jax.evaluate.run" in graph
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
