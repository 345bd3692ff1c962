"""Hypothesis strategies for the inputs that break gradients.

Generic random floats almost never land on a kink, so property tests drawn from
``st.floats`` never see the points where backprop goes wrong.  These strategies aim
there on purpose: points exactly on kinks and a few ulps away (``np.nextafter``),
exact and near ties, exact-zero pre-activations of a layer, adversarial floats per dtype
(subnormals, signed zeros, huge values, sums that cancel) and random piecewise-linear
programs whose evaluation is exact in floating point, so their kinks are really hit.

Everything returns NumPy arrays (convert with ``torch.from_numpy`` / ``jnp.asarray``);
the piecewise-linear programs render themselves into torch, jax and NumPy callables.
Arguments are checked when the strategy is built, like ``hypothesis.extra.numpy``:
bad ones raise ``hypothesis.errors.InvalidArgument`` quoting the value.
"""
from __future__ import annotations

import dataclasses
import math
import operator
from typing import Sequence

import numpy as np
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

from ._profile import register_hypothesis_profile

register_hypothesis_profile()  # Hypothesis is imported now anyway: make "nonsmooth-ci" loadable

__all__ = [
    "kink_points",
    "tied_arrays",
    "zero_preactivations",
    "adversarial_floats",
    "adversarial_arrays",
    "PLProgram",
    "pl_programs",
    "pl_programs_and_points",
]

_FLOAT_NAMES = ("float16", "float32", "float64")


# ----------------------------------------------------------------------------- validation
def _check_dtype(value, name: str = "dtype") -> np.dtype:
    """A NumPy float dtype from a str, NumPy dtype/type or torch/jax dtype."""
    text = value if isinstance(value, str) else getattr(value, "name", None)
    if text is None:
        text = str(value)
    text = str(text).replace("torch.", "")
    if text not in _FLOAT_NAMES:
        try:
            dt = np.dtype(value)
        except TypeError:
            dt = None
        if dt is None or dt.name not in _FLOAT_NAMES:
            raise InvalidArgument(
                f"{name}={value!r} is not one of the supported float dtypes "
                f"{', '.join(_FLOAT_NAMES)} (bfloat16 has no NumPy dtype; draw float32 and cast)"
            )
        return dt
    return np.dtype(text)


def _check_shape(value, name: str = "shape", *, min_size: int = 0) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        shape = (int(value),)
    elif isinstance(value, (tuple, list)) and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value
    ):
        shape = tuple(int(v) for v in value)
    else:
        raise InvalidArgument(f"{name}={value!r} must be an int or a tuple of ints")
    if any(v < 0 for v in shape):
        raise InvalidArgument(f"{name}={value!r} has a negative dimension")
    size = math.prod(shape)
    if size < min_size:
        raise InvalidArgument(f"{name}={value!r} holds {size} elements; need at least {min_size}")
    if size > 10**6:
        raise InvalidArgument(
            f"{name}={value!r} holds {size} elements; Hypothesis examples over 10**6 elements "
            "make shrinking useless, draw a smaller shape"
        )
    return shape


def _check_int(value, name: str, *, lo: int, hi: int | None = None) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise InvalidArgument(f"{name}={value!r} must be an int")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InvalidArgument(f"{name}={value!r} must be {bound}")
    return int(value)


def _check_fraction(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise InvalidArgument(f"{name}={value!r} must be a float in [0, 1]")
    if not (0.0 <= float(value) <= 1.0):
        raise InvalidArgument(f"{name}={value!r} must be in [0, 1]")
    return float(value)


def _check_range(min_value, max_value, dtype: np.dtype) -> tuple[float, float]:
    for name, v in (("min_value", min_value), ("max_value", max_value)):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
            raise InvalidArgument(f"{name}={v!r} must be a finite real number")
        if not math.isfinite(float(v)):
            raise InvalidArgument(f"{name}={v!r} must be finite")
    if float(min_value) > float(max_value):
        raise InvalidArgument(f"min_value={min_value!r} is greater than max_value={max_value!r}")
    big = float(np.finfo(dtype).max)
    if abs(float(min_value)) > big or abs(float(max_value)) > big:
        raise InvalidArgument(
            f"min_value={min_value!r}, max_value={max_value!r} exceed the largest {dtype.name} ({big!r})"
        )
    return float(min_value), float(max_value)


def _check_kinks(kinks, dtype: np.dtype) -> tuple[float, ...]:
    if isinstance(kinks, (int, float, np.floating, np.integer)) and not isinstance(kinks, bool):
        kinks = (kinks,)
    try:
        values = tuple(float(k) for k in kinks)
    except (TypeError, ValueError):
        raise InvalidArgument(f"kinks={kinks!r} must be a number or a sequence of numbers") from None
    if not values:
        raise InvalidArgument(f"kinks={kinks!r} is empty; give at least one kink location")
    for k in values:
        if not math.isfinite(k) or abs(k) > float(np.finfo(dtype).max):
            raise InvalidArgument(f"kinks={kinks!r} holds {k!r}, not a finite {dtype.name}")
        if float(dtype.type(k)) != k:
            raise InvalidArgument(
                f"kinks={kinks!r} holds {k!r}, which {dtype.name} cannot represent exactly "
                f"(nearest is {float(dtype.type(k))!r}); give the kink as the {dtype.name} value"
            )
    return values


# ----------------------------------------------------------------------------- helpers
def _ulp_step(value, steps: int, dtype: np.dtype):
    """``value`` moved ``steps`` representable numbers up (steps > 0) or down (< 0)."""
    v = dtype.type(value)
    target = dtype.type(np.inf if steps > 0 else -np.inf)
    for _ in range(abs(steps)):
        v = np.nextafter(v, target, dtype=dtype)
    return v


def _finite_floats(dtype: np.dtype, lo: float, hi: float) -> st.SearchStrategy:
    width = dtype.itemsize * 8
    return st.floats(min_value=lo, max_value=hi, allow_nan=False, allow_infinity=False,
                     allow_subnormal=False, width=width)


# ----------------------------------------------------------------------------- kinks
def kink_points(kinks=(0.0,), *, shape=(), dtype="float64", max_ulps: int = 4,
                on_kink: float = 0.5, near_kink: float = 0.3, min_on_kink: int = 1,
                min_value: float = -4.0, max_value: float = 4.0) -> st.SearchStrategy:
    """Arrays whose entries sit exactly on a kink, a few ulps from one, or elsewhere.

    Each entry is, with probability about ``on_kink``, exactly one of ``kinks``; with
    about ``near_kink``, a kink moved 1..``max_ulps`` representable numbers either way;
    otherwise a float in ``[min_value, max_value]``.  At least ``min_on_kink`` entries
    are exactly on a kink.

    Example:
        >>> from hypothesis import given
        >>> @given(kink_points(kinks=(0.0, 1.0), shape=(3,), dtype="float32"))
        ... def test(x): assert x.dtype.name == "float32"
    """
    dt = _check_dtype(dtype)
    kinks = _check_kinks(kinks, dt)
    shp = _check_shape(shape, min_size=0)
    size = math.prod(shp)
    max_ulps = _check_int(max_ulps, "max_ulps", lo=0, hi=1 << 20)
    on_kink = _check_fraction(on_kink, "on_kink")
    near_kink = _check_fraction(near_kink, "near_kink")
    if on_kink + near_kink > 1.0:
        raise InvalidArgument(f"on_kink={on_kink!r} + near_kink={near_kink!r} exceeds 1")
    min_on_kink = _check_int(min_on_kink, "min_on_kink", lo=0, hi=size)
    lo, hi = _check_range(min_value, max_value, dt)
    generic = _finite_floats(dt, lo, hi)

    @st.composite
    def draw_points(draw):
        # Category coin flips come from a Hypothesis-managed Random so the requested
        # proportions hold (integers() draws are skewed towards small values).
        coin = draw(st.randoms(use_true_random=False))
        out = np.empty(size, dtype=dt)
        for i in range(size):
            u = coin.random()
            k = draw(st.sampled_from(kinks))
            if u < on_kink:
                out[i] = k
            elif u < on_kink + near_kink and max_ulps > 0:
                steps = draw(st.integers(1, max_ulps)) * draw(st.sampled_from((1, -1)))
                out[i] = _ulp_step(k, steps, dt)
            else:
                out[i] = draw(generic)
        if min_on_kink:
            where = draw(st.lists(st.integers(0, size - 1), min_size=min_on_kink,
                                  max_size=min_on_kink, unique=True))
            for i in where:
                out[i] = draw(st.sampled_from(kinks))
        return out.reshape(shp)

    return draw_points()


def tied_arrays(dtype="float64", shape=(4,), *, axis: int = -1, min_ties: int = 1,
                max_ulps: int = 0, near_tie: float = 0.0, min_value: float = -4.0,
                max_value: float = 4.0) -> st.SearchStrategy:
    """Arrays with exact ties (and optionally near ties) inside every slice along ``axis``.

    Every 1-D slice along ``axis`` gets at least ``min_ties`` entries copied from another
    entry of the same slice; with probability ``near_tie`` a copy is moved
    1..``max_ulps`` representable numbers away instead (a near tie).  Ties are what
    sort, max, topk and median disagree on.

    Example:
        >>> from hypothesis import given
        >>> @given(tied_arrays("float32", (2, 5)))
        ... def test(x): assert any(len(set(row)) < 5 for row in x.tolist())
    """
    dt = _check_dtype(dtype)
    shp = _check_shape(shape, min_size=2)
    if not shp:
        raise InvalidArgument(f"shape={shape!r} is a scalar; ties need an axis of length >= 2")
    ndim = len(shp)
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool) or not -ndim <= axis < ndim:
        raise InvalidArgument(f"axis={axis!r} is out of range for shape={shp!r}")
    length = shp[axis]
    if length < 2:
        raise InvalidArgument(f"shape={shp!r} has length {length} along axis={axis!r}; ties need >= 2")
    min_ties = _check_int(min_ties, "min_ties", lo=0, hi=length - 1)
    max_ulps = _check_int(max_ulps, "max_ulps", lo=0, hi=1 << 20)
    near_tie = _check_fraction(near_tie, "near_tie")
    if near_tie > 0 and max_ulps == 0:
        raise InvalidArgument(f"near_tie={near_tie!r} needs max_ulps >= 1, got max_ulps={max_ulps!r}")
    lo, hi = _check_range(min_value, max_value, dt)
    generic = _finite_floats(dt, lo, hi)

    @st.composite
    def draw_tied(draw):
        coin = draw(st.randoms(use_true_random=False))
        moved = np.moveaxis(np.empty(shp, dtype=dt), axis, -1)
        lanes = moved.reshape(-1, length)
        for lane in lanes:
            for i in range(length):
                lane[i] = draw(generic)
            n_ties = draw(st.integers(min_ties, length - 1))
            targets = draw(st.lists(st.integers(0, length - 1), min_size=n_ties,
                                    max_size=n_ties, unique=True))
            for j in targets:
                src = draw(st.integers(0, length - 1).filter(lambda i, j=j: i != j))
                value = lane[src]
                if coin.random() < near_tie:
                    steps = draw(st.integers(1, max_ulps)) * draw(st.sampled_from((1, -1)))
                    value = _ulp_step(value, steps, dt)
                lane[j] = value
        return np.ascontiguousarray(np.moveaxis(lanes.reshape(moved.shape), -1, axis))

    return draw_tied()


def zero_preactivations(W, b=None, *, units=None, exact: str = "any_order", dtype=None,
                        min_value: float = -2.0, max_value: float = 2.0) -> st.SearchStrategy:
    """``(x, b, units)`` with ``(W @ x + b)[units] == 0`` exactly: the kinks of the next ReLU.

    ``W`` is the layer's (out, in) weight, ``b`` its bias (zeros if None).  ``units`` are
    the output units to zero (drawn, nonempty, if None).  ``exact`` chooses how:

    - ``"any_order"`` (default): ``x = ±2**k · e_j`` for a column ``j`` with
      ``W[units, j]`` all nonzero, and ``b[units] = -W[units, j]·x_j``.  Every product is
      exact and every partial sum is 0 or one product, so the zeros survive any
      summation order, blocking or FMA (torch/jax/BLAS all give exactly 0).
    - ``"numpy"``: ``x`` generic in ``[min_value, max_value]`` and
      ``b[units] = -(W @ x)[units]`` as NumPy computes it in ``dtype``; exact when the
      layer is evaluated as ``W @ x`` then ``+ b`` by NumPy, within a few ulps of 0
      otherwise (other libraries sum in other orders).

    Example:
        >>> import numpy as np
        >>> from hypothesis import given
        >>> W = np.random.default_rng(0).normal(size=(3, 4))
        >>> @given(zero_preactivations(W))
        ... def test(xbu):
        ...     x, b, units = xbu
        ...     assert np.all((W @ x + b)[units] == 0)
    """
    if isinstance(W, (list, tuple)):
        W = np.asarray(W, dtype=float)
    if not isinstance(W, np.ndarray):
        raise InvalidArgument(f"W must be a 2-D NumPy array, got {type(W).__name__}: {W!r}")
    if W.ndim != 2 or W.size == 0:
        raise InvalidArgument(f"W must be a non-empty 2-D array (out, in), got shape {W.shape!r}")
    dt = _check_dtype(W.dtype if dtype is None and W.dtype.kind == "f" else (dtype or "float64"))
    Wd = W.astype(dt)
    if not np.all(np.isfinite(Wd)):
        bad = Wd[~np.isfinite(Wd)][0]
        raise InvalidArgument(f"W holds {bad!r}, not finite in {dt.name}")
    m, n = Wd.shape
    if b is None:
        bd = np.zeros(m, dtype=dt)
    else:
        bd = np.asarray(b).astype(dt)
        if bd.shape != (m,):
            raise InvalidArgument(f"b has shape {np.shape(b)!r}; W has {m} rows so b must be ({m},)")
        if not np.all(np.isfinite(bd)):
            raise InvalidArgument(f"b holds {bd[~np.isfinite(bd)][0]!r}, not finite")
    if exact not in ("any_order", "numpy"):
        raise InvalidArgument(f"exact={exact!r}; choose 'any_order' or 'numpy'")
    if units is not None:
        try:
            units = tuple(sorted({operator.index(u) for u in units}))
        except TypeError:
            raise InvalidArgument(f"units={units!r} must be a sequence of row indices") from None
        if not units or not all(0 <= u < m for u in units):
            raise InvalidArgument(f"units={units!r} must be nonempty row indices in [0, {m})")
    lo, hi = _check_range(min_value, max_value, dt)
    if exact == "any_order":
        cols_ok = [j for j in range(n) if np.all(Wd[list(units), j] != 0)] if units else None
        if units is not None and not cols_ok:
            raise InvalidArgument(
                f"no column of W is nonzero on all of units={units!r}; exact='any_order' needs one "
                "(use exact='numpy' or fewer units)"
            )
        if units is None and not np.any(Wd != 0):
            raise InvalidArgument("W is all zeros: every pre-activation equals b, x cannot change it")
    tiny = float(np.finfo(dt).tiny)
    big = float(np.finfo(dt).max)

    @st.composite
    def draw_zero(draw):
        chosen = units
        if chosen is None:
            if exact == "any_order":
                j = draw(st.sampled_from([j for j in range(n) if np.any(Wd[:, j] != 0)]))
                rows = [i for i in range(m) if Wd[i, j] != 0]
                chosen = tuple(sorted(draw(st.lists(st.sampled_from(rows), min_size=1,
                                                    max_size=len(rows), unique=True))))
            else:
                chosen = tuple(sorted(draw(st.lists(st.integers(0, m - 1), min_size=1,
                                                    max_size=m, unique=True))))
        idx = list(chosen)
        b_out = bd.copy()
        if exact == "any_order":
            if units is not None:
                j = draw(st.sampled_from(cols_ok))
            # 2**k small enough that W·x neither overflows nor goes subnormal.
            wmax = float(np.max(np.abs(Wd[idx, j])))
            wmin = float(np.min(np.abs(Wd[idx, j])))
            kmin = max(-6, math.ceil(math.log2(tiny) - math.log2(wmin)) + 1)
            kmax = min(2, math.floor(math.log2(big) - math.log2(wmax)) - 1)
            k = draw(st.integers(kmin, max(kmin, kmax)))
            x = np.zeros(n, dtype=dt)
            x[j] = dt.type(math.ldexp(draw(st.sampled_from((1.0, -1.0))), k))
            b_out[idx] = -(Wd[idx, j] * x[j])
        else:
            x = np.array([draw(_finite_floats(dt, lo, hi)) for _ in range(n)], dtype=dt)
            # The full product, as the layer computes it: BLAS gives W[idx] @ x and
            # (W @ x)[idx] different roundings.
            b_out[idx] = -(Wd @ x)[idx]
        return x, b_out, chosen

    return draw_zero()


# ----------------------------------------------------------------------------- adversarial floats
def _special_values(dt: np.dtype, *, allow_subnormal: bool, allow_signed_zero: bool,
                    allow_huge: bool, allow_infinity: bool, allow_nan: bool) -> list:
    fi = np.finfo(dt)
    vals = [dt.type(1.0), dt.type(-1.0), dt.type(1.0) + fi.eps, dt.type(1.0) - fi.epsneg,
            fi.tiny, -fi.tiny, fi.eps, dt.type(0.0)]
    if allow_signed_zero:
        vals.append(dt.type(-0.0))
    if allow_subnormal:
        smallest = fi.smallest_subnormal
        vals += [smallest, -smallest, fi.tiny - smallest, dt.type(3) * smallest]
    if allow_huge:
        vals += [fi.max, -fi.max, fi.max / dt.type(2), dt.type(2.0) ** (fi.maxexp // 2)]
    if allow_infinity:
        vals += [dt.type(np.inf), dt.type(-np.inf)]
    if allow_nan:
        vals.append(dt.type(np.nan))
    return [dt.type(v) for v in vals]


def adversarial_floats(dtype="float64", *, allow_subnormal: bool = True,
                       allow_signed_zero: bool = True, allow_huge: bool = True,
                       allow_infinity: bool = False, allow_nan: bool = False,
                       special: float = 0.6) -> st.SearchStrategy:
    """Scalars of ``dtype`` that stress numerics: ±0, subnormals, the normal/subnormal
    boundary, 1±eps, huge values near overflow (and inf/NaN only if allowed).

    With probability about ``special`` a value comes from that list, otherwise from
    ``st.floats`` of the dtype's width (which itself favours edge cases).

    Example:
        >>> from hypothesis import given
        >>> @given(adversarial_floats("float16"))
        ... def test(v): assert v.dtype.name == "float16"
    """
    dt = _check_dtype(dtype)
    for name, flag in (("allow_subnormal", allow_subnormal), ("allow_signed_zero", allow_signed_zero),
                       ("allow_huge", allow_huge), ("allow_infinity", allow_infinity),
                       ("allow_nan", allow_nan)):
        if not isinstance(flag, bool):
            raise InvalidArgument(f"{name}={flag!r} must be a bool")
    special = _check_fraction(special, "special")
    values = _special_values(dt, allow_subnormal=allow_subnormal, allow_signed_zero=allow_signed_zero,
                             allow_huge=allow_huge, allow_infinity=allow_infinity, allow_nan=allow_nan)
    limit = float(np.finfo(dt).max) if allow_huge else 2.0 ** (np.finfo(dt).maxexp // 2)
    plain = st.floats(min_value=-limit, max_value=limit, allow_nan=allow_nan,
                      allow_infinity=allow_infinity and allow_huge,
                      allow_subnormal=allow_subnormal, width=dt.itemsize * 8)

    @st.composite
    def draw_value(draw):
        if draw(st.randoms(use_true_random=False)).random() < special:
            return draw(st.sampled_from(values))
        v = dt.type(draw(plain))
        if not allow_signed_zero and v == 0:
            v = dt.type(0.0)
        return v

    return draw_value()


def adversarial_arrays(dtype="float64", shape=(8,), *, cancelling: bool = True,
                       allow_subnormal: bool = True, allow_signed_zero: bool = True,
                       allow_huge: bool = True) -> st.SearchStrategy:
    """Arrays of :func:`adversarial_floats`; with ``cancelling``, arrays of three or more
    entries also carry a pair ``+H, -H`` large enough that a naive sum loses every
    other entry (the exact sum is the sum of the rest, the float sum often 0).

    Example:
        >>> from hypothesis import given
        >>> @given(adversarial_arrays("float32", (6,)))
        ... def test(x): assert x.shape == (6,)
    """
    dt = _check_dtype(dtype)
    shp = _check_shape(shape)
    if not isinstance(cancelling, bool):
        raise InvalidArgument(f"cancelling={cancelling!r} must be a bool")
    size = math.prod(shp)
    elem = adversarial_floats(dt, allow_subnormal=allow_subnormal, allow_signed_zero=allow_signed_zero,
                              allow_huge=False)
    huge_elem = adversarial_floats(dt, allow_subnormal=allow_subnormal,
                                   allow_signed_zero=allow_signed_zero, allow_huge=True)
    fi = np.finfo(dt)

    @st.composite
    def draw_array(draw):
        src = huge_elem if (allow_huge and not cancelling) else elem
        out = np.array([draw(src) for _ in range(size)], dtype=dt)
        if cancelling and size >= 3:
            i, j = draw(st.lists(st.integers(0, size - 1), min_size=2, max_size=2, unique=True))
            rest = np.delete(out, [i, j]).astype(np.float64)
            scale = max(float(np.max(np.abs(rest))), 1.0)
            # 2**(mantissa bits + 2) times the rest swamps it in any float sum.
            e = min(int(math.ceil(math.log2(scale))) + fi.nmant + 2, fi.maxexp - 3)
            h = dt.type(math.ldexp(1.0, e))
            out[i], out[j] = h, -h
        return out.reshape(shp)

    return draw_array()


# ----------------------------------------------------------------------------- PL programs
_PL_OPS = ("relu", "abs", "max", "min")


@dataclasses.dataclass(frozen=True)
class PLProgram:
    """A random piecewise-linear program: linear maps and kinks, as plain data.

    ``layers`` is a tuple of ``("linear", W, b)`` (W, b tuples of ints) and
    ``("relu",)``, ``("abs",)``, ``("max",)``, ``("min",)``; max/min combine adjacent
    pairs of units (an odd last unit passes through).  Integer weights and half-integer
    points keep every intermediate value exactly representable in float32/float64
    (and in float16 for small programs), so kinks are hit exactly.

    Example:
        >>> p = PLProgram(2, (("linear", ((1, -1),), (0,)), ("abs",)))
        >>> float(p.to_numpy()(np.array([3.0, 1.0]))[0])
        2.0
    """

    n_inputs: int
    layers: tuple

    @property
    def n_outputs(self) -> int:
        width = self.n_inputs
        for layer in self.layers:
            if layer[0] == "linear":
                width = len(layer[1])
            elif layer[0] in ("max", "min"):
                width = (width + 1) // 2
        return width

    def _run(self, x, ops):
        h = x
        for layer in self.layers:
            kind = layer[0]
            if kind == "linear":
                h = ops["linear"](h, layer[1], layer[2])
            elif kind in ("relu", "abs"):
                h = ops[kind](h)
            else:
                width = h.shape[-1]
                pairs = width // 2
                a, c = h[..., 0:2 * pairs:2], h[..., 1:2 * pairs:2]
                out = ops[kind](a, c)
                h = ops["cat"](out, h[..., 2 * pairs:]) if width % 2 else out
        return h

    def kink_arguments(self, x) -> list[np.ndarray]:
        """Per nonsmooth layer, the float64 values whose zeros are its kinks
        (the input of relu/abs, the difference of each max/min pair)."""
        h = np.asarray(x, dtype=np.float64)
        args = []
        for layer in self.layers:
            kind = layer[0]
            if kind == "linear":
                h = np.asarray(layer[1], dtype=np.float64) @ h + np.asarray(layer[2], dtype=np.float64)
            elif kind in ("relu", "abs"):
                args.append(h.copy())
                h = np.maximum(h, 0) if kind == "relu" else np.abs(h)
            else:
                pairs = h.shape[-1] // 2
                a, c = h[0:2 * pairs:2], h[1:2 * pairs:2]
                args.append(a - c)
                out = np.maximum(a, c) if kind == "max" else np.minimum(a, c)
                h = np.concatenate([out, h[2 * pairs:]]) if h.shape[-1] % 2 else out
        return args

    def n_active_kinks(self, x) -> int:
        """How many kinks are active (argument exactly 0) at ``x``."""
        return int(sum(np.count_nonzero(a == 0) for a in self.kink_arguments(x)))

    def to_numpy(self):
        """The program as a NumPy callable on a 1-D array (evaluated in the input's dtype)."""
        def linear(h, W, b):
            return np.asarray(W, dtype=h.dtype) @ h + np.asarray(b, dtype=h.dtype)
        ops = {"linear": linear, "relu": lambda h: np.maximum(h, 0), "abs": np.abs,
               "max": np.maximum, "min": np.minimum, "cat": lambda a, c: np.concatenate([a, c], -1)}
        return self._tagged(lambda x: self._run(np.asarray(x), ops), "to_numpy")

    def to_torch(self):
        """The program as a torch callable (torch.relu, abs, maximum, minimum)."""
        import torch

        def linear(h, W, b):
            return torch.as_tensor(W, dtype=h.dtype) @ h + torch.as_tensor(b, dtype=h.dtype)
        ops = {"linear": linear, "relu": torch.relu, "abs": torch.abs, "max": torch.maximum,
               "min": torch.minimum, "cat": lambda a, c: torch.cat([a, c], -1)}
        return self._tagged(lambda x: self._run(x, ops), "to_torch")

    def to_jax(self):
        """The program as a jax callable (jax.nn.relu, jnp.abs, maximum, minimum)."""
        import jax
        import jax.numpy as jnp

        def linear(h, W, b):
            return jnp.asarray(W, dtype=h.dtype) @ h + jnp.asarray(b, dtype=h.dtype)
        ops = {"linear": linear, "relu": jax.nn.relu, "abs": jnp.abs, "max": jnp.maximum,
               "min": jnp.minimum, "cat": lambda a, c: jnp.concatenate([a, c], -1)}
        return self._tagged(lambda x: self._run(x, ops), "to_jax")

    def to(self, framework: str):
        """``to_torch()``, ``to_jax()`` or ``to_numpy()`` by name."""
        try:
            return {"torch": self.to_torch, "jax": self.to_jax, "numpy": self.to_numpy}[framework]()
        except KeyError:
            raise ValueError(f"framework={framework!r}; choose 'torch', 'jax' or 'numpy'") from None

    def _tagged(self, fn, method):
        fn.__nonsmooth_source__ = f"{self.source()}.{method}()"  # what reproducers print for fn
        return fn

    def source(self) -> str:
        """Python that rebuilds this program (for reproducers)."""
        return f"nonsmooth.testing.PLProgram({self.n_inputs!r}, {self.layers!r})"


def pl_programs(n_inputs: int = 2, *, n_layers=(1, 3), width=(1, 4), ops: Sequence[str] = _PL_OPS,
                n_outputs: int = 1, max_weight: int = 2) -> st.SearchStrategy:
    """Random :class:`PLProgram`: ``n_layers`` blocks of (integer linear map, then one of
    ``ops``), then a final integer linear map to ``n_outputs``.

    Example:
        >>> from hypothesis import given
        >>> @given(pl_programs(3))
        ... def test(p): assert p.n_inputs == 3 and p.n_outputs == 1
    """
    n_inputs = _check_int(n_inputs, "n_inputs", lo=1, hi=64)
    n_outputs = _check_int(n_outputs, "n_outputs", lo=1, hi=64)
    max_weight = _check_int(max_weight, "max_weight", lo=1, hi=16)

    def _pair(value, name, lo, hi):
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            value = (value, value)
        if (not isinstance(value, (tuple, list)) or len(value) != 2
                or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
                or not lo <= value[0] <= value[1] <= hi):
            raise InvalidArgument(f"{name}={value!r} must be an int or (min, max) with {lo} <= min <= max <= {hi}")
        return int(value[0]), int(value[1])

    lay_lo, lay_hi = _pair(n_layers, "n_layers", 0, 8)
    w_lo, w_hi = _pair(width, "width", 1, 16)
    if isinstance(ops, str) or not ops or any(o not in _PL_OPS for o in ops):
        raise InvalidArgument(f"ops={ops!r} must be a nonempty sequence from {_PL_OPS}")
    ops = tuple(ops)
    weight = st.integers(-max_weight, max_weight)

    def matrix(draw, rows, cols):
        # One forced nonzero entry per row keeps every unit connected without rejection.
        W = [[draw(weight) for _ in range(cols)] for _ in range(rows)]
        for row in W:
            j = draw(st.integers(0, cols - 1))
            row[j] = draw(st.sampled_from([1, -1] + [v for v in range(-max_weight, max_weight + 1)
                                                     if abs(v) > 1]))
        return tuple(tuple(r) for r in W)

    @st.composite
    def draw_program(draw):
        layers = []
        cur = n_inputs
        for _ in range(draw(st.integers(lay_lo, lay_hi))):
            op = draw(st.sampled_from(ops))
            lo = max(w_lo, 2) if op in ("max", "min") else w_lo
            out = draw(st.integers(lo, max(w_hi, lo)))
            layers.append(("linear", matrix(draw, out, cur), tuple(draw(weight) for _ in range(out))))
            layers.append((op,))
            cur = out if op in ("relu", "abs") else (out + 1) // 2
        layers.append(("linear", matrix(draw, n_outputs, cur), tuple(draw(weight) for _ in range(n_outputs))))
        return PLProgram(n_inputs, tuple(layers))

    return draw_program()


def pl_programs_and_points(n_inputs: int = 2, *, dtype="float64", on_kink: float = 0.8,
                           radius: int = 2, **program_kwargs) -> st.SearchStrategy:
    """``(program, x)``: a :func:`pl_programs` draw and a half-integer point ``x`` in
    ``[-radius, radius]**n_inputs``; with probability ``on_kink`` the point is moved onto
    the kink of a unit of the first nonsmooth layer (exactly, since all arithmetic on
    these values is exact).

    Example:
        >>> from hypothesis import given
        >>> @given(pl_programs_and_points(2))
        ... def test(px):
        ...     p, x = px
        ...     assert x.shape == (2,)
    """
    dt = _check_dtype(dtype)
    on_kink = _check_fraction(on_kink, "on_kink")
    radius = _check_int(radius, "radius", lo=1, hi=64)
    programs = pl_programs(n_inputs, **{"n_layers": (1, 3), **program_kwargs})

    @st.composite
    def draw_pair(draw):
        prog = draw(programs)
        x = np.array([draw(st.integers(-2 * radius, 2 * radius)) / 2 for _ in range(prog.n_inputs)])
        first = next((i for i, layer in enumerate(prog.layers) if layer[0] != "linear"), None)
        if first is not None and draw(st.randoms(use_true_random=False)).random() < on_kink:
            W = np.asarray(prog.layers[first - 1][1], dtype=np.float64)
            b = np.asarray(prog.layers[first - 1][2], dtype=np.float64)
            if prog.layers[first][0] in ("max", "min"):
                pairs = W.shape[0] // 2
                W = W[0:2 * pairs:2] - W[1:2 * pairs:2]
                b = b[0:2 * pairs:2] - b[1:2 * pairs:2]
            # Units with a ±1 or ±2 coefficient can be zeroed by a half-integer coordinate.
            options = [(u, j) for u in range(W.shape[0]) for j in range(W.shape[1])
                       if abs(W[u, j]) in (1.0, 2.0)]
            if options:
                u, j = draw(st.sampled_from(options))
                rest = W[u] @ x - W[u, j] * x[j] + b[u]
                x[j] = -rest / W[u, j]
                # Half-integers divided by 2 are quarter-integers: still exact.
        return prog, x.astype(dt)

    return draw_pair()
