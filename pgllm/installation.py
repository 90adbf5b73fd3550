"""What a PostgreSQL installation and pg_llm's control file say: the one reader of each, which
the embedded cluster (cluster.py), the extension's build (extension.py) and the tests ask."""

from __future__ import annotations

import subprocess
from pathlib import Path

from .errors import PgllmError


def pg_config_values(pg_config: Path) -> dict[str, str]:
    keys = ["bindir", "sharedir", "pkglibdir", "includedir", "includedir-server", "version"]
    try:
        out = subprocess.run([str(pg_config)] + [f"--{k}" for k in keys], check=True,
                             capture_output=True, text=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError) as e:
        raise PgllmError(f"cannot run {pg_config}: {e}") from None
    return dict(zip(keys, out))


def control_file_version(control: Path) -> str:
    """default_version of an extension control file."""
    for line in control.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "default_version":
            return value.strip().strip("'")
    raise PgllmError(f"{control} has no default_version")
