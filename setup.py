"""Only here to build the C extension (PAV isotonic regression).

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
        except Exception:
            if os.environ.get("NONSMOOTH_ALLOW_NO_EXT") == "1":
                print("nonsmooth: C extension skipped (NONSMOOTH_ALLOW_NO_EXT=1)")
                return
            raise

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
        )
    ],
    cmdclass={"build_ext": _BuildExt},
)
