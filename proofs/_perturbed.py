"""Perturbed optimizers (Berthet et al., NeurIPS 2020): three identities, by integration.

SymPy's direct integration of Gumbel densities over the real line is unreliable (it
returns unevaluated integrals or a wrong complex constant), so every Gumbel integral is
first transformed with u = exp(-z) (dz = -du/u, orientation reversed): the integrands
become exponentials and logs on (0, oo), which SymPy integrates exactly.
"""
from __future__ import annotations

import functools

import sympy as sp

from ._certificate import Derivation, expr_text
from ._proof import Proof

_z = sp.Symbol("z", real=True)
_u = sp.Symbol("u", positive=True)


def gumbel_pdf(z):
    return sp.exp(-z - sp.exp(-z))


def gumbel_cdf(z):
    return sp.exp(-sp.exp(-z))


def normal_pdf(y, sd):
    return sp.exp(-y ** 2 / (2 * sd ** 2)) / (sd * sp.sqrt(2 * sp.pi))


@functools.lru_cache(maxsize=64)
def _gumbel_substitution(h):
    z_of_u = -sp.log(_u)
    jac = sp.diff(z_of_u, _u)            # -1/u; the limits swap, which flips the sign back
    integrand = sp.simplify(h.subs(_z, z_of_u) * (-jac))
    return integrand, sp.simplify(sp.integrate(integrand, (_u, 0, sp.oo)))


def integrate_over_reals_gumbel(h, d: Derivation | None = None, label: str = ""):
    """The integral of ``h(z)`` over the reals via the substitution u = exp(-z).

    The SymPy work is cached per integrand (the same integrals recur across proofs).
    """
    integrand, value = _gumbel_substitution(sp.sympify(h))
    if d is not None:
        d.step(f"{label}: with u = exp(-z) the integrand becomes {expr_text(integrand)} on (0, oo); "
               f"integral = {expr_text(value)}")
    return value


def _solver_cross_check(d: Derivation, noise: str, exact_y1, exact_F=None, *, theta=(0.3, -0.2), sigma=0.7,
                        num_samples=40000) -> None:
    """Optional: compare nonsmooth.solvers' Monte-Carlo estimates with the exact closed forms.

    The tolerance is six standard errors of the estimator (its seed is fixed, so the
    comparison is deterministic); skipped with a note when the solvers are unavailable.
    """
    try:
        import numpy as np

        from nonsmooth.solvers import argmax_onehot, perturbed, perturbed_max
    except ImportError as exc:
        d.step(f"solver cross-check skipped: nonsmooth.solvers is unavailable ({exc})")
        return
    point = {sp.Symbol("theta1", real=True): theta[0], sp.Symbol("theta2", real=True): theta[1],
             sp.Symbol("sigma", positive=True): sigma}
    p1 = float(sp.N(exact_y1.subs(point), 20))
    vec = np.array(theta, dtype=np.float64)
    layer = perturbed(argmax_onehot, num_samples=num_samples, sigma=sigma, noise=noise, seed=0)
    est = float(np.asarray(layer(vec))[0])
    tol = 6 * (p1 * (1 - p1) / num_samples) ** 0.5
    d.require(abs(est - p1) <= tol,
              f"solver check ({noise}): perturbed(argmax_onehot) at theta = {theta}, sigma = {sigma} gives "
              f"{est:.5f} vs exact {p1:.5f} (|diff| <= 6 standard errors = {tol:.4f})",
              failure=f"nonsmooth.solvers.perturbed ({noise}) estimates P(argmax = 1) = {est:.5f}, the exact value "
                      f"is {p1:.5f}: off by more than six standard errors ({tol:.4f})")
    if exact_F is not None:
        F = float(sp.N(exact_F.subs(point), 20))
        fmax = perturbed_max(argmax_onehot, num_samples=num_samples, sigma=sigma, noise=noise, seed=0)
        est_F = float(np.asarray(fmax(vec)))
        # sigma * pi / sqrt(3) bounds the standard deviation of the max of two unit-scale noises used here
        tol_F = 6 * sigma * float(sp.pi) / 3 ** 0.5 / num_samples ** 0.5
        d.require(abs(est_F - F) <= tol_F,
                  f"solver check ({noise}): perturbed_max gives {est_F:.5f} vs exact F_sigma {F:.5f}",
                  failure=f"nonsmooth.solvers.perturbed_max ({noise}) gives {est_F:.5f}, exact F_sigma is {F:.5f}")


def _gumbel_basics(d: Derivation) -> None:
    d.equal(sp.diff(gumbel_cdf(_z), _z), gumbel_pdf(_z), "the Gumbel CDF exp(-exp(-z)) differentiates to its density")
    d.equal(integrate_over_reals_gumbel(gumbel_pdf(_z), d, "total mass"), 1, "the Gumbel density integrates to 1")


def _run_softmax(d: Derivation) -> None:
    t1, t2, t3 = sp.symbols("theta1 theta2 theta3", real=True)
    sigma = sp.Symbol("sigma", positive=True)
    _gumbel_basics(d)
    # P(theta1 + sigma Z1 > theta2 + sigma Z2) = E_{Z1}[ G(Z1 + (theta1 - theta2)/sigma) ].
    h2 = gumbel_pdf(_z) * gumbel_cdf(_z + (t1 - t2) / sigma)
    d.expr("integrand_n2", h2)
    p1 = integrate_over_reals_gumbel(h2, d, "n = 2, P(argmax = 1)")
    soft2 = sp.exp(t1 / sigma) / (sp.exp(t1 / sigma) + sp.exp(t2 / sigma))
    d.expr("perturbed_argmax_n2_first", p1)
    d.equal(p1, soft2, "n = 2: P(argmax = 1) = softmax(theta / sigma)_1")
    d.equal(1 - p1, soft2.subs({t1: t2, t2: t1}, simultaneous=True),
            "n = 2: P(argmax = 2) = 1 - P(argmax = 1) = softmax(theta / sigma)_2")
    # n = 3, same integral with one more independent CDF factor.
    h3 = h2 * gumbel_cdf(_z + (t1 - t3) / sigma)
    p3 = integrate_over_reals_gumbel(h3, d, "n = 3, P(argmax = 1)")
    d.expr("perturbed_argmax_n3_first", p3)
    soft3 = sp.exp(t1 / sigma) / sum(sp.exp(t / sigma) for t in (t1, t2, t3))
    d.equal(p3, soft3, "n = 3: P(argmax = 1) = softmax(theta / sigma)_1")
    _solver_cross_check(d, "gumbel", p1)


def _run_gradient(d: Derivation) -> None:
    t1, t2, tt = sp.symbols("theta1 theta2 t", real=True)
    sigma = sp.Symbol("sigma", positive=True)
    _gumbel_basics(d)
    # Gumbel noise: the max of independent shifted Gumbels is a Gumbel with location m.
    m = sigma * sp.log(sp.exp(t1 / sigma) + sp.exp(t2 / sigma))
    d.expr("max_location", m)
    cdf_max = gumbel_cdf((tt - t1) / sigma) * gumbel_cdf((tt - t2) / sigma)
    d.equal(sp.expand(sp.log(cdf_max)), sp.expand(sp.log(gumbel_cdf((tt - m) / sigma))),
            "P(max_i theta_i + sigma Z_i <= t) = G((t - m)/sigma) with m = sigma log(sum exp(theta/sigma))")
    mean_std = integrate_over_reals_gumbel(_z * gumbel_pdf(_z), d, "mean of a standard Gumbel")
    d.equal(mean_std, sp.EulerGamma, "E[Z] = Euler's gamma for a standard Gumbel Z")
    F = m + sigma * mean_std
    d.expr("F_sigma_gumbel", F)
    d.step(f"so F_sigma(theta) = E[max_i theta_i + sigma Z_i] = {expr_text(F)}")
    grad = [sp.diff(F, t) for t in (t1, t2)]
    # The perturbed argmax, computed independently by integrating P(argmax = i).
    y1 = integrate_over_reals_gumbel(gumbel_pdf(_z) * gumbel_cdf(_z + (t1 - t2) / sigma), d,
                                     "Gumbel P(argmax = 1)")
    d.expr("grad_F_gumbel_first", grad[0])
    d.equal(grad[0], y1, "Gumbel: dF_sigma/dtheta1 = P(argmax = 1)")
    d.equal(grad[1], 1 - y1, "Gumbel: dF_sigma/dtheta2 = P(argmax = 2)")

    # Normal noise: max(a, b) = b + relu(a - b), and D = theta1 - theta2 + sigma (Z1 - Z2).
    w, x = sp.symbols("w x", real=True)
    conv = sp.integrate(normal_pdf(_z, sigma) * normal_pdf(w - _z, sigma), (_z, -sp.oo, sp.oo))
    d.equal(conv, normal_pdf(w, sp.sqrt(2) * sigma),
            "the difference of two independent N(0, sigma^2) noises is N(0, 2 sigma^2) (convolution)")
    delta = t1 - t2
    sd = sp.sqrt(2) * sigma
    e_relu = sp.integrate(x * normal_pdf(x - delta, sd), (x, 0, sp.oo))
    F_normal = t2 + e_relu
    d.expr("F_sigma_normal", F_normal)
    p_first = sp.integrate(normal_pdf(x - delta, sd), (x, 0, sp.oo))
    d.expr("normal_P_argmax_first", p_first)
    d.step(f"normal noise: F_sigma = theta2 + E[relu(D)] = {expr_text(sp.simplify(F_normal))}, "
           f"P(argmax = 1) = P(D > 0) = {expr_text(sp.simplify(p_first))}")
    d.equal(sp.diff(F_normal, t1), p_first, "normal: dF_sigma/dtheta1 = P(argmax = 1)")
    d.equal(sp.diff(F_normal, t2), 1 - p_first, "normal: dF_sigma/dtheta2 = P(argmax = 2)")
    _solver_cross_check(d, "gumbel", y1, F)
    _solver_cross_check(d, "normal", p_first, F_normal)


def _run_fenchel_young(d: Derivation) -> None:
    t1, t2, c = sp.symbols("theta1 theta2 c", real=True)
    sigma = sp.Symbol("sigma", positive=True)
    # y = (p, 1 - p) with 0 < p < 1, written p = 1/(1 + r), r > 0, so SymPy knows both are positive.
    r = sp.Symbol("r", positive=True)
    p = 1 / (1 + r)
    mean_std = integrate_over_reals_gumbel(_z * gumbel_pdf(_z))
    F = sigma * sp.log(sp.exp(t1 / sigma) + sp.exp(t2 / sigma)) + sigma * mean_std
    d.expr("F_sigma", F)
    d.equal(F.subs({t1: t1 + c, t2: t2 + c}) - F, c,
            "F(theta + c 1) = F(theta) + c, so the conjugate is finite only on sum(y) = 1 and we may fix theta2 = 0")
    objective = t1 * p - F.subs(t2, 0)
    d.expr("conjugate_objective", objective)
    crit = sp.solve(sp.diff(objective, t1), t1)
    d.require(len(crit) == 1, f"one stationary point theta1 = {expr_text(crit[0]) if crit else None}")
    curvature = sp.simplify(sp.diff(objective, t1, 2))
    d.require(sp.simplify(-curvature * (sp.exp(t1 / sigma) + 1) ** 2).is_positive,
              f"the objective is strictly concave in theta1 (second derivative {expr_text(curvature)})")
    omega = sp.simplify(objective.subs(t1, crit[0]))
    d.expr("Omega_p", omega)
    entropy = sigma * (p * sp.log(p) + (1 - p) * sp.log(1 - p)) - sigma * sp.EulerGamma
    d.equal(sp.expand_log(omega, force=True), sp.expand_log(entropy, force=True),
            "Omega(p, 1-p) = sigma (p log p + (1-p) log(1-p)) - sigma gamma (negative entropy)")
    y1 = sp.Symbol("y1", positive=True)
    loss = F + omega.subs(r, (1 - y1) / y1) - (t1 * y1 + t2 * (1 - y1))
    d.expr("fenchel_young_loss", loss)
    y_sigma = [sp.diff(F, t) for t in (t1, t2)]
    d.equal(sp.diff(loss, t1), y_sigma[0] - y1, "dL/dtheta1 = y_sigma(theta)_1 - y_1")
    d.equal(sp.diff(loss, t2), y_sigma[1] - (1 - y1), "dL/dtheta2 = y_sigma(theta)_2 - y_2")
    gumbel_argmax = integrate_over_reals_gumbel(gumbel_pdf(_z) * gumbel_cdf(_z + (t1 - t2) / sigma), d,
                                                "Gumbel P(argmax = 1)")
    d.equal(y_sigma[0], gumbel_argmax, "y_sigma = grad F_sigma is the Gumbel-perturbed argmax")
    at_min = loss.subs(y1, y_sigma[0])
    # theta_i = sigma log(a_i) with a_i > 0 is a bijection of the reals; it lets SymPy split the logs.
    a1, a2 = sp.symbols("a1 a2", positive=True)
    at_min = sp.expand_log(sp.simplify(at_min.subs({t1: sigma * sp.log(a1), t2: sigma * sp.log(a2)})), force=True)
    d.equal(at_min, 0,
            "L(theta; y_sigma(theta)) = 0: the Fenchel-Young inequality is tight at y = y_sigma(theta)")
    d.equal(sp.diff(loss, y1, 2), sigma / (y1 * (1 - y1)),
            "d2L/dy1^2 = sigma/(y1 (1-y1)), positive on (0, 1): L is convex in y1 with its minimum 0 at y_sigma")


_S = r"\sigma"
PROOFS = (
    Proof(
        name="gumbel_argmax_is_softmax",
        statement=("With i.i.d. standard Gumbel noise Z, P(argmax_i theta_i + sigma Z_i = 1) = "
                   "softmax(theta / sigma)_1, computed by integration for n = 2 and n = 3."),
        latex=rf"\mathbb{{E}}\big[\arg\max(\theta+{_S} Z)\big]=\mathrm{{softmax}}(\theta/{_S}),\ Z_i\sim\mathrm{{Gumbel}}(0,1)",
        assumptions=("sigma > 0", "Z_i i.i.d. standard Gumbel: density exp(-z - exp(-z))"),
        run=_run_softmax,
    ),
    Proof(
        name="perturbed_max_gradient",
        statement=("The gradient of the perturbed max F_sigma(theta) = E[max_i theta_i + sigma Z_i] is the "
                   "perturbed argmax E[argmax(theta + sigma Z)], for Gumbel noise (F computed in closed form) "
                   "and for normal noise (n = 2, by integration)."),
        latex=rf"\nabla_\theta\,\mathbb{{E}}\big[\max_i(\theta+{_S} Z)_i\big]=\mathbb{{E}}\big[\arg\max(\theta+{_S} Z)\big]",
        assumptions=("sigma > 0", "n = 2 (Gumbel: general n for the max law)",
                     "Z i.i.d. standard Gumbel or standard normal"),
        run=_run_gradient,
    ),
    Proof(
        name="fenchel_young_gradient",
        statement=("For Gumbel noise and n = 2, the conjugate of F_sigma is sigma times the negative entropy "
                   "(minus sigma gamma); the Fenchel-Young loss L(theta; y) = F_sigma(theta) + Omega(y) - "
                   "<theta, y> has gradient y_sigma(theta) - y and vanishes exactly at y = y_sigma(theta)."),
        latex=rf"\nabla_\theta\big(F_{_S}(\theta)+\Omega(y)-\langle\theta,y\rangle\big)=y_{_S}(\theta)-y",
        assumptions=("sigma > 0", "n = 2", "y = (p, 1 - p) with 0 < p < 1"),
        run=_run_fenchel_young,
    ),
)
