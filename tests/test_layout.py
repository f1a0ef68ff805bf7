"""The package's layout (DESIGN §4): the core implements the papers and knows no benchmark,
imports form no cycle, and every console script answers --help."""
import ast
import glob
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = REPO / "m2omni_jax"
CORE = ("models", "data", "training", "parallel", "inference")  # inference: once it exists

# Names of the built-in benchmark (the shapes world) that have no business in the core: its
# module and data set names, its task names, its scene vocabulary as data, its tower's region
# head. Plain words stay allowed ("colour", "triangles" of a mel filter bank, "square", "top left"
# of a grid); only the (?i) parts ignore case.
BENCHMARK_NAMES = {
    r"(?i)shapes?[ _-]?world": "the benchmark itself",
    r"(?i)\bvqa_\w+": "a shapes-world task name",
    r"(?i:\bregion_(?:head|tags?|words?|class(?:es)?|labels?|owners?|word_ids)\b)|\bREGION_[A-Z_]+":
        "the shapes-world region tags",
    r"(?i)\bcircles?\b": "a shapes-world shape",
    r"(?i:[\"']colou?r[\"'])|\bCOLOU?RS\b|\bSHAPES\b": "a shapes-world attribute",
    r"(?i)\btower_pretrain\b|\bpretrain_tower\b": "the shapes-world tower pre-training",
}


def core_files():
    return sorted(f for name in CORE if (PACKAGE / name).is_dir() for f in (PACKAGE / name).rglob("*.py"))


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: pathlib.Path, known: set[str]) -> set[str]:
    """The package modules `path` imports (static, from the AST; relative imports resolved)."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(f): f for f in PACKAGE.rglob("*.py")}
    return {name: imported_modules(f, set(files)) for name, f in files.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_the_core_names_no_benchmark():
    hits = []
    for path in core_files():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, what in BENCHMARK_NAMES.items():
                match = re.search(pattern, line)
                if match:
                    hits.append(f"{path.relative_to(REPO)}:{number}: {match.group(0)!r} ({what}): {line.strip()}")
    assert not hits, "benchmark names in the core (move them to m2omni_jax/experiments/):\n" + "\n".join(hits)


def test_the_core_imports_no_experiment_and_no_entry_point():
    """Experiments build on the core and register their plug-ins into it, never the reverse;
    entry points sit on top (DESIGN §4)."""
    graph = import_graph()
    core = {module_name(f) for f in core_files()}
    entry_points = {module for _, module, _ in console_scripts()} | {"m2omni_jax.build", "m2omni_jax.cli"}
    wrong = sorted(f"{module} imports {target}" for module in core for target in graph[module]
                   if target.startswith("m2omni_jax.experiments") or target in entry_points)
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 20 and "m2omni_jax.models.omni" in graph
    cycles = import_cycles(graph)
    assert not cycles, "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_cycles():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def console_scripts() -> list[tuple[str, str, str]]:
    """(name, module, function) of each console script setup.py declares."""
    text = (REPO / "setup.py").read_text()
    return re.findall(r"[\"']([\w-]+)\s*=\s*([\w.]+):(\w+)[\"']", text)


# Commands that read no run config name their own required flag instead.
CONFIG_FLAG = {"m2omni-import": "--hf"}


def test_every_console_script_answers_help():
    scripts = console_scripts()
    assert len(scripts) >= 6 and ("m2omni-train", "m2omni_jax.main", "run") in scripts
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = {name: subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.argv = [{name!r}, '--help']; from {module} import {function}; "
                               f"{function}()"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, module, function in scripts}
    failed = help_failures(procs, lambda name, code, out, err: code == 0 and CONFIG_FLAG.get(name, "--config") in out)
    assert not failed, "\n\n".join(failed)


def help_failures(procs: dict, answered) -> list[str]:
    """Waits for each `--help` process; "name: exit code + output tail" of those `answered` rejects."""
    failed = []
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if not answered(name, proc.returncode, out, err):
            failed.append(f"{name}: exit {proc.returncode}\n{(out + err)[-1500:]}")
    return failed


def test_every_benchmark_script_answers_help():
    """Each script under benchmarks/ parses its flags (a flag defined twice, say --config by the
    script and by m2omni_jax.cli, fails here rather than in a long run)."""
    scripts = sorted(glob.glob(os.path.join(REPO, "benchmarks", "**", "*.py"), recursive=True))
    scripts = [s for s in scripts if not os.path.basename(s).startswith("_")]
    assert len(scripts) >= 10
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = {os.path.relpath(s, REPO): subprocess.Popen([sys.executable, s, "--help"], cwd=REPO, env=env,
                                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for s in scripts}
    failed = help_failures(procs, lambda name, code, out, err: "Traceback" not in out + err and "--" in out + err)
    assert not failed, "\n\n".join(failed)


@pytest.mark.parametrize("bad", ["from m2omni_jax.experiments import shapes_world", "the Shapes World", "vqa_color",
                                 "region_head", "REGION_CLASSES", "a red circle", "d['color']", "sw.COLORS"])
def test_the_benchmark_patterns_catch_leaks(bad):
    assert any(re.search(p, bad) for p in BENCHMARK_NAMES)


@pytest.mark.parametrize("fine", ["memory region", "the objects' colours", "Triangles on the mel scale",
                                  "a perfect square", "star(args)", "from the top left", "colors = palette"])
def test_the_benchmark_patterns_spare_plain_words(fine):
    assert not any(re.search(p, fine) for p in BENCHMARK_NAMES), fine
