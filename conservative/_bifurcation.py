"""The ReLU'(0) study (Bertoin, Bolte, Gerchinovitz, Pauwels, NeurIPS 2021).

In exact arithmetic a pre-activation of a randomly initialised MLP is never exactly 0,
so the value backprop uses for ReLU'(0) never matters.  In floating point it does: a
sum can cancel to exactly 0, and then backprop with ReLU'(0) = 0 and with ReLU'(0) = 1
return different parameter gradients.  The *bifurcation set* is the set of parameters
for which this happens on some minibatch of one pass over the data.  The study
estimates the fraction of random initialisations that fall in it, per dtype, with a
confidence interval; :func:`bifurcation_zone` draws a plane section of it.

torch is imported when a study runs, never at module import.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "BifurcationStudy",
    "BifurcationZone",
    "DtypeRate",
    "bifurcation_study",
    "bifurcation_zone",
    "load_dataset",
    "proportion_interval",
]

_DTYPES = ("float16", "float32", "float64")
_DATASETS = ("digits", "mnist_like")


# ----------------------------------------------------------------------------- statistics
def proportion_interval(successes: int, trials: int, *, confidence: float = 0.95,
                        method: str = "wilson") -> tuple[float, float]:
    """Two-sided confidence interval for a binomial proportion.

    ``method`` is ``"wilson"`` (score interval) or ``"clopper-pearson"`` (exact, via the
    beta distribution; conservative).

    Example:
        >>> lo, hi = proportion_interval(0, 20)
        >>> lo == 0.0 and 0.15 < hi < 0.17
        True
    """
    if not isinstance(trials, (int, np.integer)) or isinstance(trials, bool) or trials < 1:
        raise ValueError(f"trials must be a positive int, got {trials!r}")
    if (not isinstance(successes, (int, np.integer)) or isinstance(successes, bool)
            or not 0 <= successes <= trials):
        raise ValueError(f"successes must be an int in [0, trials={trials}], got {successes!r}")
    if not isinstance(confidence, (float, int)) or not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    from scipy import stats

    alpha = 1.0 - float(confidence)
    k, n = int(successes), int(trials)
    if method == "wilson":
        z = float(stats.norm.ppf(1 - alpha / 2))
        p = k / n
        denom = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / denom
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
        # Clip the rounding noise so the interval always holds the point estimate.
        return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))
    if method == "clopper-pearson":
        lo = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
        hi = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
        return lo, hi
    raise ValueError(f"method must be 'wilson' or 'clopper-pearson', got {method!r}")


# ----------------------------------------------------------------------------- data
def _mnist_like(n_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """784 pixels on the k/255 lattice, about 80% exact zeros, ten stroke-like classes."""
    rng = np.random.default_rng([seed, 784])
    yy, xx = np.mgrid[0:28, 0:28]
    templates = []
    for _ in range(10):
        img = np.zeros((28, 28))
        # A class is a few thick random strokes through the central 20x20 box.
        for _ in range(3):
            (y0, x0), (y1, x1) = rng.uniform(5, 23, size=(2, 2))
            t = np.linspace(0, 1, 40)[:, None]
            pts = np.hstack([y0 + (y1 - y0) * t, x0 + (x1 - x0) * t])
            d = np.min((yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2, axis=-1)
            img = np.maximum(img, np.exp(-d / 3.0))
        templates.append(img)
    labels = rng.integers(0, 10, size=n_samples)
    X = np.empty((n_samples, 784))
    for i, c in enumerate(labels):
        img = np.roll(templates[c], tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
        img = img * rng.uniform(0.7, 1.3) + rng.normal(0, 0.05, size=img.shape)
        k = np.clip(np.round(img * 255), 0, 255)
        k[img < 0.25] = 0
        X[i] = k.reshape(-1) / 255.0
    return X, labels.astype(np.int64)


def load_dataset(name: str = "digits", *, n_samples: int | None = None,
                 seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` in float64: scikit-learn's bundled ``"digits"`` (1797 x 64, scaled to
    [0, 1] by /16, so exact in every dtype) or the generated ``"mnist_like"`` set
    (default 2048 x 784 on the k/255 lattice, about 80% zeros).

    Example:
        >>> X, y = load_dataset("mnist_like", n_samples=64)
        >>> X.shape, 0.7 < float(np.mean(X == 0)) < 0.9
        ((64, 784), True)
    """
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:
            raise ImportError("dataset='digits' needs scikit-learn: pip install scikit-learn "
                              "(or use dataset='mnist_like')") from err
        data = load_digits()
        X, y = data.data / 16.0, data.target.astype(np.int64)
        if n_samples is not None:
            X, y = X[:n_samples], y[:n_samples]
        return X, y
    if name == "mnist_like":
        return _mnist_like(2048 if n_samples is None else n_samples, seed)
    raise ValueError(f"dataset must be one of {_DATASETS}, got {name!r}")


# ----------------------------------------------------------------------------- the network
def _check_pos_int(value, name: str, *, lo: int = 1) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value!r}")
    return int(value)


def _check_dtypes(dtypes) -> tuple[str, ...]:
    if isinstance(dtypes, str):
        dtypes = (dtypes,)
    try:
        names = tuple(str(d).replace("torch.", "") for d in dtypes)
    except TypeError:
        raise TypeError(f"dtypes must be a sequence of dtype names, got {dtypes!r}") from None
    if not names or any(n not in _DTYPES for n in names) or len(set(names)) != len(names):
        raise ValueError(f"dtypes must be distinct names from {_DTYPES}, got {dtypes!r}")
    return names


def _init_params(sizes: Sequence[int], rng: np.random.Generator) -> list[np.ndarray]:
    """PyTorch's default nn.Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), in float64."""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = 1.0 / math.sqrt(fan_in)
        params.append(rng.uniform(-bound, bound, size=(fan_out, fan_in)))
        params.append(rng.uniform(-bound, bound, size=fan_out))
    return params


class _Net:
    """An MLP evaluated with a ReLU whose derivative at 0 is chosen at backward time.

    ``precision`` is "native" (torch ops in the dtype) or "emulated-float16" (values
    held in float32, rounded to float16 after every op forward and every gradient
    backward: float16 storage with float32 accumulation, as GPU tensor cores do).
    """

    def __init__(self, torch, dtype: str, precision: str, device: str):
        self.torch = torch
        self.device = device
        self.emulate = precision in ("emulated-float16", "float16-accumulate")
        self.accumulate = precision == "float16-accumulate"
        self.dtype = torch.float32 if self.emulate else getattr(torch, dtype)
        self.s = 0.0  # ReLU'(0), read by the backward pass
        net = self

        class ReLU(torch.autograd.Function):
            @staticmethod
            def forward(ctx, z):
                ctx.save_for_backward(z)
                return torch.relu(z)

            @staticmethod
            def backward(ctx, g):
                (z,) = ctx.saved_tensors
                mask = z >= 0 if net.s == 1.0 else z > 0
                return g * mask.to(g.dtype)

        class Round16(torch.autograd.Function):
            @staticmethod
            def forward(ctx, v):
                return v.to(torch.float16).to(torch.float32)

            @staticmethod
            def backward(ctx, g):
                return g.to(torch.float16).to(torch.float32)

        self._relu = ReLU.apply
        self._round = Round16.apply if self.emulate else (lambda v: v)

    def tensor(self, array: np.ndarray, *, grad: bool = False):
        t = self.torch.as_tensor(array, device=self.device)
        if self.emulate:
            t = t.to(self.torch.float16).to(self.torch.float32)
        else:
            t = t.to(self.dtype)
        return t.requires_grad_(grad)

    def forward(self, params, X):
        """Logits and, per hidden layer, the number of pre-activations exactly 0."""
        F = self.torch.nn.functional
        h = X
        zeros = []
        n_layers = len(params) // 2
        for layer in range(n_layers):
            W, b = params[2 * layer], params[2 * layer + 1]
            if self.accumulate:
                # Every multiply and every add rounded to float16: a float16 dot product
                # summed term by term, as without a wider accumulator.
                z = self._round(b.expand(h.shape[0], -1))
                for k in range(h.shape[1]):
                    z = self._round(z + self._round(h[:, k:k + 1] * W[:, k]))
            else:
                z = self._round(F.linear(h, W, b))
            if layer == n_layers - 1:
                return z, zeros
            zeros.append(int((z == 0).sum()))
            h = self._relu(z)
        raise AssertionError("unreachable")

    def loss(self, logits, y):
        return self._round(self.torch.nn.functional.cross_entropy(logits, y))

    def batch_bifurcates(self, params, X, y, per_layer: list | None = None) -> tuple[bool, int]:
        """(backprop differs between ReLU'(0)=0 and 1 on this batch, # exact-zero pre-activations).

        ``per_layer``, if given, accumulates the exact zeros of each hidden layer.
        """
        torch = self.torch
        logits, zeros = self.forward(params, X)
        if per_layer is not None:
            for k, z in enumerate(zeros):
                per_layer[k] += z
        n_zero = sum(zeros)
        if n_zero == 0:
            # No pre-activation at a kink: both backward passes apply identical masks,
            # so their gradients are bitwise equal without computing them.
            return False, 0
        loss = self.loss(logits, y)
        self.s = 0.0
        g0 = torch.autograd.grad(loss, params, retain_graph=True)
        self.s = 1.0
        g1 = torch.autograd.grad(loss, params)
        self.s = 0.0
        differs = any(not torch.equal(a, b) for a, b in zip(g0, g1))
        return differs, n_zero


def _torch():
    try:
        import torch
    except ImportError as err:
        raise ImportError("the ReLU'(0) study runs on torch: pip install 'nonsmooth[torch]'") from err
    return torch


def _float16_precision(torch, device: str, float16: str) -> str:
    if float16 not in ("auto", "native", "emulated", "accumulate"):
        raise ValueError(f"float16 must be 'auto', 'native', 'emulated' or 'accumulate', got {float16!r}")
    if float16 == "emulated":
        return "emulated-float16"
    if float16 == "accumulate":
        return "float16-accumulate"
    try:
        W = torch.ones(3, 2, dtype=torch.float16, device=device, requires_grad=True)
        x = torch.ones(4, 2, dtype=torch.float16, device=device)
        out = torch.nn.functional.cross_entropy(torch.relu(torch.nn.functional.linear(x, W)),
                                                torch.zeros(4, dtype=torch.long, device=device))
        out.backward()
        return "native"
    except (RuntimeError, NotImplementedError) as err:
        if float16 == "native":
            raise RuntimeError(f"float16='native' but torch has no float16 kernel on {device}: {err}") from err
        return "emulated-float16"


def _resolve_device(torch, device):
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(device, str) and type(device).__name__ != "device":
        raise TypeError(f"device must be a str such as 'cpu' or 'cuda', got {device!r}")
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but torch sees no CUDA device; use device='cpu'")
    return device


# ----------------------------------------------------------------------------- results
@dataclasses.dataclass(frozen=True)
class DtypeRate:
    """One dtype's outcome over the initialisations."""

    dtype: str
    precision: str  # "native" or "emulated-float16"
    n_inits: int
    n_bifurcating: int
    rate: float
    ci_low: float
    ci_high: float
    n_with_zero: int  # inits with some pre-activation exactly 0 on some batch
    zero_rate: float
    mean_zero_preactivations: float  # per pass over the data
    bifurcating_batch_fraction: float  # of all (init, batch) pairs
    zero_without_bifurcation: int  # batches with exact zeros whose gradients still agreed
    zeros_per_layer: tuple = ()  # exact-zero pre-activations per hidden layer, summed over all passes


@dataclasses.dataclass(frozen=True)
class BifurcationStudy:
    """Fraction of random initialisations in the ReLU'(0) bifurcation set, per dtype.

    ``rates`` holds a :class:`DtypeRate` per dtype; ``rate(dtype)`` the fraction.
    """

    depth: int
    width: int
    batch_size: int
    n_inits: int
    dataset: str
    n_samples: int
    n_features: int
    n_batches: int
    seed: int
    device: str
    confidence: float
    interval: str
    rates: tuple
    seconds: float
    torch_version: str

    def rate(self, dtype: str) -> float:
        return self._row(dtype).rate

    def _row(self, dtype: str) -> DtypeRate:
        for row in self.rates:
            if row.dtype == dtype:
                return row
        raise KeyError(f"dtype {dtype!r} was not studied; studied: {[r.dtype for r in self.rates]}")

    def explain(self) -> str:
        lines = [
            f"ReLU'(0) bifurcation study: MLP with {self.depth} hidden layer(s) of width {self.width} "
            f"(PyTorch default init), {self.n_inits} random initialisations, one pass over "
            f"{self.dataset} ({self.n_samples} x {self.n_features}) in {self.n_batches} minibatches "
            f"of {self.batch_size}, on {self.device} (torch {self.torch_version}).",
            "An initialisation bifurcates when backprop with ReLU'(0)=0 and with ReLU'(0)=1 returns "
            "bitwise different parameter gradients on some minibatch; that requires a pre-activation "
            f"that is exactly 0. {int(self.confidence * 100)}% {self.interval} intervals:",
        ]
        for r in self.rates:
            note = " (float16 emulated: float32 arithmetic rounded to float16 after every op)" \
                if r.precision == "emulated-float16" else ""
            lines.append(
                f"  {r.dtype}{note}: {r.n_bifurcating}/{r.n_inits} = {r.rate:.3f} "
                f"[{r.ci_low:.3f}, {r.ci_high:.3f}] bifurcate; {r.n_with_zero}/{r.n_inits} hit an exact "
                f"zero; {r.mean_zero_preactivations:.2f} exact zeros per pass on average; "
                f"{r.zero_without_bifurcation} batch(es) had zeros but equal gradients; exact zeros by "
                f"hidden layer {list(r.zeros_per_layer)}."
            )
        lines.append("Low precision turns measure-zero kinks into events that happen: the choice of "
                     "ReLU'(0) is not innocuous in float16 and float32 (Bertoin et al., NeurIPS 2021).")
        return "\n".join(lines)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["rates"] = [dataclasses.asdict(r) for r in self.rates]
        out["explanation"] = self.explain()
        return json.loads(json.dumps(out))


@dataclasses.dataclass(frozen=True)
class BifurcationZone:
    """A plane section ``theta0 + a*u + b*v`` of parameter space, each cell marked
    bifurcating (1) or not (0) on the first ``n_batches`` minibatches.

    ``grid[i][j]`` is the cell at ``b = b_values[i]``, ``a = a_values[j]``; ``zeros``
    counts exact-zero pre-activations there.  ``scale="ulp"`` means ``u`` and ``v`` move
    every parameter by one unit in the last place of the dtype per unit of a or b.
    """

    dtype: str
    precision: str
    depth: int
    width: int
    batch_size: int
    n_batches: int
    dataset: str
    scale: str
    a_values: tuple
    b_values: tuple
    grid: tuple
    zeros: tuple
    seed: int

    @property
    def fraction(self) -> float:
        cells = [c for row in self.grid for c in row]
        return sum(cells) / len(cells)

    def explain(self) -> str:
        n = len(self.a_values) * len(self.b_values)
        unit = "ulps of each parameter" if self.scale == "ulp" else "absolute units"
        return (f"Bifurcation zone ({self.dtype}, {self.precision}): on a {len(self.b_values)} x "
                f"{len(self.a_values)} grid of theta0 + a*u + b*v with a, b in "
                f"[{self.a_values[0]}, {self.a_values[-1]}] {unit}, {round(self.fraction * n)}/{n} cells "
                f"bifurcate on the first {self.n_batches} minibatch(es) of {self.dataset} "
                f"(MLP depth {self.depth}, width {self.width}, batch {self.batch_size}).")

    def to_json(self) -> dict:
        out = json.loads(json.dumps(dataclasses.asdict(self)))
        out["fraction"] = self.fraction
        out["explanation"] = self.explain()
        return out


# ----------------------------------------------------------------------------- the study
def _prepare(depth, width, batch_size, dataset, n_samples, seed):
    depth = _check_pos_int(depth, "depth")
    width = _check_pos_int(width, "width")
    batch_size = _check_pos_int(batch_size, "batch_size")
    seed = _check_pos_int(seed, "seed", lo=0)
    if dataset not in _DATASETS:
        raise ValueError(f"dataset must be one of {_DATASETS}, got {dataset!r}")
    if n_samples is not None:
        n_samples = _check_pos_int(n_samples, "n_samples")
    X, y = load_dataset(dataset, n_samples=n_samples, seed=seed)
    if batch_size > len(X):
        raise ValueError(f"batch_size={batch_size} exceeds the {len(X)} samples of {dataset!r}")
    sizes = [X.shape[1]] + [width] * depth + [int(y.max()) + 1]
    return depth, width, batch_size, seed, X, y, sizes


def bifurcation_study(*, depth: int = 3, width: int = 256, batch_size: int = 128, n_inits: int = 20,
                      dtypes: Sequence[str] = _DTYPES, dataset: str = "digits", seed: int = 0,
                      n_samples: int | None = None, confidence: float = 0.95,
                      interval: str = "wilson", float16: str = "auto", device: str | None = None,
                      progress: Callable[[str], None] | None = None) -> BifurcationStudy:
    """How often backprop's gradient depends on ReLU'(0), over random initialisations.

    For each initialisation (PyTorch default init, the same float64 draw cast to every
    dtype) one pass over ``dataset`` in shuffled minibatches; the initialisation
    bifurcates when ReLU'(0)=0 and ReLU'(0)=1 give different parameter gradients on
    some minibatch.  ``float16="auto"`` uses torch's float16 kernels where they exist
    and otherwise emulates (float32 arithmetic rounded to float16 after every op).

    Example:
        >>> s = bifurcation_study(depth=1, width=16, batch_size=128, n_inits=2,
        ...                       dtypes=("float64",))
        >>> s.rate("float64")
        0.0
    """
    depth, width, batch_size, seed, X, y, sizes = _prepare(depth, width, batch_size, dataset,
                                                           n_samples, seed)
    n_inits = _check_pos_int(n_inits, "n_inits")
    names = _check_dtypes(dtypes)
    proportion_interval(0, 1, confidence=confidence, method=interval)  # validates both
    torch = _torch()
    device = _resolve_device(torch, device)
    start = time.perf_counter()
    n = len(X)
    n_batches = math.ceil(n / batch_size)
    rows = []
    for name in names:
        precision = _float16_precision(torch, device, float16) if name == "float16" else "native"
        net = _Net(torch, name, precision, device)
        Xt, yt = net.tensor(X), torch.as_tensor(y, device=device)
        n_bif = n_zero_inits = zero_total = bif_batches = zero_no_bif = 0
        per_layer = [0] * depth
        for init in range(n_inits):
            rng = np.random.default_rng([seed, init])
            params = [net.tensor(p, grad=True) for p in _init_params(sizes, rng)]
            order = torch.as_tensor(rng.permutation(n), device=device)
            bifurcated = any_zero = False
            for start_i in range(0, n, batch_size):
                idx = order[start_i:start_i + batch_size]
                differs, zeros = net.batch_bifurcates(params, Xt[idx], yt[idx], per_layer)
                bifurcated |= differs
                any_zero |= zeros > 0
                zero_total += zeros
                bif_batches += differs
                zero_no_bif += zeros > 0 and not differs
            n_bif += bifurcated
            n_zero_inits += any_zero
            if progress is not None:
                progress(f"{name}: init {init + 1}/{n_inits}, {n_bif} bifurcating so far")
        lo, hi = proportion_interval(n_bif, n_inits, confidence=confidence, method=interval)
        rows.append(DtypeRate(
            dtype=name, precision=precision, n_inits=n_inits, n_bifurcating=n_bif,
            rate=n_bif / n_inits, ci_low=lo, ci_high=hi, n_with_zero=n_zero_inits,
            zero_rate=n_zero_inits / n_inits, mean_zero_preactivations=zero_total / n_inits,
            bifurcating_batch_fraction=bif_batches / (n_inits * n_batches),
            zero_without_bifurcation=zero_no_bif, zeros_per_layer=tuple(per_layer),
        ))
    return BifurcationStudy(
        depth=depth, width=width, batch_size=batch_size, n_inits=n_inits, dataset=dataset,
        n_samples=n, n_features=X.shape[1], n_batches=n_batches, seed=seed, device=device,
        confidence=float(confidence), interval=interval, rates=tuple(rows),
        seconds=time.perf_counter() - start, torch_version=torch.__version__,
    )


def _direction(rng, theta: np.ndarray, dtype: str, scale: str) -> np.ndarray:
    signs = rng.choice((-1.0, 1.0), size=theta.shape)
    if scale == "ulp":
        cast = theta.astype(dtype)
        return signs * np.spacing(np.abs(cast)).astype(np.float64)
    return rng.normal(size=theta.shape)


def bifurcation_zone(*, depth: int = 2, width: int = 32, batch_size: int = 128, dtype: str = "float16",
                     dataset: str = "digits", seed: int = 0, init: int = 0, resolution: int = 21,
                     radius: float = 10.0, scale: str = "ulp", n_batches: int = 1,
                     float16: str = "auto", device: str | None = None) -> BifurcationZone:
    """The plane-section picture: a ``resolution x resolution`` grid of parameters
    ``theta0 + a*u + b*v`` (a, b in ``[-radius, radius]``), each cell marked by whether
    backprop bifurcates there on the first ``n_batches`` (unshuffled) minibatches.

    Example:
        >>> z = bifurcation_zone(depth=1, width=8, resolution=5, dtype="float64")
        >>> len(z.grid), len(z.grid[0]), z.fraction
        (5, 5, 0.0)
    """
    depth, width, batch_size, seed, X, y, sizes = _prepare(depth, width, batch_size, dataset, None, seed)
    (name,) = _check_dtypes((dtype,))
    init = _check_pos_int(init, "init", lo=0)
    resolution = _check_pos_int(resolution, "resolution", lo=2)
    n_batches = _check_pos_int(n_batches, "n_batches")
    if isinstance(radius, bool) or not isinstance(radius, (int, float)) or not (
            math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a positive finite number, got {radius!r}")
    if scale not in ("ulp", "absolute"):
        raise ValueError(f"scale must be 'ulp' or 'absolute', got {scale!r}")
    torch = _torch()
    device = _resolve_device(torch, device)
    precision = _float16_precision(torch, device, float16) if name == "float16" else "native"
    net = _Net(torch, name, precision, device)
    rng = np.random.default_rng([seed, init])
    theta0 = _init_params(sizes, rng)
    dir_rng = np.random.default_rng([seed, init, 2])
    u = [_direction(dir_rng, t, name, scale) for t in theta0]
    v = [_direction(dir_rng, t, name, scale) for t in theta0]
    Xt, yt = net.tensor(X), torch.as_tensor(y, device=device)
    values = np.linspace(-radius, radius, resolution)
    grid, zeros = [], []
    for b in values:
        row, zrow = [], []
        for a in values:
            params = [net.tensor(t + a * du + b * dv, grad=True) for t, du, dv in zip(theta0, u, v)]
            bif, nz = False, 0
            for k in range(min(n_batches, math.ceil(len(X) / batch_size))):
                sl = slice(k * batch_size, (k + 1) * batch_size)
                d, z = net.batch_bifurcates(params, Xt[sl], yt[sl])
                bif |= d
                nz += z
            row.append(int(bif))
            zrow.append(nz)
        grid.append(tuple(row))
        zeros.append(tuple(zrow))
    return BifurcationZone(
        dtype=name, precision=precision, depth=depth, width=width, batch_size=batch_size,
        n_batches=n_batches, dataset=dataset, scale=scale,
        a_values=tuple(float(a) for a in values), b_values=tuple(float(b) for b in values),
        grid=tuple(grid), zeros=tuple(zeros), seed=seed,
    )
