"""The rule table cannot drift: one certificate per primitive of the engine's registry.

For each rule we rebuild the primitive from our own table of mathematical definitions
(:mod:`._primitive_table`), derive with SymPy what the registry states, and compare:

* elementwise (unary, jump, non-Lipschitz): the nonsmooth points, one-sided slopes
  (limits of the derivative), one-sided values, continuity, Lipschitz continuity and the
  Clarke interval at every kink, at the default parameters and at other admissible ones;
  whether every piece is affine; how the engine must treat it (``impl``);
* binary and selection primitives on a small-n instance: that every output is a copy
  of an input chosen by the declared ordering on each ordering cone, and at every tie the
  essentially active pieces, continuity and the Clarke set (e.g. max(x, y) at x = y:
  conv{(1, 0), (0, 1)});
* the 2-norm at 0: the unit sphere of limiting gradients, so the unit ball.

A rule without a definition in our table gets a failing certificate: adding a primitive
to the registry without a proof makes the test suite fail.
"""
from __future__ import annotations

import itertools

import sympy as sp

from . import _primitive_table as table
from ._certificate import Derivation, expr_text
from ._piecewise1d import branch_at, breakpoints, local
from ._proof import Proof

x = table.x


# ------------------------------------------------------------------ registry access

def load_registry():
    """The engine's ``RULES`` dict (imported here so the proofs package stays light)."""
    from nonsmooth.conservative._rules import RULES

    return RULES


def _requires_holds(cond: str, params: dict) -> bool:
    """``"NAME is not None"``, or a SymPy condition on the params such as ``"Ne(value, threshold)"``."""
    if not cond:
        return True
    name, sep, rest = cond.partition(" is not None")
    if sep and not rest.strip():
        return params.get(name.strip()) is not None
    verdict = _declared(cond, params)
    if verdict not in (sp.true, sp.false):
        raise ValueError(f"the 'requires' condition {cond!r} does not decide at params {params}")
    return verdict == sp.true


def _exact(value):
    if value is None:
        return None
    if isinstance(value, bool):
        return sp.Integer(int(value))
    if isinstance(value, float):
        return sp.Rational(repr(value))
    return sp.sympify(value)


def _declared(text: str, params: dict, extra=None):
    """Parse a registry string with the params (and the lattice integer) bound."""
    local_names = {k: v for k, v in params.items() if v is not None}
    local_names.update(extra or {})
    return sp.sympify(text, locals=local_names)


def _same_number(a, b) -> bool:
    a, b = sp.sympify(a), sp.sympify(b)
    if a is sp.nan or b is sp.nan:
        return a is sp.nan and b is sp.nan
    return sp.simplify(a - b) == 0 if a.is_finite and b.is_finite else a == b


def _fmt(v) -> str:
    return expr_text(v) if not isinstance(v, str) else v


# ------------------------------------------------------------------ elementwise maps

def _side(f, c, defn, points, d_left_outside):
    loc = local(f, x, c, points=points)
    nan = sp.nan
    if d_left_outside:
        return dict(slope_left=nan, slope_right=loc.slope_right, value_left=nan, value=loc.value,
                    value_right=loc.value_right, right_branch=loc.right_branch, left_branch=None)
    return dict(slope_left=loc.slope_left, slope_right=loc.slope_right, value_left=loc.value_left,
                value=loc.value, value_right=loc.value_right, right_branch=loc.right_branch,
                left_branch=loc.left_branch)


def _analyse_point(f, c, defn, points):
    """Derived local facts of f at c: slopes, values, continuity, Lipschitz, Clarke, kink?"""
    outside = defn.domain != sp.S.Reals and not defn.domain.contains(c - sp.Rational(1, 10**6))
    s = _side(f, c, defn, points, outside)
    sides = [v for v in (s["value_left"], s["value_right"]) if v is not sp.nan]
    continuous = all(_same_number(v, s["value"]) for v in sides)
    slopes = [v for v in (s["slope_left"], s["slope_right"]) if v is not sp.nan]
    lipschitz = continuous and all(v.is_finite for v in slopes)
    clarke = (sp.Min(*slopes), sp.Max(*slopes)) if lipschitz and not outside else (sp.nan, sp.nan)
    smooth_here = (lipschitz and not outside and _same_number(s["slope_left"], s["slope_right"]))
    return {**s, "continuous": continuous, "lipschitz": lipschitz, "clarke": clarke,
            "kink": not smooth_here}


def _param_sets(rule, defn):
    defaults = {k: _exact(v) for k, v in rule.params.items()}
    sets = [defaults] if defn.check_defaults else []
    for sample in defn.samples:
        sets.append({**defaults, **{k: _exact(v) for k, v in sample.items()}})
    return sets


def _check_unary(d: Derivation, rule, defn) -> None:
    d.require(rule.arity == 1, f"arity {rule.arity} is 1 for an elementwise map")
    param_sets = _param_sets(rule, defn)
    if not param_sets:
        d.fail(f"no parameter values to check {rule.name!r} at")
        return
    if defn.note:
        d.step(defn.note)
    any_jump = any_nonlip = False
    all_affine = True
    for params in param_sets:
        shown = {k: v for k, v in params.items() if v is not None}
        tag = f"params {shown}" if shown else "no params"
        f = defn.build(**params)
        d.expr(f"definition[{tag}]", f)
        points = breakpoints(f, x)
        candidates = set(points)
        if defn.domain != sp.S.Reals:
            candidates.add(defn.domain.inf)
        # Declared kinks at these params.
        declared = []
        for k in rule.kinks:
            if not _requires_holds(k.requires, params):
                continue
            lattices = {"integers": list(defn.lattice), "nonzero_integers": [n for n in defn.lattice if n != 0]}
            if k.lattice and k.lattice not in lattices:
                d.fail(f"{rule.name}: unsupported lattice {k.lattice!r} (known: {sorted(lattices)})")
                continue
            ns = [None] if not k.lattice else lattices[k.lattice]
            if k.lattice and not ns:
                d.fail(f"{rule.name}: the kink repeats on the integers but our table checks no lattice points")
            for n in ns:
                extra = {"n": sp.Integer(n)} if n is not None else {}
                declared.append((_declared(k.at, params, extra), k, extra))
        at_points = [a for a, _, _ in declared]
        if defn.lattice:
            lo, hi = min(at_points, default=0), max(at_points, default=0)
            window = [c for c in candidates if lo <= c <= hi]
        else:
            window = list(candidates)
        derived = {c: _analyse_point(f, c, defn, points) for c in sorted(window, key=float)}
        genuine = sorted((c for c, a in derived.items() if a["kink"]), key=float)
        d.step(f"{tag}: f = {expr_text(f)}; candidate points {[_fmt(c) for c in sorted(window, key=float)]}, "
               f"nonsmooth at {[_fmt(c) for c in genuine]}; the registry declares kinks at "
               f"{[_fmt(a) for a in at_points]}")
        undeclared = [c for c in genuine if not any(_same_number(c, a) for a in at_points)]
        d.require(not undeclared, f"{tag}: every nonsmooth point of the definition is a declared kink",
                  failure=f"{rule.name} ({tag}): the definition is nonsmooth at {[_fmt(c) for c in undeclared]} "
                          f"but the registry declares no kink there")
        for at, k, extra in declared:
            match = [c for c in derived if _same_number(c, at)]
            if not match:
                d.fail(f"{rule.name} ({tag}): the registry declares a kink at {_fmt(at)}, where the definition "
                       f"has no breakpoint")
                continue
            a = derived[match[0]]
            where = f"{tag}, kink at {_fmt(at)}"
            facts = {
                "left slope": (_declared(k.left, params, extra), a["slope_left"]),
                "right slope": (_declared(k.right, params, extra), a["slope_right"]),
                "Clarke lower end": (_declared(k.clarke[0], params, extra), a["clarke"][0]),
                "Clarke upper end": (_declared(k.clarke[1], params, extra), a["clarke"][1]),
                "continuous": (bool(k.continuous), a["continuous"]),
                "Lipschitz": (bool(k.lipschitz), a["lipschitz"]),
            }
            if k.left_value:
                facts["left value"] = (_declared(k.left_value, params, extra), a["value_left"])
            if k.right_value:
                facts["right value"] = (_declared(k.right_value, params, extra), a["value_right"])
            wrong = [f"{name}: registry {_fmt(reg)}, derived {_fmt(der)}" for name, (reg, der) in facts.items()
                     if (reg != der if isinstance(reg, bool) else not _same_number(reg, der))]
            d.step(f"{where}: derived slopes ({_fmt(a['slope_left'])}, {_fmt(a['slope_right'])}), values "
                   f"({_fmt(a['value_left'])}, {_fmt(a['value'])}, {_fmt(a['value_right'])}), continuous "
                   f"{a['continuous']}, Lipschitz {a['lipschitz']}, Clarke [{_fmt(a['clarke'][0])}, "
                   f"{_fmt(a['clarke'][1])}]")
            d.require(not wrong, f"{where}: the registry's slopes, values, flags and Clarke interval match",
                      failure=f"{rule.name} ({where}): " + "; ".join(wrong))
            any_jump |= not a["continuous"]
            any_nonlip |= a["continuous"] and not a["lipschitz"]
        # Affine pieces: every branch between consecutive candidates has zero second derivative.
        edges = sorted(candidates, key=float)
        probes = ([edges[0] - 1] + [(p + q) / 2 for p, q in zip(edges, edges[1:])] + [edges[-1] + 1]
                  if edges else [sp.Integer(0)])
        for probe in probes:
            if defn.domain != sp.S.Reals and not defn.domain.contains(probe):
                continue
            branch = branch_at(f, x, probe)
            if branch.has(x) and sp.simplify(sp.diff(branch, x, 2)) != 0:
                all_affine = False
    d.require(bool(rule.piecewise_affine) == all_affine,
              f"piecewise_affine = {rule.piecewise_affine} (derived: every piece affine is {all_affine})",
              failure=f"{rule.name}: registry piecewise_affine={rule.piecewise_affine}, but every piece of the "
                      f"definition is affine: {all_affine}")
    expected_impl = "jump" if any_jump else ("nonlipschitz" if any_nonlip else "unary")
    d.require(rule.impl == expected_impl, f"impl {rule.impl!r} fits the derived kinks",
              failure=f"{rule.name}: registry impl={rule.impl!r}, but the derived kinks call for "
                      f"{expected_impl!r}")


# ------------------------------------------------------------------ binary / selections

def _resolve(outs, xs, point):
    subs = dict(zip(xs, point))
    return [sp.simplify(branch_at_multi(o, subs)) for o in outs]


def branch_at_multi(expr, subs):
    """``expr`` with each Piecewise replaced by its branch active at the point ``subs``."""
    def pick(*args):
        for e, cond in args:
            c = cond if cond in (sp.true, sp.false) else cond.subs(subs)
            if c not in (sp.true, sp.false):
                c = sp.simplify(c)
            if c == sp.true:
                return e
            if c != sp.false:
                raise ValueError(f"cannot decide {cond} at {subs}")
        raise ValueError(f"no active branch at {subs}")

    return expr.replace(sp.Piecewise, lambda *args: pick(*args))


def _jacobian(branch, xs):
    return tuple(tuple(sp.diff(b, v) for v in xs) for b in branch)


def _check_vector(d: Derivation, rule, defn) -> None:
    xs = sp.symbols(f"x0:{defn.n}", real=True)
    outs = defn.build(list(xs))
    for i, o in enumerate(outs):
        d.expr(f"output{i}", o)
    d.step(f"instance: {defn.instance}; outputs {[expr_text(o) for o in outs]}")
    expected_arity = defn.n if rule.impl in ("pick", "compare", "mask") else 1
    d.require(rule.arity == expected_arity, f"arity {rule.arity} (expected {expected_arity} for impl {rule.impl!r})")
    d.require(not rule.kinks, "no scalar kinks are declared: the kinks are the ties")
    masks = (0, 1) if defn.kind == "mask" else (None,)
    free = xs[1:] if defn.kind == "mask" else xs
    m = len(free)
    # 1. On every ordering cone each output is a copy of the input the ordering selects.
    bad = []
    cone_branch = {}   # (mask, ranks) -> the branch active on that open ordering cone
    for c in masks:
        for perm in itertools.permutations(range(m)):
            vals = [0] * m
            for rank, i in enumerate(perm):
                vals[i] = sp.Integer(rank)
            point = ([sp.Integer(c)] if c is not None else []) + vals
            branch = _resolve(outs, xs, point)
            cone_branch[(c, tuple(vals))] = branch
            want = defn.semantics(point)
            at = [b.subs(dict(zip(xs, point))) for b in branch]
            if [sp.simplify(a - w) for a, w in zip(at, want)] != [0] * len(want):
                bad.append(f"at {point}: definition {at}, ordering semantics {want}")
            if defn.kind == "values" and not all(b in xs for b in branch):
                bad.append(f"at {point}: an output is not a copy of an input ({branch})")
            if defn.kind in ("index", "bool") and any(b.free_symbols for b in branch):
                bad.append(f"at {point}: an index/boolean output varies with the input ({branch})")
    d.require(not bad, f"on each of the {len(cone_branch)} ordering "
                       f"cones the definition selects exactly what the ordering {rule.selection or defn.kind!r} does",
              failure=f"{rule.name}: " + "; ".join(bad[:4]))
    if defn.kind == "mask":
        jac = {c: _jacobian(_resolve(outs, xs, [c, 0, 1]), free) for c in masks}
        d.step(f"where: for c = 0 the Jacobian in (a, b) is {jac[0]}, for c = 1 it is {jac[1]}; constant "
               f"in (a, b), so smooth given the condition")
        d.require(all(_resolve(outs, xs, [c, 0, 1]) == _resolve(outs, xs, [c, 1, 0]) for c in masks),
                  "given the condition, the output is the same affine map on both orderings of (a, b)")
        d.require(rule.impl == "mask", f"impl {rule.impl!r} is 'mask'")
        return
    # 2. At every tie: essentially active pieces, continuity, the Clarke set.
    delta = sp.Rational(1, 2 * m)
    discontinuous_somewhere = False
    first = None
    for tie in table.tie_points(m):
        jacs, values = set(), set()
        for perm in itertools.permutations(range(m)):
            nudged = [sp.Integer(t) for t in tie]
            for rank, i in enumerate(perm):
                nudged[i] += delta * rank
            ranks = tuple(sorted(nudged).index(v) for v in nudged)  # nudged entries are distinct
            branch = cone_branch[(None, ranks)]
            jacs.add(_jacobian(branch, xs))
            values.add(tuple(b.subs(dict(zip(xs, tie))) for b in branch))
        own = tuple(_resolve(outs, xs, [sp.Integer(t) for t in tie]))
        own_value = tuple(b.subs(dict(zip(xs, tie))) for b in own)
        continuous = values == {own_value}
        discontinuous_somewhere |= not continuous
        if defn.kind == "values" and continuous:
            # The tie-choice semantics: any tied input may be the copy, so the Jacobians are those of
            # the orderings that break the tie; the hull of the adjacent pieces' Jacobians must be that.
            choice = set()
            for perm in itertools.permutations(range(m)):
                nudged = [sp.Integer(t) for t in tie]
                for rank, i in enumerate(perm):
                    nudged[i] += delta * rank
                want = defn.semantics(nudged)
                choice.add(tuple(tuple(sp.Integer(1) if nudged[j] == w else sp.Integer(0) for j in range(m))
                                 for w in want))
            if jacs != choice:
                d.fail(f"{rule.name}: at the tie {tie} the adjacent pieces have Jacobians {sorted(jacs)}, the "
                       f"tie-breaking choices give {sorted(choice)}")
        if first is None and len(set(tie)) == 1:
            first = (tie, jacs, continuous)
    tie, jacs, continuous = first
    d.step(f"at the full tie {tie}: essentially active pieces have Jacobians {sorted(jacs)}; continuous "
           f"{continuous}; Clarke set = conv{sorted(jacs)}" if continuous else
           f"at the full tie {tie}: the output jumps between {sorted(jacs)}-pieces (no Clarke set: discontinuous)")
    d.require(len(jacs) >= 2 or defn.kind in ("index", "bool"),
              f"ties are genuine kinks: {len(jacs)} distinct pieces meet at {tie}")
    if defn.kind == "values":
        d.require(not discontinuous_somewhere, "continuous at every tie (a Lipschitz selection of copies)")
        d.require(bool(rule.piecewise_affine), "piecewise_affine is True (every piece is a coordinate copy)")
        d.require(rule.impl in ("pick", "select"), f"impl {rule.impl!r} is a selection ('pick' or 'select')")
    elif defn.kind == "bool":
        d.require(discontinuous_somewhere and rule.family == "jump" and rule.impl == "compare",
                  f"a comparison jumps at ties: family {rule.family!r}, impl {rule.impl!r}")
    else:  # index
        d.require(discontinuous_somewhere and rule.impl == "select",
                  "the index output is piecewise constant (zero derivative) and jumps at ties: impl 'select'")
        gathered = [sp.Piecewise(*[(xs[i], sp.Eq(outs[0], i)) for i in range(m)])]
        ref = table.VECTOR["max" if rule.selection == "max" else "min"].build(list(xs))
        pts = [[sp.Integer(v) for v in p] for p in itertools.product(range(3), repeat=m)]
        d.require(all(_resolve(gathered, xs, p)[0].subs(dict(zip(xs, p))) == _resolve(ref, xs, p)[0].subs(
            dict(zip(xs, p))) for p in pts),
            f"gathering x at the index gives the {rule.selection} value at all {len(pts)} points of {{0,1,2}}^{m}")


# ------------------------------------------------------------------ norm

def _check_norm(d: Derivation, rule) -> None:
    order = _exact(rule.params.get("ord"))
    d.require(order == 2, f"the default ord is 2 (got {order}); the unit-ball claim is for the 2-norm")
    (k,) = rule.kinks
    declared = {name: _declared(getattr(k, name), {}) for name in ("at", "left", "right")}
    lo, hi = (_declared(v, {}) for v in k.clarke)
    for n in table.NORM_DIMS:
        xs = sp.symbols(f"x0:{n}", real=True, nonzero=True)
        f = table.norm2(xs)
        grad = [sp.diff(f, v) for v in xs]
        d.expr(f"norm_{n}d", f)
        d.equal(sp.sqrt(sum(g ** 2 for g in grad)), 1, f"n = {n}: |grad ||x||| = 1 wherever x != 0")
        t = sp.Symbol("t", positive=True)
        dirs = [tuple(sp.Integer(int(i == j)) for j in range(n)) for i in range(n)]
        dirs.append(tuple(sp.Integer(1) / sp.sqrt(n) for _ in range(n)))
        ok = True
        for u in dirs:
            g_lim = [sp.limit(gi.subs(dict(zip(xs, [t * ui for ui in u]))), t, 0, "+") for gi in grad]
            right = sp.limit(sp.diff(f.subs(dict(zip(xs, [t * ui for ui in u]))), t), t, 0, "+")
            left = sp.limit(sp.diff(f.subs(dict(zip(xs, [-t * ui for ui in u]))), t), t, 0, "+")
            ok &= all(sp.simplify(a - b) == 0 for a, b in zip(g_lim, u))
            ok &= _same_number(right, declared["right"]) and _same_number(-left, declared["left"])
            # the support of the unit ball along u is [-1, 1]: the declared Clarke interval
            ok &= _same_number(lo, -1) and _same_number(hi, 1)
        d.require(ok, f"n = {n}: along every tested unit direction u the limiting gradient is u (so the "
                      f"B-subdifferential at 0 is the unit sphere and the Clarke set the unit ball), the one-sided "
                      f"slopes are ({declared['left']}, {declared['right']}) and the ball's support is "
                      f"[{lo}, {hi}]")
    d.require(_same_number(declared["at"], 0) and k.continuous and k.lipschitz and rule.impl == "norm",
              "the kink is at 0, continuous and Lipschitz (|grad| = 1), impl 'norm'")
    d.require(not rule.piecewise_affine, "piecewise_affine is False (the 2-norm is not piecewise affine)")


# ------------------------------------------------------------------ proofs

def check_rule(d: Derivation, rule) -> None:
    """Derive and compare one registry rule against our definition (see the module doc)."""
    name = rule.name
    if name in table.UNARY:
        _check_unary(d, rule, table.UNARY[name])
    elif name in table.VECTOR:
        _check_vector(d, rule, table.VECTOR[name])
    elif name == "norm":
        _check_norm(d, rule)
    else:
        d.fail(f"no proof for primitive {name!r}: add its mathematical definition to "
               f"proofs/_primitive_table.py (UNARY or VECTOR) so its registry entry can be checked")


def rule_proof(rule) -> Proof:
    """The certificate-producing proof for one registry ``Rule`` (any object with its fields)."""
    return Proof(
        name=f"rule:{rule.name}",
        statement=(f"The registry entry for {rule.name!r} ({rule.description}) agrees with the primitive's "
                   f"mathematical definition: kinks, one-sided slopes and values, continuity, Lipschitz "
                   f"continuity and Clarke sets."),
        latex=rf"\partial^C\,\mathrm{{{rule.name.replace('_', '-')}}}\ \text{{at each kink}} = "
              r"\mathrm{conv}\{f'(c^-), f'(c^+)\}\ \text{(as declared)}",
        assumptions=("the definition in nonsmooth.proofs._primitive_table is the primitive's mathematical "
                     "definition", "parameters: the registry's defaults and the table's other admissible values"),
        run=lambda d, rule=rule: check_rule(d, rule),
    )


def _registry_missing(exc: Exception) -> Proof:
    def run(d: Derivation) -> None:
        d.fail(f"the engine's rule registry could not be imported ({type(exc).__name__}: {exc}); "
               "nonsmooth.conservative._rules must define RULES")

    return Proof(name="rule:registry", statement="The engine's rule registry is importable.",
                 latex=r"\mathtt{RULES}\neq\emptyset", assumptions=(), run=run)


def proofs() -> tuple[Proof, ...]:
    """One proof per rule currently in the registry (rebuilt on every call)."""
    try:
        rules = load_registry()
    except Exception as exc:  # an engine that fails to import must fail the catalog, not crash it
        return (_registry_missing(exc),)
    return tuple(rule_proof(rule) for rule in rules.values())
