"""Loads the optional C++ core ``dtr._C``; the pure-Python pool is used without it."""
import functools
import warnings

import torch  # noqa: F401  (must be imported before the extension)

try:
    from . import _C  # type: ignore[attr-defined]
except ImportError as _exc:  # pragma: no cover - depends on the build
    _C = None
    _IMPORT_ERROR = _exc
    warnings.warn(
        "dtr: C++ extension dtr._C is not built; using the pure-Python pool "
        "(build it with `pip install --no-build-isolation -e .`)",
        RuntimeWarning,
        stacklevel=2,
    )


def available() -> bool:
    return _C is not None


@functools.lru_cache(maxsize=None)
def native_policies():
    """The policies the C++ pool scores itself (fixed when the extension is built)."""
    if _C is None or not hasattr(_C, "native_policies"):
        return ()
    return tuple(_C.native_policies())


def CppPool(policy, search):  # noqa: N802 - factory standing in for a class
    from .cpp_pool import CppPool as _CppPool

    return _CppPool(policy, search)
