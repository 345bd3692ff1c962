"""Random piecewise-linear programs with points exactly on their kinks, and an independent oracle.

A program is plain data (dyadic weights, activations) that can be *rendered* into a torch
function and a jax function computing the same math.  Points sit on kinks by construction:
all weights, biases and inputs are small dyadic rationals, so every intermediate value is
exact in float64, and biases are chosen so that chosen pre-activations are exactly 0 (relu,
abs) or exactly tied (max, min) at ``x``.

The oracle for the B-subdifferential shares no code with the engine or with either
framework's autodiff: Jacobians are propagated by hand in NumPy at points ``x + t d`` for many
random directions ``d`` (general position with probability one) and deduplicated.  For a
piecewise-linear program this finds, with high probability, the Jacobian of every
essentially active piece, i.e. the B-subdifferential; its convex hull is the Clarke Jacobian.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

ACTS = ("relu", "abs", "max", "min", "id")
RELU_STYLES = ("relu", "clamp", "maximum", "where")


@dataclasses.dataclass(frozen=True)
class Layer:
    """z = W h + b, then the activation; ``max``/``min`` act on pairs (z[0], z[1]), (z[2], z[3]), ..."""

    W: np.ndarray
    b: np.ndarray
    act: str
    relu_style: str = "relu"

    @property
    def n_out(self) -> int:
        return self.W.shape[0] // 2 if self.act in ("max", "min") else self.W.shape[0]


@dataclasses.dataclass(frozen=True)
class PLProgram:
    layers: tuple
    n_in: int

    @property
    def n_out(self) -> int:
        return self.layers[-1].n_out

    def __repr__(self) -> str:
        parts = [f"PLProgram(n_in={self.n_in}"]
        for L in self.layers:
            parts.append(f"  {L.act}[{L.relu_style if L.act == 'relu' else ''}] W={L.W.tolist()} b={L.b.tolist()}")
        return "\n".join(parts) + ")"

    # ------------------------------------------------------------------ NumPy reference

    def preactivations(self, x: np.ndarray) -> list[np.ndarray]:
        """The pre-activation vector z of every layer at x (float64, exact for dyadic x)."""
        h = np.asarray(x, dtype=np.float64)
        out = []
        for L in self.layers:
            z = L.W @ h + L.b
            out.append(z)
            h = _act_np(L.act, z)
        return out

    def __call__(self, x: np.ndarray) -> np.ndarray:
        h = np.asarray(x, dtype=np.float64)
        for L in self.layers:
            h = _act_np(L.act, L.W @ h + L.b)
        return h

    def kink_residuals(self, x: np.ndarray) -> list[np.ndarray]:
        """Per layer, the quantity whose zero is a kink: z (relu/abs) or z[0::2]-z[1::2] (max/min)."""
        res = []
        for L, z in zip(self.layers, self.preactivations(x)):
            if L.act in ("relu", "abs"):
                res.append(z)
            elif L.act in ("max", "min"):
                res.append(z[0::2] - z[1::2])
            else:
                res.append(np.zeros(0))
        return res

    def n_active_kinks(self, x: np.ndarray) -> int:
        return int(sum(np.sum(r == 0.0) for r in self.kink_residuals(x)))

    def jacobians_np(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Jacobians (N, out, in) at the rows of X, by hand; plus a mask of rows in general position."""
        X = np.atleast_2d(np.asarray(X, dtype=np.float64))
        N = X.shape[0]
        H = X
        J = np.broadcast_to(np.eye(self.n_in), (N, self.n_in, self.n_in)).copy()
        generic = np.ones(N, dtype=bool)
        for L in self.layers:
            Z = H @ L.W.T + L.b
            JZ = np.einsum("oi,nij->noj", L.W, J)
            # A tie only matters where the two sides' Jacobian rows differ; a pre-activation that
            # is exactly 0 with a zero Jacobian row is constant 0 on the whole open piece.
            moving = np.any(JZ != 0.0, axis=2)
            if L.act == "relu":
                generic &= ~np.any((Z == 0.0) & moving, axis=1)
                H = np.maximum(Z, 0.0)
                J = JZ * (Z > 0)[:, :, None]
            elif L.act == "abs":
                generic &= ~np.any((Z == 0.0) & moving, axis=1)
                H = np.abs(Z)
                J = JZ * np.sign(Z)[:, :, None]
            elif L.act in ("max", "min"):
                a, c = Z[:, 0::2], Z[:, 1::2]
                differ = np.any(JZ[:, 0::2] != JZ[:, 1::2], axis=2)
                generic &= ~np.any((a == c) & differ, axis=1)
                pick_a = (a > c) if L.act == "max" else (a < c)
                H = np.where(pick_a, a, c)
                J = np.where(pick_a[:, :, None], JZ[:, 0::2], JZ[:, 1::2])
            else:
                H, J = Z, JZ
        return J, generic

    # ------------------------------------------------------------------ rendering

    def render_torch(self):
        """A torch function of a 1-D tensor computing this program (in the tensor's dtype)."""
        import torch

        params = [(torch.as_tensor(L.W), torch.as_tensor(L.b), L.act, L.relu_style) for L in self.layers]

        def f(x):
            h = x
            for W, b, act, style in params:
                z = W.to(h.dtype) @ h + b.to(h.dtype)
                if act == "relu":
                    if style == "relu":
                        h = torch.relu(z)
                    elif style == "clamp":
                        h = torch.clamp(z, min=0)
                    elif style == "maximum":
                        h = torch.maximum(z, torch.zeros_like(z))
                    else:
                        h = torch.where(z >= 0, z, torch.zeros_like(z))
                elif act == "abs":
                    h = torch.abs(z)
                elif act == "max":
                    h = torch.maximum(z[0::2], z[1::2])
                elif act == "min":
                    h = torch.minimum(z[0::2], z[1::2])
                else:
                    h = z
            return h

        return f

    def render_jax(self):
        """A jax function of a 1-D array computing this program (in the array's dtype)."""
        import jax
        import jax.numpy as jnp

        params = [(np.asarray(L.W), np.asarray(L.b), L.act, L.relu_style) for L in self.layers]

        def f(x):
            h = x
            for W, b, act, style in params:
                z = jnp.asarray(W, dtype=h.dtype) @ h + jnp.asarray(b, dtype=h.dtype)
                if act == "relu":
                    if style == "relu":
                        h = jax.nn.relu(z)
                    elif style == "clamp":
                        h = jnp.clip(z, 0)
                    elif style == "maximum":
                        h = jnp.maximum(z, 0)
                    else:
                        h = jnp.where(z >= 0, z, 0)
                elif act == "abs":
                    h = jnp.abs(z)
                elif act == "max":
                    h = jnp.maximum(z[0::2], z[1::2])
                elif act == "min":
                    h = jnp.minimum(z[0::2], z[1::2])
                else:
                    h = z
            return h

        return f


def _act_np(act: str, z: np.ndarray) -> np.ndarray:
    if act == "relu":
        return np.maximum(z, 0.0)
    if act == "abs":
        return np.abs(z)
    if act == "max":
        return np.maximum(z[0::2], z[1::2])
    if act == "min":
        return np.minimum(z[0::2], z[1::2])
    return z


# ---------------------------------------------------------------------- construction


def _dyadic(rng: np.random.Generator, shape, lo: int, hi: int, denom: int) -> np.ndarray:
    return rng.integers(lo, hi + 1, size=shape).astype(np.float64) / denom


def random_program(rng: np.random.Generator, *, n_in: int, widths: Sequence[int], acts: Sequence[str],
                   n_out: int = 1, kink_fraction: float = 0.5, mirror: bool = False,
                   relu_styles: Sequence[str] = ("relu",)) -> tuple[PLProgram, np.ndarray]:
    """A random program and a point x where chosen units sit exactly on their kinks.

    ``widths[i]`` is the number of outputs of hidden layer ``i`` (after pairing for max/min);
    ``acts[i]`` its activation.  A final linear layer maps to ``n_out``.  ``kink_fraction`` of
    each layer's units is put exactly on its kink at x.  ``mirror`` makes relu/abs layers
    compute (z, -z) pairs, the shape of the classic ``relu(z) - relu(-z)`` trap.

    Example:
        >>> prog, x = random_program(np.random.default_rng(0), n_in=2, widths=[2], acts=["relu"],
        ...                          kink_fraction=1.0)
        >>> prog.n_active_kinks(x)
        2
    """
    if len(widths) != len(acts):
        raise ValueError(f"widths and acts must have the same length, got {len(widths)} and {len(acts)}")
    x = _dyadic(rng, n_in, -8, 8, 4)
    h = x
    layers = []
    for width, act in zip(widths, acts):
        if act not in ACTS:
            raise ValueError(f"act must be one of {ACTS}, got {act!r}")
        n_rows = 2 * width if act in ("max", "min") else width
        style = str(rng.choice(list(relu_styles)))
        if mirror and act in ("relu", "abs") and width >= 2:
            half = width // 2
            A = _dyadic(rng, (half, h.size), -2, 2, 2)
            c = _dyadic(rng, half, -4, 4, 4)
            z_half = A @ h + c
            on = rng.uniform(size=half) < kink_fraction
            c = np.where(on, c - z_half, c)
            W = np.concatenate([A, -A, _dyadic(rng, (width - 2 * half, h.size), -2, 2, 2)])
            b = np.concatenate([c, -c, _dyadic(rng, width - 2 * half, -4, 4, 4)])
        else:
            W = _dyadic(rng, (n_rows, h.size), -2, 2, 2)
            b = _dyadic(rng, n_rows, -4, 4, 4)
            z = W @ h + b
            if act in ("relu", "abs"):
                on = rng.uniform(size=n_rows) < kink_fraction
                b = np.where(on, b - z, b)
            elif act in ("max", "min"):
                on = rng.uniform(size=width) < kink_fraction
                b[1::2] = np.where(on, b[1::2] + z[0::2] - z[1::2], b[1::2])
        layer = Layer(W=W, b=b, act=act, relu_style=style)
        layers.append(layer)
        h = _act_np(act, W @ h + b)
    layers.append(Layer(W=_dyadic(rng, (n_out, h.size), -2, 2, 2), b=_dyadic(rng, n_out, -4, 4, 4), act="id"))
    return PLProgram(layers=tuple(layers), n_in=n_in), x


def pl_cases(*, max_in: int = 3, max_depth: int = 2, max_width: int = 4, max_out: int = 2,
             relu_styles: Sequence[str] = ("relu",)):
    """Hypothesis strategy of ``(program, x)`` pairs with at least one kink active at x."""
    from hypothesis import strategies as st

    @st.composite
    def strategy(draw):
        n_in = draw(st.integers(1, max_in))
        depth = draw(st.integers(1, max_depth))
        acts = [draw(st.sampled_from(("relu", "abs", "max", "min", "relu"))) for _ in range(depth)]
        widths = [draw(st.integers(1, max_width)) for _ in range(depth)]
        n_out = draw(st.integers(1, max_out))
        mirror = draw(st.booleans())
        frac = draw(st.sampled_from((0.3, 0.6, 1.0)))
        seed = draw(st.integers(0, 2**32 - 1))
        prog, x = random_program(np.random.default_rng(seed), n_in=n_in, widths=widths, acts=acts, n_out=n_out,
                                 kink_fraction=frac, mirror=mirror, relu_styles=relu_styles)
        from hypothesis import assume

        assume(prog.n_active_kinks(x) >= 1)
        return prog, x

    return strategy()


# ---------------------------------------------------------------------- the independent oracle


@dataclasses.dataclass(frozen=True)
class SampledB:
    """Distinct Jacobians found at x + t d over many random directions d (float64, by hand)."""

    elements: np.ndarray  # (k, out, in)
    counts: tuple
    t: float
    n_directions: int

    def flat(self) -> np.ndarray:
        return self.elements.reshape(self.elements.shape[0], -1)

    def has(self, J: np.ndarray, *, tol: float = 1e-9) -> bool:
        J = np.asarray(J, dtype=np.float64).reshape(-1)
        return bool(np.any(np.max(np.abs(self.flat() - J), axis=1) <= tol))


def _step(prog: PLProgram, x: np.ndarray) -> float:
    """A step t that stays inside the cone structure at x: no inactive kink is crossed."""
    margin = np.inf
    for r in prog.kink_residuals(x):
        nz = np.abs(r[r != 0.0])
        if nz.size:
            margin = min(margin, float(nz.min()))
    lip = 1.0
    for L in prog.layers:
        lip *= max(1.0, 2.0 * float(np.max(np.sum(np.abs(L.W), axis=1))))
    lip *= np.sqrt(prog.n_in)
    if not np.isfinite(margin):
        return 1e-3
    return min(1e-3, 0.01 * margin / lip)


def sampled_b_subdifferential(prog: PLProgram, x: np.ndarray, *, n_directions: int = 2000,
                              seed: int = 0) -> SampledB:
    """B-subdifferential of ``prog`` at ``x`` by dense sampling of Jacobians in general position.

    Each direction is checked at two step sizes (t and t/16): both must give the same
    Jacobian, which holds when x + s d stays in one conic piece for s in (0, t].
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(x, dtype=np.float64)
    t = _step(prog, x)
    D = rng.standard_normal((n_directions, prog.n_in))
    D /= np.linalg.norm(D, axis=1, keepdims=True)
    J1, g1 = prog.jacobians_np(x + t * D)
    J2, g2 = prog.jacobians_np(x + (t / 16) * D)
    ok = g1 & g2
    same = np.all(np.abs(J1 - J2) <= 1e-9 * (1 + np.abs(J1)), axis=(1, 2))
    if np.any(ok & ~same):
        raise AssertionError(f"oracle step t={t} leaves the local cone structure at x={x.tolist()} for {prog!r}")
    J = J1[ok]
    if J.shape[0] == 0:
        raise AssertionError(f"oracle found no point in general position near x={x.tolist()} for {prog!r}")
    # Entries are exact sums of products of dyadics, so rounding-free: exact dedupe is safe.
    flat = np.round(J.reshape(J.shape[0], -1), 12)
    uniq, inverse, counts = np.unique(flat, axis=0, return_inverse=True, return_counts=True)
    first = np.array([np.flatnonzero(inverse.reshape(-1) == i)[0] for i in range(uniq.shape[0])])
    return SampledB(elements=J[first], counts=tuple(int(c) for c in counts), t=t, n_directions=n_directions)


def in_hull(points: np.ndarray, target: np.ndarray, *, tol: float = 1e-7) -> bool:
    """Whether ``target`` is in conv(points) up to ``tol`` (max-abs), by an LP (HiGHS)."""
    from scipy.optimize import linprog

    P = np.asarray(points, dtype=np.float64).reshape(len(points), -1)
    t = np.asarray(target, dtype=np.float64).reshape(-1)
    k, d = P.shape
    c = np.zeros(k + 1)
    c[-1] = 1.0
    A_ub = np.block([[P.T, -np.ones((d, 1))], [-P.T, -np.ones((d, 1))]])
    res = linprog(c, A_ub=A_ub, b_ub=np.concatenate([t, -t]),
                  A_eq=np.concatenate([np.ones(k), [0.0]])[None, :], b_eq=[1.0],
                  bounds=[(0, None)] * (k + 1), method="highs")
    return bool(res.status == 0 and res.x[-1] <= tol)
