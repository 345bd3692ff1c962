"""Only here to build the C extensions (PAV isotonic regression; fused perturbed kernels).

The extension needs gcc and the Python headers alone: it reads arrays through the
buffer protocol, so neither NumPy nor torch headers are involved.  A failed build is
an error; set NONSMOOTH_ALLOW_NO_EXT=1 to install the pure-NumPy fallback instead
(``nonsmooth doctor`` then reports it, and CI refuses it).
"""
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class _BuildExt(build_ext):
    def run(self):
        try:
            super().run()
            if not self.inplace:
                self._copy_to_checkout()
        except Exception:
            if os.environ.get("NONSMOOTH_ALLOW_NO_EXT") == "1":
                print("nonsmooth: C extension skipped (NONSMOOTH_ALLOW_NO_EXT=1)")
                return
            raise

    def _copy_to_checkout(self):
        # Also leave the kernel in the source tree, so tests run from a checkout
        # (``python -m pytest`` imports the sibling folders) load the C build too.
        # A read-only source tree only loses that convenience.
        try:
            self.copy_extensions_to_source()
        except OSError as e:
            print(f"nonsmooth: could not copy the C extension into the source tree ({e})")

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception:
            if os.environ.get("NONSMOOTH_ALLOW_NO_EXT") == "1":
                print(f"nonsmooth: could not build {ext.name}; using the NumPy fallback")
                return
            raise


setup(
    ext_modules=[
        Extension(
            "nonsmooth.solvers._pav",
            sources=["solvers/_pav.c"],
            extra_compile_args=["-O3", "-std=c99"],
        ),
        # Fused perturbed kernels (issue 16): same build rules as _pav (buffer protocol
        # only, no NumPy/torch headers).  -fno-math-errno makes sqrt one instruction;
        # -std=c99 keeps floating-point contraction off (the Triton kernels replay the
        # same IEEE sequence).
        Extension(
            "nonsmooth.solvers._perturb_c",
            sources=["solvers/_perturb_kernels.c"],
            extra_compile_args=["-O3", "-std=c99", "-fno-math-errno"],
            extra_link_args=["-pthread"],
        ),
    ],
    cmdclass={"build_ext": _BuildExt},
)
