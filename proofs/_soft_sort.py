"""Soft sort and soft rank (Blondel et al., ICML 2020) for n = 2 and 3, from the KKT conditions.

The permutahedron of w (sorted descending w_1 >= ... >= w_n) is, by Rado's theorem,
{mu : sum_{i in S} mu_i <= w_1 + ... + w_|S| for every S, with equality for S = [n]}.
Its faces are the chains S_1 < S_2 < ... < S_m = [n] (ordered partitions into blocks
B_k = S_k - S_{k-1}).  For each chain we solve the KKT system of the projection with the
chain's constraints active, symbolically:

* L2, argmin_{mu in P(w)} |mu - z|^2 / 2: mu = z - sum_k lambda_k 1_{S_k};
* KL, log argmin_{mu in P(e^w)} KL(mu | e^z): mu_i = e^{z_i} T_k for i in B_k, where
  T_k = exp(-(lambda_k + ... + lambda_m)).

The closed form of a piece holds on the region where its multipliers are >= 0 and the
other subset constraints hold: KKT is sufficient for these convex problems, so at a
rational point the piece whose conditions hold strictly *is* the projection there, and
its derivative is the Jacobian.  The solver is then compared with that piece: its values
and its backward pass (torch autograd; jax when torch is absent).

Conventions (those of ``nonsmooth.solvers``, after Blondel et al.): rho = (n, ..., 1);
ascending soft rank = P(theta/eps, rho), descending = P(-theta/eps, rho); descending soft
sort = P(rho/eps, theta), ascending = -P(rho/eps, -theta); P is the Euclidean projection
(L2) or log of the KL projection onto P(e^w) (KL). KL soft rank is the paper's
exp(P(theta/eps, log rho)) = argmin_{mu in P(rho)} KL(mu | e^{theta/eps}): the pieces are
solved for symbolic w and evaluated at w = log rho, and the rank is their exponential.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools

import sympy as sp

from ._certificate import Derivation, expr_text, is_zero
from ._proof import Proof


def ordered_partitions(n: int):
    """All ordered partitions of range(n) into nonempty blocks."""
    items = list(range(n))
    out = []

    def rec(rest, acc):
        if not rest:
            out.append(tuple(acc))
            return
        for size in range(1, len(rest) + 1):
            for block in itertools.combinations(rest, size):
                rec([i for i in rest if i not in block], acc + [block])

    rec(items, [])
    return out


@dataclasses.dataclass(frozen=True)
class Piece:
    """One face of the permutahedron: its blocks, the closed-form output, the multipliers,
    and the slacks of every subset constraint (>= 0 means feasible)."""

    blocks: tuple
    output: tuple       # the solver's output in these coordinates (mu for L2, log mu for KL)
    multipliers: tuple  # lambda_1 .. lambda_{m-1} (the last, for the equality, is free)
    slacks: tuple       # ((subset, slack), ...) for the constraints not in the chain


@functools.lru_cache(maxsize=None)
def generic_pieces(n: int, kind: str):
    """The pieces for symbolic z = (z0, ...), w = (w0, ...) (w sorted descending), solved once."""
    z = sp.symbols(f"z0:{n}", real=True)
    w = sp.symbols(f"w0:{n}", real=True)
    return z, w, pieces(z, w, kind)


def pieces_at(zs, ws, kind: str):
    """The pieces for concrete expressions zs, ws, by substitution into the generic ones."""
    z, w, generic = generic_pieces(len(zs), kind)
    sub = {**dict(zip(z, zs)), **dict(zip(w, ws))}
    return [Piece(p.blocks, tuple(e.subs(sub) for e in p.output), tuple(e.subs(sub) for e in p.multipliers),
                  tuple((S, e.subs(sub)) for S, e in p.slacks)) for p in generic]


def pieces(z, w, kind: str):
    """Every chain's KKT solution for projecting z onto P(w) (w sorted descending)."""
    n = len(z)
    cap = (lambda k: sum(w[:k])) if kind == "l2" else (lambda k: sum(sp.exp(v) for v in w[:k]))
    out = []
    for blocks in ordered_partitions(n):
        chain = [set(itertools.chain.from_iterable(blocks[:k + 1])) for k in range(len(blocks))]
        m = len(blocks)
        if kind == "l2":
            lam = sp.symbols(f"lam0:{m}")
            mu = [z[i] - sum(lam[k] for k in range(m) if i in chain[k]) for i in range(n)]
            eqs = [sum(mu[i] for i in chain[k]) - cap(len(chain[k])) for k in range(m)]
            sol = sp.solve(eqs, lam, dict=True)
            if len(sol) != 1:
                continue
            mu = [sp.simplify(v.subs(sol[0])) for v in mu]
            lams = tuple(sp.simplify(sol[0][lam[k]]) for k in range(m - 1))
            primal, output = mu, tuple(mu)
        else:
            T = sp.symbols(f"T0:{m}", positive=True)
            block_of = {i: k for k, b in enumerate(blocks) for i in b}
            mu = [sp.exp(z[i]) * T[block_of[i]] for i in range(n)]
            eqs = [sum(mu[i] for i in chain[k]) - cap(len(chain[k])) for k in range(m)]
            sol = sp.solve(eqs, T, dict=True)
            if len(sol) != 1:
                continue
            Ts = [sp.simplify(sol[0][t]) for t in T]
            mu = [sp.exp(z[i]) * Ts[block_of[i]] for i in range(n)]
            # lambda_k = log T_{k+1} - log T_k: the multiplier of the chain's k-th set
            lams = tuple(sp.log(Ts[k + 1]) - sp.log(Ts[k]) for k in range(m - 1))
            primal = mu
            output = tuple(z[i] + sp.log(Ts[block_of[i]]) for i in range(n))
        chain_sets = [frozenset(c) for c in chain]
        slacks = []
        for size in range(1, n):
            for subset in itertools.combinations(range(n), size):
                if frozenset(subset) in chain_sets:
                    continue
                slacks.append((subset, cap(size) - sum(primal[i] for i in subset)))
        out.append(Piece(tuple(blocks), output, lams, tuple(slacks)))
    return out


def _positive(value) -> bool:
    """Sign of a constant: exact for rationals; 60-digit evaluation for exp/log constants,
    where anything within 1e-40 of zero counts as not strictly positive (a boundary point)."""
    value = sp.sympify(value)
    if value.is_Rational:
        return bool(value > 0)
    approx = value.evalf(60)
    return bool(approx > sp.Float("1e-40", 60))


def active_piece(all_pieces, subs):
    """The unique piece whose KKT conditions hold strictly at ``subs`` (None if not unique)."""
    hits = [p for p in all_pieces
            if all(_positive(lam.subs(subs)) for lam in p.multipliers)
            and all(_positive(s.subs(subs)) for _, s in p.slacks)]
    return hits[0] if len(hits) == 1 else None


def _positions(blocks):
    """The sorted positions of w that block k's constraint uses: |S_{k-1}| .. |S_k| - 1."""
    out, start = [], 0
    for b in blocks:
        out.append(range(start, start + len(b)))
        start += len(b)
    return out


def _block_jacobian_l2(blocks, n, wrt_z: bool):
    avg = sp.zeros(n, n)
    for b, pos in zip(blocks, _positions(blocks)):
        for i in b:
            for j in (b if wrt_z else pos):
                avg[i, j] = sp.Rational(1, len(b))
    return sp.eye(n) - avg if wrt_z else avg


def _block_jacobian_kl(blocks, v, wrt_z: bool):
    n = len(v)
    soft = sp.zeros(n, n)
    for b, pos in zip(blocks, _positions(blocks)):
        cols = b if wrt_z else pos
        denom = sum(sp.exp(v[j]) for j in cols)
        for i in b:
            for j in cols:
                soft[i, j] = sp.exp(v[j]) / denom
    return sp.eye(n) - soft if wrt_z else soft


def _structure(d: Derivation, n: int, kind: str) -> None:
    """Each piece's Jacobian is the PAV block formula, and the pieces agree with the block values."""
    z, w, all_pieces = generic_pieces(n, kind)
    d.step(f"{kind.upper()}, n = {n}: {len(all_pieces)} faces (ordered partitions) solved in closed form")
    ok = True
    for p in all_pieces:
        out = sp.Matrix(p.output)
        jz, jw = out.jacobian(z), out.jacobian(w)
        if kind == "l2":
            want_z, want_w = _block_jacobian_l2(p.blocks, n, True), _block_jacobian_l2(p.blocks, n, False)
        else:
            want_z, want_w = _block_jacobian_kl(p.blocks, z, True), _block_jacobian_kl(p.blocks, w, False)
        ok &= all(is_zero(e) for e in (jz - want_z)) and all(is_zero(e) for e in (jw - want_w))
        if n == 2:
            d.expr(f"{kind}_n2_piece{[list(b) for b in p.blocks]}", sp.Matrix(p.output).T)
    d.require(ok, f"{kind.upper()}, n = {n}: on every face the Jacobian is block diagonal: d out/dz = I - "
                  + ("1 1^T/|B|" if kind == "l2" else "1 softmax(z_B)^T") + " and d out/dw = "
                  + ("1 1^T/|B|" if kind == "l2" else "1 softmax(w_B)^T") + " per block (the PAV formulas)")


# Test points (theta, eps), chosen so that every block structure is reached for n = 2 and 3
# (a block of soft rank merges values closer than eps; one of soft sort merges gaps wider than 1/eps).
_R = sp.Rational
_POINTS = {
    "rank": {
        2: [((0, _R(1, 4)), 1), ((3, 0), 1), ((0, 2), _R(1, 2)), ((_R(1, 3), 0), 2), ((5, -1), _R(1, 3))],
        3: [((0, _R(1, 5), _R(2, 5)), 1), ((0, 4, 8), 1), ((0, _R(1, 4), 5), 1), ((0, 5, _R(21, 4)), 1),
            ((2, -1, _R(1, 2)), _R(1, 2)), ((1, 3, -2), 3), ((_R(-7, 2), 6, _R(3, 2)), _R(5, 4))],
    },
    "sort": {
        2: [((0, _R(1, 4)), 1), ((3, 0), 1), ((0, _R(7, 3)), _R(1, 2)), ((_R(1, 3), 0), 2), ((5, -1), _R(1, 3))],
        3: [((0, _R(1, 5), _R(2, 5)), 1), ((0, 4, 8), 1), ((3, _R(1, 2), _R(2, 5)), 1),
            ((-3, _R(-1, 2), _R(-2, 5)), 1), ((_R(2, 5), 0, -2), 1), ((_R(-2, 5), 0, 2), 1),
            ((1, 3, -2), 3), ((_R(3, 2), 0, _R(-1, 4)), 1), ((_R(-3, 2), 0, _R(1, 4)), 1)],
    },
}


def _exact_case(op, kind, direction, theta_vals, eps):
    """Symbolic output and Jacobian of the operator at theta (exact), and its block structure."""
    n = len(theta_vals)
    theta = sp.symbols(f"theta0:{n}", real=True)
    point = dict(zip(theta, theta_vals))
    rho = [sp.Integer(n - i) for i in range(n)]
    if op == "rank":
        sign = 1 if direction == "ascending" else -1
        z = [sign * t / eps for t in theta]
        z_at = [v.subs(point) for v in z]
        order = sorted(range(n), key=lambda i: -z_at[i])   # rank coordinates sorted by z, descending
        zs = [z[i] for i in order]
        # KL: the target is P(rho) = P(e^w) at w = log rho, and the rank is exp(log mu)
        cand = pieces_at(zs, rho if kind == "l2" else [sp.log(r) for r in rho], kind)
        piece = active_piece(cand, point)
        if piece is None:
            return None
        out_sorted = piece.output if kind == "l2" else [sp.exp(v) for v in piece.output]
        out = [None] * n
        for pos, i in enumerate(order):
            out[i] = out_sorted[pos]
    else:
        flip = 1 if direction == "descending" else -1      # ascending sort = -sort_desc(-theta)
        wv = [flip * t for t in theta]
        w_at = [v.subs(point) for v in wv]
        order = sorted(range(n), key=lambda i: -w_at[i])
        ws = [wv[i] for i in order]
        zs = [r / eps for r in rho]
        cand = pieces_at(zs, ws, kind)
        piece = active_piece(cand, point)
        if piece is None:
            return None
        out = [flip * v for v in piece.output]
    out = sp.Matrix(out)
    jac = out.jacobian(theta)
    return (out.subs(point), jac.subs(point), tuple(len(b) for b in piece.blocks))


def _solver_side(op, kind, direction, theta_vals, eps):
    """The solver's output and Jacobian (through its backward pass) as float64 arrays."""
    import numpy as np

    from nonsmooth import solvers

    fn = solvers.soft_rank if op == "rank" else solvers.soft_sort
    kw = dict(regularization=kind, regularization_strength=float(eps), direction=direction)
    vals = np.array([float(v) for v in theta_vals], dtype=np.float64)
    out = fn(vals, **kw)
    jac, how = None, "not checked: neither torch nor jax is installed"
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        t = torch.tensor(vals, dtype=torch.float64, requires_grad=True)
        y = fn(t, **kw)
        rows = []
        for i in range(len(vals)):
            g, = torch.autograd.grad(y[i], t, retain_graph=True)
            rows.append(g.detach().numpy())
        jac, how = np.stack(rows), "torch autograd (one backward pass per output)"
    else:
        try:
            import jax
            import jax.numpy as jnp
        except ImportError:
            jax = None
        if jax is not None:
            with jax.experimental.enable_x64():
                jac = np.asarray(jax.jacrev(lambda v: fn(v, **kw))(jnp.asarray(vals)))
            how = "jax.jacrev"
    return np.asarray(out, dtype=np.float64), jac, how


def _run_case(d: Derivation, op: str, kind: str, direction: str) -> None:
    import numpy as np

    for n in (2, 3):
        if direction == "ascending":  # the descending variants reuse the same faces
            _structure(d, n, kind)
        seen = set()
        worst_val = worst_jac = 0.0
        how = ""
        for theta_vals, eps in _POINTS[op][n]:
            exact = _exact_case(op, kind, direction, theta_vals, eps)
            if exact is None:
                d.fail(f"{op}/{kind}/{direction}: no unique face satisfies KKT strictly at theta = {theta_vals}, "
                       f"eps = {eps}")
                continue
            value, jac, structure = exact
            seen.add(structure)
            v_ref = np.array([float(sp.N(v, 30)) for v in value])
            j_ref = np.array([[float(sp.N(e, 30)) for e in row] for row in jac.tolist()])
            try:
                out, jac_solver, how = _solver_side(op, kind, direction, theta_vals, eps)
            except ImportError as exc:
                d.fail(f"the solver nonsmooth.solvers.soft_{op} is not available ({exc})")
                return
            worst_val = max(worst_val, float(np.max(np.abs(out - v_ref))))
            if jac_solver is not None:
                worst_jac = max(worst_jac, float(np.max(np.abs(jac_solver - j_ref))))
            if n == 2 and theta_vals == _POINTS[op][2][0][0]:
                d.expr(f"{op}_{kind}_{direction}_value_at_{list(theta_vals)}", sp.Matrix(value).T)
                d.expr(f"{op}_{kind}_{direction}_jacobian_at_{list(theta_vals)}", jac)
        d.step(f"n = {n}: {len(_POINTS[op][n])} rational points; block structures (sizes, sorted order) reached: "
               f"{sorted(seen)}; max |solver - exact| = {worst_val:.2e} (values), {worst_jac:.2e} (Jacobian, "
               f"{how})")
        needed = {s for s in _structures(n)}
        d.require(needed <= seen, f"n = {n}: the test points reach every block structure {sorted(needed)}",
                  failure=f"{op}/{kind}/{direction} n = {n}: block structures {sorted(needed - seen)} not reached "
                          f"by the test points")
        d.require(worst_val <= 1e-9, f"n = {n}: the solver's values match the closed form (within 1e-9)",
                  failure=f"{op}/{kind}/{direction} n = {n}: solver values differ from the closed form by "
                          f"{worst_val:.3e}")
        d.require(worst_jac <= 1e-9, f"n = {n}: the solver's backward pass matches the closed-form Jacobian "
                                     f"(within 1e-9)",
                  failure=f"{op}/{kind}/{direction} n = {n}: solver Jacobian differs from the closed form by "
                          f"{worst_jac:.3e}")


def _structures(n):
    """Block-size tuples of the compositions of n (contiguous blocks in sorted order)."""
    out = set()
    for cuts in itertools.product((0, 1), repeat=n - 1):
        sizes, run = [], 1
        for c in cuts:
            if c:
                sizes.append(run)
                run = 1
            else:
                run += 1
        sizes.append(run)
        out.add(tuple(sizes))
    return out


def _make(op, kind, direction):
    name = f"soft_{op}_{kind}" + ("" if direction == "ascending" else "_descending")
    what = "rank" if op == "rank" else "sort"
    form = {("rank", "l2"): "the Euclidean projection of theta/eps onto the permutahedron P(rho)",
            ("rank", "kl"): "the KL projection of exp(theta/eps) onto P(rho), i.e. "
                            "exp(P(theta/eps, log rho)) with P the log-domain KL projection",
            ("sort", "l2"): "the Euclidean projection of rho/eps onto P(theta)",
            ("sort", "kl"): "log of the KL projection of exp(rho/eps) onto P(exp(theta))"}[(op, kind)]
    return Proof(
        name=name,
        statement=(f"For n = 2 and 3, {direction} soft {what} ({kind.upper()}) is {form}"
                   + (" (descending sort; ascending is -sort_desc(-theta))" if op == "sort" else "")
                   + ": on each face of the permutahedron its closed form from the KKT conditions has the PAV "
                   "block Jacobian, and nonsmooth.solvers agrees with it in value and backward pass at rational "
                   "points of every block structure."),
        latex=(r"P(z,w)=\arg\min_{\mu\in\mathcal{P}(w)}\tfrac12\|\mu-z\|^2,\quad "
               r"\partial P/\partial z=I-\mathrm{blockdiag}(\tfrac1{|B|}\mathbf{1}\mathbf{1}^\top)"
               if kind == "l2" else
               r"P(z,w)=\log\arg\min_{\mu\in\mathcal{P}(e^w)}\mathrm{KL}(\mu\,\|\,e^z),\quad "
               r"\partial P/\partial z=I-\mathrm{blockdiag}(\mathbf{1}\,\mathrm{softmax}(z_B)^\top)"
               + (r",\quad r=e^{P(\theta/\varepsilon,\log\rho)}\in\mathcal{P}(\rho)" if op == "rank"
                  else "")),
        assumptions=("rho = (n, ..., 1); eps > 0", "Rado's inequality description of the permutahedron",
                     "test points are generic (no multiplier or slack exactly zero)"),
        run=lambda d: _run_case(d, op, kind, direction),
    )


PROOFS = tuple(_make(op, kind, direction) for op, kind, direction in (
    ("rank", "l2", "ascending"), ("rank", "kl", "ascending"), ("sort", "l2", "ascending"),
    ("sort", "kl", "ascending"), ("rank", "l2", "descending"), ("rank", "kl", "descending"),
    ("sort", "kl", "descending")))
