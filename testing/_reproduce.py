"""Python source that rebuilds a failing check: the function, the values it uses, the inputs.

Contract: ``reproducer(call, f, x, framework, **kwargs)`` returns a script that, run on its
own, repeats ``call(f, x, **kwargs)`` on bit-identical inputs.  The function is rebuilt, in
order of preference, from

1. a ``__nonsmooth_source__`` attribute (an expression, e.g. set by ``PLProgram.to_torch``),
2. an import, for a module-level function of an importable module,
3. its own source: ``inspect``'s file and line, then the exact ``lambda``/``def`` node of the
   module's AST (for several lambdas on one line, the one whose span holds the code's
   positions), plus every value it reads from its closure or globals that can be written
   out exactly: arrays (torch, jax, NumPy; bit-exact through ``float.hex`` or base64),
   scalars, strings, containers of those, modules, importable functions, ``functools.partial``.

Whatever cannot be written out is named in a ``# MISSING:`` line (and left undefined, so the
script stops with a ``NameError`` on exactly that name) -- never a silent placeholder.
"""
from __future__ import annotations

import ast
import base64
import builtins
import dataclasses
import functools
import importlib
import inspect
import linecache
import sys
import textwrap
import types

import numpy as np

_HEX_LIMIT = 64  # arrays up to this many elements are written as float.hex literals, larger as base64
_SIZE_LIMIT = 1 << 20  # larger arrays are not inlined


@dataclasses.dataclass
class _Script:
    imports: list = dataclasses.field(default_factory=list)
    setup: list = dataclasses.field(default_factory=list)
    missing: list = dataclasses.field(default_factory=list)
    x64: bool = False  # a float64 jax array is involved: run under jax.enable_x64
    building: set = dataclasses.field(default_factory=set)  # functions being rebuilt (recursion guard)

    def need(self, line: str) -> None:
        if line not in self.imports:
            self.imports.append(line)


# ----------------------------------------------------------------------------- values
def _float_src(v: float) -> str:
    v = float(v)
    if v != v:
        return "float('nan')"
    if v in (float("inf"), float("-inf")):
        return "float('inf')" if v > 0 else "-float('inf')"
    return f"float.fromhex({v.hex()!r})"


def _nested(values: np.ndarray) -> str:
    if values.ndim == 0:
        v = values.item()
        if isinstance(v, bool):
            return repr(v)
        if isinstance(v, int):
            return repr(v)
        if isinstance(v, complex):
            return f"complex({_float_src(v.real)}, {_float_src(v.imag)})"
        return _float_src(v)
    return "[" + ", ".join(_nested(v) for v in values) + "]"


def _numpy_src(a: np.ndarray, script: _Script) -> str | None:
    """A NumPy expression holding exactly ``a`` (None if it is too large or of an odd dtype)."""
    if a.dtype.kind not in "biufc" or a.size > _SIZE_LIMIT:
        return None
    script.need("import numpy as np")
    if a.size <= _HEX_LIMIT:
        return f"np.array({_nested(a)}, dtype=np.{a.dtype.name})"
    script.need("import base64")
    data = base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")
    return (f"np.frombuffer(base64.b64decode({data!r}), dtype={a.dtype.str!r}).reshape({tuple(a.shape)!r})"
            ".copy()")


def array_source(a, framework: str, script: _Script) -> str | None:
    """Source of a torch tensor / jax array / NumPy array with the same bits, dtype and shape."""
    module = type(a).__module__
    if module.startswith("torch"):
        import torch

        dt = str(a.dtype).replace("torch.", "")
        t = a.detach().cpu()
        wide = torch.float64 if t.is_floating_point() else (torch.complex128 if t.is_complex() else None)
        values = (t.to(wide) if wide is not None else t).numpy()  # exact: every float widens losslessly
        body = _numpy_src(values, script)
        if body is None:
            return None
        script.need("import torch")
        device = "" if a.device.type == "cpu" else f", device={str(a.device)!r}"
        return f"torch.as_tensor({body}, dtype=torch.{dt}{device})"
    if module.startswith("jax") or module.startswith("jaxlib"):
        dt = str(a.dtype)
        wide = np.float64 if np.issubdtype(a.dtype, np.floating) else None
        values = np.asarray(a, dtype=wide) if wide is not None else np.asarray(a)
        body = _numpy_src(values, script)
        if body is None:
            return None
        script.need("import jax")
        script.need("import jax.numpy as jnp")
        if dt in ("float64", "complex128", "int64", "uint64"):
            script.x64 = True
        return f"jnp.asarray({body}, dtype=jnp.{dt})"
    if isinstance(a, (np.ndarray, np.generic)):
        arr = np.asarray(a)
        body = _numpy_src(arr, script)
        if body is None:
            return None
        return body if isinstance(a, np.ndarray) else f"np.{arr.dtype.name}({body})"
    return None


def _importable(obj) -> tuple[str, str] | None:
    """(module, qualname) under which ``obj`` can be imported back, if any."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        return None
    try:
        target = importlib.import_module(module) if module in sys.modules else None
    except Exception:  # noqa: BLE001 - only probing
        target = None
    if target is None:
        return None
    for part in qualname.split("."):
        target = getattr(target, part, None)
    return (module, qualname) if target is obj else None


def value_source(value, name: str, script: _Script, depth: int = 0) -> str | None:
    """An expression rebuilding ``value`` exactly, adding imports to ``script``; None if impossible."""
    if depth > 8:
        return None
    if value is None or isinstance(value, (bool, int, str, bytes)):
        return repr(value)
    if isinstance(value, float):  # repr round-trips floats exactly
        return repr(value) if value == value and abs(value) != float("inf") else _float_src(value)
    if isinstance(value, complex):
        return f"complex({_float_src(value.real)}, {_float_src(value.imag)})"
    src = getattr(value, "__nonsmooth_source__", None)
    if isinstance(src, str):
        script.need("import nonsmooth.testing")
        return src
    source_method = getattr(value, "source", None)
    if type(value).__name__ == "PLProgram" and callable(source_method):
        script.need("import nonsmooth.testing")
        return source_method()
    arr = array_source(value, "", script) if _is_array(value) else None
    if arr is not None:
        return arr
    if _is_array(value):
        return None
    if isinstance(value, (tuple, list)):
        parts = [value_source(v, name, script, depth + 1) for v in value]
        if any(p is None for p in parts):
            return None
        if isinstance(value, tuple):
            return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"
        return "[" + ", ".join(parts) + "]"
    if isinstance(value, dict):
        items = [(value_source(k, name, script, depth + 1), value_source(v, name, script, depth + 1))
                 for k, v in value.items()]
        if any(k is None or v is None for k, v in items):
            return None
        return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
    if isinstance(value, types.ModuleType):
        script.need(f"import {value.__name__}")
        return value.__name__
    if isinstance(value, functools.partial):
        fn = value_source(value.func, name, script, depth + 1)
        args = [value_source(a, name, script, depth + 1) for a in value.args]
        kws = {k: value_source(v, name, script, depth + 1) for k, v in value.keywords.items()}
        if fn is None or any(a is None for a in args) or any(v is None for v in kws.values()):
            return None
        script.need("import functools")
        inner = ", ".join([fn, *args, *(f"{k}={v}" for k, v in kws.items())])
        return f"functools.partial({inner})"
    where = _importable(value)
    if where is not None:
        module, qualname = where
        top = qualname.split(".")[0]
        script.need(f"from {module} import {top}")
        return qualname
    return None


def _is_array(value) -> bool:
    module = type(value).__module__
    return (isinstance(value, (np.ndarray, np.generic)) or module.startswith("torch") and type(value).__name__
            in ("Tensor", "Parameter") or (module.startswith("jax") or module.startswith("jaxlib"))
            and hasattr(value, "dtype") and hasattr(value, "shape"))


def _describe(value) -> str:
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    shape = getattr(value, "shape", None)
    if shape is not None:
        kind += f" of shape {tuple(shape)}"
        size = int(np.prod(shape)) if len(tuple(shape)) else 1
        if size > _SIZE_LIMIT:
            kind += f" ({size} elements, over the {_SIZE_LIMIT} this writes inline)"
    return kind


# ----------------------------------------------------------------------------- functions
def _code_names(code) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _span(code):
    """(first line, first col, last line, last col) of the code's instructions (3.11+), else None."""
    positions = getattr(code, "co_positions", None)
    if positions is None:
        return None
    # zero-width positions (RESUME and friends sit at column 0) say nothing about the span
    pts = [p for p in positions() if None not in p and (p[0], p[2]) != (p[1], p[3])]
    if not pts:
        return None
    start = min((p[0], p[2]) for p in pts)
    end = max((p[1], p[3]) for p in pts)
    return start + end


def _find_node(tree, f):
    """The ``Lambda`` or ``FunctionDef`` node that compiled to ``f``'s code."""
    code = f.__code__
    line = code.co_firstlineno
    if f.__name__ == "<lambda>":
        nodes = [n for n in ast.walk(tree) if isinstance(n, ast.Lambda) and n.lineno == line]
        if len(nodes) > 1:
            span = _span(code)
            if span is not None:
                inside = [n for n in nodes
                          if (n.lineno, n.col_offset) <= (span[0], span[1])
                          and (span[2], span[3]) <= (n.end_lineno, n.end_col_offset)]
                # nested lambdas: the innermost node that holds the whole body
                inside.sort(key=lambda n: (n.end_lineno - n.lineno, n.end_col_offset - n.col_offset))
                nodes = inside[:1]
            else:  # 3.10: keep the candidates whose arguments match
                args = code.co_varnames[:code.co_argcount]
                nodes = [n for n in nodes if tuple(a.arg for a in n.args.args) == args]
        return nodes[0] if len(nodes) == 1 else None
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == f.__name__:
            first = min([n.lineno] + [d.lineno for d in n.decorator_list])
            if line in (n.lineno, first):
                return n
    return None


def _own_source(f, script: _Script, name: str) -> list | None:
    """Lines defining ``name`` as ``f`` from its source, or None (with the reason in ``script.missing``)."""
    try:
        filename = inspect.getsourcefile(f) or inspect.getfile(f)
    except TypeError:
        filename = None
    lines = linecache.getlines(filename) if filename else []
    if not lines:
        script.missing.append(f"the source of {name} ({f!r}): it was defined without a source file "
                              "(interactive session or exec); define it here")
        return None
    text = "".join(lines)
    try:
        tree = ast.parse(text)
    except SyntaxError:
        script.missing.append(f"the source of {name}: {filename} does not parse; define it here")
        return None
    node = _find_node(tree, f)
    if node is None:
        script.missing.append(f"the source of {name}: no unique lambda/def at {filename}:{f.__code__.co_firstlineno}; "
                              "define it here")
        return None
    segment = textwrap.dedent(ast.get_source_segment(text, node, padded=True) or "")
    if isinstance(node, ast.Lambda):
        lines = ["    " + ln for ln in segment.strip().splitlines()]
        body = [f"{name} = (  # from {filename}:{node.lineno}", *lines, ")"]
    else:
        for dec in node.decorator_list:
            script.missing.append(f"decorator @{ast.unparse(dec)} of {f.__name__} (dropped: only the bare function "
                                  "is rebuilt)")
        body = [f"# from {filename}:{node.lineno}"] + segment.rstrip().splitlines()
        if f.__name__ != name:
            body.append(f"{name} = {f.__name__}")
    return body


def function_source(f, script: _Script, name: str = "f") -> str:
    """Add to ``script`` what rebuilds ``f``; returns the expression naming it."""
    src = getattr(f, "__nonsmooth_source__", None)
    if isinstance(src, str):
        script.need("import nonsmooth.testing")
        return src
    if not isinstance(f, types.FunctionType):
        expr = value_source(f, name, script)
        if expr is not None:
            return expr
        script.missing.append(f"{name}: {_describe(f)} cannot be written out; define {name} here")
        return name
    where = _importable(f)
    if where is not None:
        module, qualname = where
        script.need(f"from {module} import {qualname.split('.')[0]}")
        return qualname
    if id(f) in script.building:  # a recursive helper: its own definition covers the reference
        return name
    script.building.add(id(f))
    body = _own_source(f, script, name)
    if body is None:
        return name
    # values it reads: closure cells, then globals (builtins need nothing)
    defined = set()
    if f.__closure__:
        for var, cell in zip(f.__code__.co_freevars, f.__closure__):
            try:
                value = cell.cell_contents
            except ValueError:
                script.missing.append(f"{var!r}: the closure cell of {name} is empty")
                continue
            _define(var, value, script, defined)
    globs = f.__globals__
    for var in sorted(_code_names(f.__code__)):
        if var in defined or var not in globs or var in f.__code__.co_freevars:
            continue
        if var in vars(builtins) and globs[var] is getattr(builtins, var):
            continue
        _define(var, globs[var], script, defined)
    script.setup.extend(body)
    return name


def _define(var, value, script, defined):
    if isinstance(value, types.ModuleType):
        line = f"import {value.__name__}" if var == value.__name__ else f"import {value.__name__} as {var}"
        if value.__name__.split(".")[0] == var and "." in value.__name__:
            line = f"import {value.__name__}"
        script.need(line)
        defined.add(var)
        return
    if isinstance(value, types.FunctionType) and _importable(value) is None and not hasattr(
            value, "__nonsmooth_source__"):
        inner = function_source(value, script, var)  # a helper defined next to f: rebuild it too
        defined.add(var)
        if inner != var:
            script.setup.append(f"{var} = {inner}")
        return
    expr = value_source(value, var, script)
    if expr is None:
        script.missing.append(f"{var!r} ({_describe(value)}) cannot be written out; define {var} here")
        return
    defined.add(var)
    if expr != var:
        script.setup.append(f"{var} = {expr}")


def _dtype_name(a) -> str:
    return str(a.dtype).replace("torch.", "")


def reproducer(call: str, f, x, framework: str, **kwargs) -> str:
    """Python that re-runs ``call(f, x, **kwargs)`` with ``f`` rebuilt and ``x`` exactly as it was."""
    script = _Script()
    if framework == "torch":
        script.need("import torch")
    else:
        script.need("import numpy as np")
        script.need("import jax")
        script.need("import jax.numpy as jnp")
    script.need(f"from nonsmooth.testing import {call}")
    name = "f"
    code = getattr(f, "__code__", None)
    if code is not None:  # f may itself use a value called f (a captured function): do not shadow it
        used = set(code.co_freevars) | _code_names(code)
        while name in used or name == call:
            name += "_"
    fexpr = function_source(f, script, name)
    leaves = list(x) if isinstance(x, (tuple, list)) else [x]
    xs = [array_source(a, framework, script) for a in leaves]
    x_line = ("x = (" + ", ".join(xs) + ",)") if isinstance(x, (tuple, list)) else f"x = {xs[0]}"
    args = ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()) if v is not None)
    lines = ["# --- nonsmooth reproducer: copy into a file and run ---", *script.imports]
    for item in script.missing:
        lines.append(f"# MISSING: {item}")
    body = [*script.setup, x_line, f"{call}({fexpr}, x{', ' + args if args else ''})"]
    if framework == "jax" and script.x64:
        lines.append("with jax.enable_x64(True):  # float64 jax values")
        lines += ["    " + ln if ln else ln for ln in body]
    else:
        lines += body
    dts = sorted({_dtype_name(a) for a in leaves})
    shapes = ", ".join(str(tuple(getattr(a, "shape", ()))) for a in leaves)
    lines.append(f"# framework: {framework}, dtype: {', '.join(dts)}, shape: {shapes}")
    return "\n".join(lines)
