"""Fast differentiable solvers: isotonic regression (C PAV kernel), soft sort and rank,
perturbed optimizers and Fenchel-Young losses, the SPO+ loss, identity-with-projection and
blackbox backward passes, batched combinatorial solvers.

Importing this package imports neither torch nor jax; each function loads the
framework of the arrays it is given.
"""
import importlib as _importlib

# Public name -> private module that defines it.  Resolved lazily so that importing
# nonsmooth.solvers stays cheap and framework-free.
_EXPORTS = {
    "isotonic_regression": "_isotonic",
    "pav_backend": "_isotonic",
    "soft_sort": "_soft_sort",
    "soft_rank": "_soft_sort",
    "perturbed": "_perturbed",
    "perturbed_max": "_perturbed",
    "fenchel_young_loss": "_perturbed",
    "spo_plus_loss": "_spo_plus",
    "identity_backward": "_surrogate_backward",
    "blackbox_backward": "_surrogate_backward",
    "argmax_onehot": "_combinatorial",
    "topk_mask": "_combinatorial",
    "sort_permutation": "_combinatorial",
    "hard_rank": "_combinatorial",
    "shortest_path_grid": "_combinatorial",
    "shortest_path_edges": "_combinatorial",
    "linear_assignment": "_combinatorial",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nonsmooth.solvers' has no attribute {name!r}")
    value = getattr(_importlib.import_module(f"nonsmooth.solvers.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
