"""``audit_implicit``: does a torch implicit layer's backward pass return an element of the
conservative Jacobian of its solution map, and does that map exist (invertibility)?"""
from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np

_ORDER = ("SMOOTH", "CLARKE", "UNDECIDED", "NOT_LIPSCHITZ", "SPURIOUS")


def _verdict(name: str):
    """The engine's ``Verdict`` member when the engine is importable, else its name."""
    try:
        from nonsmooth.conservative import Verdict
    except ImportError:
        return name
    try:
        return Verdict[name]
    except (KeyError, TypeError):
        return name


def _name(v) -> str:
    return getattr(v, "name", str(v))


@dataclasses.dataclass(frozen=True)
class ImplicitAudit:
    """Verdict on an implicit layer's gradient with the numbers behind it, one entry per sample.

    Each sample records: the layer's vector-Jacobian product with a random cotangent, its
    relative gaps to unrolled float64 AD and to float64 central differences, the invertibility
    check, and (structured layers) the distance of the layer's output to the exact set
    ``{g^T (-A^-1 B)}`` over the conservative selections.
    """

    verdict: object
    reason: str
    samples: list
    backward: str

    def explain(self) -> str:
        lines = [f"{_name(self.verdict)} ({self.backward} backward): {self.reason}"]
        for i, s in enumerate(self.samples):
            lines.append(
                f"  sample {i}: {s['verdict']}; active kinks {s['n_active_kinks']}, invertible {s['invertible']}, "
                f"gap vs unrolled {s['gap_unroll']:.2e}, vs finite differences {s['gap_fd']:.2e}"
                + (f", distance to the Jacobian set {s['set_distance']:.2e}" if s["set_distance"] is not None else ""))
        return "\n".join(lines)

    def to_json(self) -> dict:
        d = {"verdict": _name(self.verdict), "reason": self.reason, "backward": self.backward,
             "samples": self.samples, "explanation": self.explain()}
        return json.loads(json.dumps(d, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _state_map(layer):
    from ._torch_implicit import DEQ, ImplicitModel

    if isinstance(layer, ImplicitModel):
        return lambda lay, x, backward=None: lay.state(x, backward=backward)
    if isinstance(layer, DEQ):
        return lambda lay, x, backward=None: lay(x, backward=backward)
    raise TypeError(f"layer must be a nonsmooth.implicit.DEQ or ImplicitModel; got {type(layer).__name__}")


def audit_implicit(layer, x, *, max_samples: int = 4, rtol: float | None = None, max_kinks: int = 10,
                   kink_tol: float = 0.0, seed: int = 0) -> ImplicitAudit:
    """Audit a torch ``DEQ`` / ``ImplicitModel`` on the inputs ``x`` (batch first).

    For up to ``max_samples`` samples, compares ``g^T dz*/dx`` from the layer's own backward
    with unrolled float64 AD, float64 central differences and the exact set over the
    conservative selections (layers with ``structure()``), after checking invertibility.
    Verdicts: ``SMOOTH`` (no active kink, gradient matches), ``CLARKE`` (kinks, gradient in the
    set), ``SPURIOUS`` (gradient certified outside the set, e.g. ``jfb``), ``UNDECIDED`` (the
    implicit function theorem does not apply, or the budget was exceeded; reason given).

    Example:
        >>> import torch
        >>> from nonsmooth.implicit import DEQ, EquilibriumCell, audit_implicit
        >>> _ = torch.manual_seed(0); layer = DEQ(EquilibriumCell(3, 6), state_shape=(6,), tol=1e-10).double()
        >>> audit_implicit(layer, torch.randn(2, 3, dtype=torch.float64)).to_json()["verdict"]
        'SMOOTH'
    """
    import torch

    state = _state_map(layer)
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty (batch, features) tensor; got {getattr(x, 'shape', type(x).__name__)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN/inf")
    if rtol is None:
        rtol = max(1e-4, 100 * layer.options.tol)
    ref = copy.deepcopy(layer).double()
    ref.options = dataclasses.replace(layer.options, tol=1e-13, stop="abs", max_iter=max(layer.options.max_iter, 2000),
                                      on_failure="ignore")
    structure = None
    for obj in (layer, getattr(layer, "f", None)):
        if obj is not None and callable(getattr(obj, "structure", None)):
            structure = obj.structure()
            break
    from ._invertibility import check_invertibility, implicit_jacobian_set

    gen = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(min(max_samples, x.shape[0])):
        xi = x[i:i + 1].detach()
        # the layer as the user configured it
        xl = xi.clone().requires_grad_(True)
        z = state(layer, xl)
        g = torch.randn(z.shape, generator=gen, dtype=torch.float64)
        (z * g.to(z.dtype)).sum().backward()
        v_layer = xl.grad.detach().double().reshape(-1).numpy()
        # float64 references
        xu = xi.double().clone().requires_grad_(True)
        zu = state(ref, xu, backward="unroll")
        (zu * g).sum().backward()
        v_unroll = xu.grad.detach().reshape(-1).numpy()
        with torch.no_grad():
            z64 = state(ref, xi.double()).reshape(-1)
            p = xi.shape[1]
            h = 1e-6
            dirs = torch.eye(p, dtype=torch.float64) if p <= 32 else torch.randn(16, p, generator=gen, dtype=torch.float64)
            fd = []
            for d in dirs:
                up = (state(ref, xi.double() + h * d) * g).sum()
                dn = (state(ref, xi.double() - h * d) * g).sum()
                fd.append(float((up - dn) / (2 * h)))
        fd = np.array(fd)
        dn_ = dirs.numpy()
        scale = max(1e-12, float(np.abs(v_unroll).max()))
        gap_unroll = float(np.abs(v_layer - v_unroll).max() / scale)
        gap_fd = float(np.abs(dn_ @ v_layer - fd).max() / max(1e-12, float(np.abs(fd).max())))
        entry = dict(gap_unroll=gap_unroll, gap_fd=gap_fd, set_distance=None, n_active_kinks=None,
                     invertible=None, invertibility=None)
        if structure is not None:
            inv = check_invertibility(structure, z64.numpy(), xi.double().reshape(-1).numpy(), max_kinks=max_kinks,
                                      kink_tol=kink_tol, seed=seed)
            entry.update(n_active_kinks=inv.n_active_kinks, invertible=inv.invertible, invertibility=inv.to_json())
            if inv.invertible is False:
                v, why = "UNDECIDED", "the implicit function theorem does not apply (a singular selection)"
            elif inv.invertible is None:
                v, why = "UNDECIDED", inv.reason
            else:
                S = implicit_jacobian_set(structure, z64.numpy(), xi.double().reshape(-1).numpy(),
                                          max_kinks=max_kinks, kink_tol=kink_tol, seed=seed)
                if not S.exact:
                    v, why = "UNDECIDED", f"more than {max_kinks} active kinks"
                else:
                    inside, dist = S.contains_vjp(g.reshape(-1).numpy(), v_layer, tol=rtol)
                    entry["set_distance"] = dist
                    if not S.active:
                        v = "SMOOTH" if inside else "SPURIOUS"
                        why = ("no active kink; the gradient matches the unique Jacobian" if inside else
                               f"no active kink, yet the gradient is {dist:.2e} away from the unique Jacobian")
                    else:
                        v = "CLARKE" if inside else "SPURIOUS"
                        why = (f"{len(S.active)} active kink(s); the gradient is an element of the exact set"
                               if inside else f"{len(S.active)} active kink(s); the gradient is {dist:.2e} outside "
                               "the exact set over all selections")
        else:
            if gap_fd <= rtol and gap_unroll <= rtol:
                v, why = "UNDECIDED", "gradient matches unrolled AD and finite differences, but f exposes no " \
                                      "structure() for an exact kink analysis"
            else:
                v, why = "UNDECIDED", "f exposes no structure() for an exact kink analysis"
        entry["verdict"] = v
        entry["reason"] = why
        samples.append(entry)
    worst = max(samples, key=lambda s: _ORDER.index(s["verdict"]))
    return ImplicitAudit(_verdict(worst["verdict"]), worst["reason"], samples, layer.backward)
