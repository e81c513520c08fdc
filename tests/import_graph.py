"""The import graph of the product, read from the AST (function-level imports included).

`imports_of(path, module)` lists every module a file imports: `import a.b`, `from a import b`
(relative ones resolved against the file's package), and `importlib.import_module("a")` /
`__import__("a")` with a constant name, each with its line and whether it sits inside a
function (a lazy import). `violations(root)` applies the dependency rules of
docs/ARCHITECTURE.md to every .py file under `root` and returns one readable line per breach.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

PRODUCT = ("dicom_node", "inference", "sr_writers")
# What inference/engine may import besides the standard library and itself.
ENGINE_ALLOWED = {"torch", "numpy", "PIL", "safetensors", "flash_attn", "tokenizers", "transformers"}
# The only place the product may import benchmarks (lazily, inside the command's function).
BENCH_COMMAND_FILE = "dicom_node/cli.py"


@dataclass(frozen=True)
class Import:
    target: str  # dotted module name, absolute
    line: int
    lazy: bool  # inside a function body


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, module: str) -> list[Import]:
    """Every import in `path` (the file of dotted `module`), in source order."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                out.extend(Import(a.name, child.lineno, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)] if child.level > 1 else base
                    target = ".".join([*base, child.module] if child.module else base)
                else:
                    target = child.module or ""
                out.append(Import(target, child.lineno, lazy))
                # `from pkg import mod` may name a submodule: record pkg.mod too.
                out.extend(Import(f"{target}.{a.name}", child.lineno, lazy) for a in child.names if a.name != "*")
            elif isinstance(child, ast.Call) and _is_dynamic_import(child):
                out.append(Import(child.args[0].value, child.lineno, lazy))  # type: ignore[attr-defined]
            visit(child, inner)

    visit(tree, False)
    return out


def _is_dynamic_import(call: ast.Call) -> bool:
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
    return (
        name in ("import_module", "__import__")
        and bool(call.args)
        and isinstance(call.args[0], ast.Constant)
        and isinstance(call.args[0].value, str)
    )


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def violations(root: Path) -> list[str]:
    """Breaches of the dependency rules among the product packages under `root`.

    Rules: inference/** and sr_writers/** never import dicom_node, sr_writers never imports
    inference (so the order is dicom_node -> inference -> sr_writers); inference/engine imports
    only the standard library, itself and ENGINE_ALLOWED; the product never imports benchmarks,
    except lazily inside BENCH_COMMAND_FILE (the `unimedvl bench` commands).
    """
    found: dict[tuple[str, int, str], str] = {}  # one line per file, line and rule

    def breach(rel: str, imp: Import, rule: str) -> None:
        found.setdefault((rel, imp.line, rule), f"{rel}:{imp.line} imports {imp.target}: {rule}")

    for pkg in PRODUCT:
        for path in sorted((root / pkg).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            module = _module_name(path, root)
            for imp in imports_of(path, module):
                top = _top(imp.target)
                if top == "dicom_node" and pkg in ("inference", "sr_writers"):
                    breach(rel, imp, f"{pkg} must not depend on dicom_node")
                if top == "inference" and pkg == "sr_writers":
                    breach(rel, imp, "sr_writers must not depend on inference")
                if module.startswith("inference.engine") and not (
                    top in ENGINE_ALLOWED or top in sys.stdlib_module_names or imp.target.startswith("inference.engine")
                ):
                    breach(
                        rel, imp, f"inference/engine may import only the standard library and {sorted(ENGINE_ALLOWED)}"
                    )
                if top == "benchmarks" and not (rel == BENCH_COMMAND_FILE and imp.lazy):
                    breach(rel, imp, "the product must not depend on benchmarks (only `unimedvl bench`, lazily)")
    return list(found.values())
