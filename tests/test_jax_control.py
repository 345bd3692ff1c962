"""jax control flow in audit(): cond/switch, scan/fori_loop, while_loop.

Oracles: closed forms derived by hand (written next to each case), and the same program
spelled without control flow (branches with jnp.where, loops unrolled in Python), which the
engine already decides: same verdict, same B-subdifferential, same exactness.  Loops are
checked both unrolled into the IR and as a loop node (the body held once), by lowering
the unrolling limit.
"""
import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from nonsmooth.conservative import Verdict, audit, clarke_jacobian  # noqa: E402
from nonsmooth.conservative import _jax_control, _loops  # noqa: E402
from nonsmooth.conservative._problem import Problem  # noqa: E402


def as_set(mats, decimals=9):
    return {tuple(np.round(np.asarray(m, dtype=float).ravel(), decimals) + 0.0) for m in mats}


def assert_same_audit(a, b):
    """The control-flow program and its jnp.where/unrolled spelling are decided alike."""
    assert a.verdict is b.verdict, (a.explain(), b.explain())
    assert a.exact == b.exact
    assert as_set(a.b_subdifferential) == as_set(b.b_subdifferential)


@pytest.fixture(params=["unrolled", "loop node"])
def loop_mode(request, monkeypatch):
    if request.param == "loop node":
        monkeypatch.setattr(_jax_control, "MAX_UNROLLED_NODES", 0)
    return request.param


def relu(v):
    return jax.nn.relu(v)


def f64(values):
    """A float64 point (made under scoped x64, as a user with x64 on would).  float32 points
    add the engine's user-dtype 'shadow' kinks, which it reads off the base branch only."""
    with jax.enable_x64(True):
        return jnp.asarray(values, dtype=jnp.float64)


# --------------------------------------------------------------------------- cond / switch


def test_cond_with_continuous_branches_at_the_predicate_boundary():
    # cond(x > 0, x, -x) is |x|: at 0 the Clarke Jacobian is [-1, 1]; jax's cond takes the
    # false branch at 0, so AD returns -1, an element of it
    f = lambda x: lax.cond(x[0] > 0, lambda y: y, lambda y: -y, x)  # noqa: E731
    g = lambda x: jnp.where(x[0] > 0, x, -x)  # noqa: E731
    a = audit(f, jnp.zeros(1))
    assert a.verdict is Verdict.CLARKE and a.exact
    assert as_set(a.b_subdifferential) == {(1.0,), (-1.0,)}
    assert a.ad_jacobian.tolist() == [[-1.0]]
    assert any(k.kind == "compare" for k in a.active_kinks)
    assert_same_audit(a, audit(g, jnp.zeros(1)))


def test_cond_with_jumping_branches_is_not_lipschitz():
    # x + 1 on the right, -x on the left: the limits at 0 are 1 and 0
    f = lambda x: lax.cond(x[0] > 0, lambda y: y + 1.0, lambda y: -y, x)  # noqa: E731
    g = lambda x: jnp.where(x[0] > 0, x + 1.0, -x)  # noqa: E731
    a = audit(f, jnp.zeros(1))
    assert a.verdict is Verdict.NOT_LIPSCHITZ
    assert_same_audit(a, audit(g, jnp.zeros(1)))
    # away from the boundary it is smooth, with the taken branch's derivative
    b = audit(f, jnp.array([0.5]))
    assert b.verdict is Verdict.SMOOTH and np.allclose(b.b_subdifferential, [[[1.0]]])


def test_cond_untaken_branch_nan_does_not_leak():
    # at x = (-1, -2) the true branch is log of negatives (NaN); f = x**2 there, J = diag(2x)
    f = lambda x: lax.cond(x[0] > 0, lambda y: jnp.log(y), lambda y: y ** 2, x)  # noqa: E731
    a = audit(f, jnp.array([-1.0, -2.0]))
    assert a.verdict is Verdict.SMOOTH
    np.testing.assert_allclose(a.b_subdifferential[0], np.diag([-2.0, -4.0]))
    np.testing.assert_allclose(a.ad_jacobian, np.diag([-2.0, -4.0]))


def test_cond_untaken_branch_infinite_at_the_boundary():
    # log x for x > 0, x for x <= 0: log(0+) = -inf, so f is discontinuous at 0
    f = lambda x: lax.cond(x[0] > 0, lambda y: jnp.log(y), lambda y: y, x)  # noqa: E731
    a = audit(f, jnp.zeros(1))
    assert a.verdict is Verdict.NOT_LIPSCHITZ


def test_cond_kink_inside_the_taken_branch():
    # relu(x0 - x1) in the taken branch (x0 > -1), at its kink: Clarke conv{(0,0), (1,-1)}
    f = lambda x: lax.cond(x[0] > -1.0, lambda y: relu(y[0] - y[1]).reshape(1), lambda y: y[:1], x)  # noqa: E731
    a = audit(f, jnp.array([0.5, 0.5]))
    assert a.verdict is Verdict.CLARKE and a.exact
    assert as_set(a.b_subdifferential) == {(0.0, 0.0), (1.0, -1.0)}


def test_switch_on_argmax_continuous_and_jumping():
    x = jnp.array([1.0, 1.0, 0.0])  # argmax ties between elements 0 and 1
    branches = [lambda y: y[0].reshape(1), lambda y: y[1].reshape(1), lambda y: y[2].reshape(1)]
    f = lambda v: lax.switch(jnp.argmax(v), branches, v)  # noqa: E731
    # = max(x): at the tie, Clarke conv{e0, e1}
    a = audit(f, x)
    assert a.verdict is Verdict.CLARKE and a.exact
    assert as_set(a.b_subdifferential) == {(1.0, 0.0, 0.0), (0.0, 1.0, 0.0)}
    assert_same_audit(a, audit(lambda v: v[jnp.argmax(v)].reshape(1), x))
    # branch 1 adds 1: the value jumps with the tie order
    jumping = [branches[0], lambda y: y[1].reshape(1) + 1.0, branches[2]]
    b = audit(lambda v: lax.switch(jnp.argmax(v), jumping, v), x)
    assert b.verdict is Verdict.NOT_LIPSCHITZ


# --------------------------------------------------------------------------- scan / fori_loop


def _relu_diff(h):
    return relu(h) - relu(-h)


def test_fori_loop_of_relu_differences_is_spurious_like_its_unrolled_form(loop_mode):
    # h -> relu(h) - relu(-h) is the identity, so f(x) = x and the Clarke Jacobian is {1};
    # AD at 0 multiplies relu'(0) = 0 terms and returns 0
    f = lambda x: lax.fori_loop(0, 3, lambda i, h: _relu_diff(h), x)  # noqa: E731

    def unrolled(x):
        for _ in range(3):
            x = _relu_diff(x)
        return x

    a = audit(f, jnp.zeros(1))
    assert a.verdict is Verdict.SPURIOUS and a.exact
    assert a.ad_jacobian.tolist() == [[0.0]]
    assert as_set(a.b_subdifferential) == {(1.0,)}
    assert_same_audit(a, audit(unrolled, jnp.zeros(1)))
    if loop_mode == "loop node":
        assert any("iteration 2" in k.location for k in a.active_kinks)


def _scan_relu(x, reverse=False):
    def cell(h, xt):
        h = relu(h + xt)
        return h, 2.0 * h

    return lax.scan(cell, 0.0, x, reverse=reverse)[1]


def test_scan_with_a_relu_cell_at_a_kink(loop_mode):
    # x = (1, -1, 0.5): h1 = 1, h2 = relu(0) (the kink), h3 = relu(h2 + 0.5).
    # Right piece: y = 2 (x0, x0 + x1, x0 + x1 + x2); left piece: y = 2 (x0, 0, x2).
    x = jnp.array([1.0, -1.0, 0.5])
    a = audit(_scan_relu, x)
    right = 2.0 * np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1]])
    left = 2.0 * np.array([[1, 0, 0], [0, 0, 0], [0, 0, 1]])
    assert a.verdict is Verdict.CLARKE and a.exact
    assert as_set(a.b_subdifferential) == as_set([right, left])

    def unrolled(x):
        h, ys = 0.0, []
        for t in range(3):
            h = relu(h + x[t])
            ys.append(2.0 * h)
        return jnp.stack(ys)

    assert_same_audit(a, audit(unrolled, x))


def test_reverse_scan_and_scan_without_xs(loop_mode):
    # reverse: the carry meets x[2], x[1], x[0]; x = (1, -1, 0.5) gives h = relu(0.5),
    # relu(0.5 - 1) = 0, relu(0 + 1): the final carry is x0 (smooth there)
    x = jnp.array([1.0, -1.0, 0.5])
    a = audit(lambda v: lax.scan(lambda h, xt: (relu(h + xt), h), 0.0, v, reverse=True)[0].reshape(1), x)
    assert a.verdict is Verdict.SMOOTH
    np.testing.assert_allclose(a.b_subdifferential[0], [[1.0, 0.0, 0.0]])
    # stacked outputs of a reverse scan sit at their xs index: ys[j] = 2 * relu(h + x[j])
    b = audit(lambda v: _scan_relu(v, reverse=True), jnp.array([0.5, -1.0, 1.0]))
    # h after x2 = 1, after x1: relu(0) (kink); ys = 2 (relu(h1 + x0), relu(x2 + x1), x2)
    right = 2.0 * np.array([[1, 1, 1], [0, 1, 1], [0, 0, 1]])
    left = 2.0 * np.array([[1, 0, 0], [0, 0, 0], [0, 0, 1]])
    assert b.verdict is Verdict.CLARKE and as_set(b.b_subdifferential) == as_set([right, left])
    # length without xs: three abs steps |||x||| at 0 -> Clarke [-1, 1]
    c = audit(lambda v: lax.scan(lambda h, _: (jnp.abs(h), None), v, None, length=3)[0], jnp.zeros(1))
    assert c.verdict is Verdict.CLARKE and c.exact and as_set(c.b_subdifferential) == {(1.0,), (-1.0,)}


def test_cond_inside_a_scan_body(loop_mode):
    # h_{t+1} = cond(h_t + x_t > 0, h_t + x_t, 0) is relu(h + x_t): same pieces as the relu cell
    x = jnp.array([1.0, -1.0, 0.5])

    def f(v):
        def cell(h, xt):
            z = h + xt
            h = lax.cond(z > 0, lambda u: u, lambda u: 0.0 * u, z)
            return h, 2.0 * h
        return lax.scan(cell, 0.0, v)[1]

    a = audit(f, x)
    b = audit(_scan_relu, x)
    assert a.verdict is Verdict.CLARKE
    assert as_set(a.b_subdifferential) == as_set(b.b_subdifferential)


def test_clarke_jacobian_api_through_a_loop_node(monkeypatch):
    monkeypatch.setattr(_jax_control, "MAX_UNROLLED_NODES", 0)
    C = clarke_jacobian(lambda x: lax.fori_loop(0, 4, lambda i, h: jnp.abs(h), x), jnp.zeros(1))
    assert C.exact and as_set(C.vertices) == {(1.0,), (-1.0,)}


# --------------------------------------------------------------------------- while_loop


def _doubling(x):
    return lax.while_loop(lambda c: c[0] < 10.0, lambda c: 2.0 * c, x)


def _doubling_where(x, n_max=8):
    for _ in range(n_max):
        x = jnp.where(x[0] < 10.0, 2.0 * x, x)
    return x


def test_while_loop_with_a_data_dependent_count():
    # x = 3: 3 -> 6 -> 12, two doublings: f = 4x near 3 (smooth)
    a = audit(_doubling, f64([3.0]))
    assert a.verdict is Verdict.SMOOTH and np.allclose(a.b_subdifferential, [[[4.0]]])
    assert a.ad_mode == "forward" and "reverse" in a.notes[0] and "jacfwd" in a.notes[0]
    assert "forward mode" in a.explain()
    assert a.to_json()["ad_mode"] == "forward"
    assert_same_audit(a, audit(_doubling_where, f64([3.0])))
    # x = 5: 5 -> 10 and 10 < 10 is false, at its threshold.  Left of 5 the loop doubles
    # twice (f -> 20), right of it once (f = 10): a jump
    b = audit(_doubling, f64([5.0]))
    assert b.verdict is Verdict.NOT_LIPSCHITZ
    assert any(k.kind == "compare" and "loop predicate" in k.location for k in b.active_kinks)
    assert as_set(b.b_subdifferential) == {(2.0,), (4.0,)}
    assert_same_audit(b, audit(_doubling_where, f64([5.0])))


def test_while_loop_count_boundary_where_f_is_continuous():
    # while h < 1: h = 1.  f(x) = max(x, 1): at x = 1 the count jumps (0 or 1 iteration)
    # but both give 1, so f is continuous with Clarke Jacobian [0, 1]
    f = lambda x: lax.while_loop(lambda h: h[0] < 1.0, lambda h: jnp.ones_like(h), x)  # noqa: E731
    a = audit(f, jnp.ones(1))
    assert a.verdict is Verdict.CLARKE and a.exact
    assert as_set(a.b_subdifferential) == {(0.0,), (1.0,)}
    assert a.ad_jacobian.tolist() == [[1.0]]  # no iteration runs at x = 1: the identity


def test_while_loop_of_relu_differences_is_spurious_like_its_unrolled_form():
    def f(x):
        return lax.while_loop(lambda c: c[1] < 3, lambda c: (_relu_diff(c[0]), c[1] + 1), (x, 0))[0]

    def unrolled(x):
        for _ in range(3):
            x = _relu_diff(x)
        return x

    a = audit(f, jnp.zeros(1))
    assert a.verdict is Verdict.SPURIOUS and a.exact and a.ad_mode == "forward"
    assert_same_audit(a, audit(unrolled, jnp.zeros(1)))


def test_fori_loop_with_traced_bounds_lowers_to_while():
    # the trip count 2 + [x0 > 5] is decided at the point; |.| twice at 0: Clarke [-1, 1]
    f = lambda x: lax.fori_loop(0, 2 + (x[0] > 5).astype(jnp.int32), lambda i, v: jnp.abs(v), x)  # noqa: E731
    P = Problem(f, jnp.zeros(1), kink_tol=0.0)
    assert any(getattr(n, "spec", None) is not None and n.spec.kind == "while" for n in P.graph.nodes)
    a = audit(f, jnp.zeros(1))
    assert a.verdict is Verdict.CLARKE and as_set(a.b_subdifferential) == {(1.0,), (-1.0,)}


# --------------------------------------------------------------------------- long loops


def _long(n):
    def f(x):
        return lax.fori_loop(0, n, lambda i, h: h + relu(x - i), jnp.zeros_like(x))
    return f


def test_long_loop_ir_stays_the_size_of_its_body():
    n = 10_000
    P = Problem(_long(n), jnp.array([5000.0]), kink_tol=0.0)
    loops = [nd for nd in P.graph.nodes if getattr(nd, "spec", None) is not None]
    assert len(loops) == 1 and loops[0].spec.length == n
    assert len(P.graph.nodes) < 10 and len(loops[0].spec.body.nodes) < 10


def test_long_smooth_loop_matches_its_closed_form():
    # h_{t+1} = h_t / 2 + x with h_0 = x: dh/dx follows d_{t+1} = d_t / 2 + 1, d_0 = 1
    n = 10_000
    f = lambda x: lax.fori_loop(0, n, lambda i, h: 0.5 * h + x, x)  # noqa: E731
    a = audit(f, jnp.array([0.3]))
    d = 1.0
    for _ in range(n):
        d = d / 2 + 1
    assert a.verdict is Verdict.SMOOTH and np.allclose(a.b_subdifferential, [[[d]]])


@pytest.mark.slow
def test_long_loop_with_one_active_kink():
    # f(x) = sum_{i < 10^4} relu(x - i): at x = 5000 the kink of term i = 5000 is active,
    # the slopes are 5000 (left) and 5001 (right); jax's relu'(0) = 0 gives 5000
    a = audit(_long(10_000), jnp.array([5000.0]))
    assert a.verdict is Verdict.CLARKE and a.exact
    assert as_set(a.b_subdifferential) == {(5000.0,), (5001.0,)}
    assert len(a.active_kinks) == 1  # jax.nn.relu traces to max(x, 0): a tie of two arguments
    assert "iteration 5000" in a.active_kinks[0].location


def test_loop_node_virtual_sites_are_per_iteration(monkeypatch):
    # two iterations at a kink of the same body node are two sites (two kinks of f)
    monkeypatch.setattr(_jax_control, "MAX_UNROLLED_NODES", 0)
    f = lambda x: lax.fori_loop(0, 2, lambda i, h: jnp.abs(h), x)  # noqa: E731
    P = Problem(f, jnp.zeros(1), kink_tol=0.0)
    assert isinstance(P.graph.nodes, _loops.NodeList)
    a = audit(f, jnp.zeros(1))
    assert len(a.active_kinks) == 2
    assert {k.location.split("(")[-1] for k in a.active_kinks} == {
        "iteration 0 of a scan of 2 iterations)", "iteration 1 of a scan of 2 iterations)"}
