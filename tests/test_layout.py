"""The repository's layout as a course: the root holds the method in reading order, the machinery lives in folders,
and data flows one way. Imports are read with ast, so these checks see every import, function-level ones too."""
import ast
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The course in reading order: image -> tiles -> tower -> LLM -> VLM -> prompts -> pipeline -> the tools -> main job.
COURSE = ["anyres", "vision", "model", "vlm", "prompts", "pipeline", "reason", "train", "extract_data", "evaluate",
          "shapes"]
FOLDERS = ["weights", "storage", "serving", "training", "evaluation", "shapes_world"]


def python_files(*patterns):
    return sorted(p for pattern in patterns for p in glob.glob(os.path.join(ROOT, pattern)))


def module_name(path):
    return os.path.relpath(path, ROOT)[:-len(".py")].replace(os.sep, ".").removesuffix(".__init__")


PROJECT = {module_name(p) for p in python_files("*.py", *(f"{f}/*.py" for f in FOLDERS))}


def imported(path):
    """The project modules a file imports (import x, from x import y, from package import module)."""
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in PROJECT}
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module in PROJECT:
                found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in PROJECT}
    return found


def test_the_root_holds_the_course_and_nothing_else():
    root = sorted(os.path.basename(p)[:-3] for p in python_files("*.py"))
    assert root == sorted(COURSE)
    for name in COURSE:
        lines = sum(1 for _ in open(os.path.join(ROOT, name + ".py"), encoding="utf-8"))
        assert lines <= 510, f"{name}.py has {lines} lines: a student reads a course file in one sitting"


def test_no_course_file_imports_one_later_in_the_reading_order():
    """A course file imports only what the reader has already met: earlier course files, and machinery whose own
    course imports (followed through other machinery) are all earlier too."""
    graph = {m: imported(os.path.join(ROOT, *m.split(".")) + ".py") if os.path.exists(
        os.path.join(ROOT, *m.split(".")) + ".py") else set() for m in PROJECT}

    def course_deps(m, seen):
        if m in seen:
            return set()
        seen.add(m)
        out = set()
        for d in graph[m]:
            out |= {d} if d in COURSE else course_deps(d, seen)
        return out

    for i, name in enumerate(COURSE):
        for dep in graph[name]:
            later = {d for d in ({dep} if dep in COURSE else course_deps(dep, set())) if COURSE.index(d) >= i}
            assert not later, f"{name}.py imports {dep}, which needs {sorted(later)}: later in the reading order"


def test_model_never_calls_up_into_the_vlm():
    """model.py generates from token ids or from embeddings it is handed; it never looks for VLM methods."""
    source = open(os.path.join(ROOT, "model.py"), encoding="utf-8").read()
    assert "prepare_inputs" not in source and ".llm" not in source
    assert imported(os.path.join(ROOT, "model.py")) == set()


def test_no_project_module_is_imported_under_a_one_letter_alias():
    names = {m.split(".")[-1] for m in PROJECT}
    for path in python_files("*.py", "*/*.py"):
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for a in node.names:
                    assert not (a.asname and len(a.asname) == 1 and a.name.split(".")[-1] in names), \
                        f"{os.path.relpath(path, ROOT)}: import {a.name} as {a.asname}"


def test_no_module_calls_another_modules_private_names():
    names = "|".join(sorted({m.split(".")[-1] for m in PROJECT}))
    pattern = re.compile(rf"\b({names})\._[a-z]\w*")
    for path in python_files("*.py", *(f"{f}/*.py" for f in FOLDERS), "bench/*.py"):
        for n, line in enumerate(open(path, encoding="utf-8"), 1):
            code = line.split("#")[0]
            assert not pattern.search(code), f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}"
