"""Module structure of nonsmooth.solvers: each framework adapter imports on its own, first,
in a fresh interpreter (no import cycle through its dispatcher), and does not load the
dispatcher that uses it."""
import subprocess
import sys

import pytest

ADAPTERS = {
    "nonsmooth.solvers._perturbed_torch": ("torch", "nonsmooth.solvers._perturbed"),
    "nonsmooth.solvers._perturbed_jax": ("jax", "nonsmooth.solvers._perturbed"),
    "nonsmooth.solvers._surrogate_backward_torch": ("torch", "nonsmooth.solvers._surrogate_backward"),
    "nonsmooth.solvers._surrogate_backward_jax": ("jax", "nonsmooth.solvers._surrogate_backward"),
    "nonsmooth.solvers._combinatorial_jax": ("jax", "nonsmooth.solvers._combinatorial"),
    "nonsmooth.solvers._torch_ops": ("torch", None),
    "nonsmooth.solvers._jax_solve": ("jax", None),
    "nonsmooth.solvers._perturbed_common": (None, None),
    "nonsmooth.solvers._surrogate_common": (None, None),
    "nonsmooth.solvers._spo_plus": (None, None),
}


@pytest.mark.parametrize("module", sorted(ADAPTERS))
def test_module_imports_first_in_a_fresh_interpreter(module):
    framework, dispatcher = ADAPTERS[module]
    if framework is not None:
        pytest.importorskip(framework)
    code = (
        "import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        f"dispatcher = {dispatcher!r}\n"
        "assert dispatcher is None or dispatcher not in sys.modules, "
        "f'{dispatcher} was imported by the adapter'\n"
        "if dispatcher is None and " + repr(framework is None) + ":\n"
        "    assert 'torch' not in sys.modules and 'jax' not in sys.modules, 'framework-free?'\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
