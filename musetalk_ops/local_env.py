"""The ``.env`` file of a local checkout: the environment `make demo` used, for the commands after it.

``dagster dev`` loads ``.env`` from its working directory into its own environment and its code
servers', so the UI, the daemon and the runs see the same ``DAGSTER_HOME`` and ``MUSETALK_MODELS`` as
the demo did; ``musetalk serve``, ``musetalk submit`` and ``musetalk stats`` read it the same way.
Variables already set win over the file.
"""

import os
from pathlib import Path

from musetalk_ops.files import write_atomic

ENV_FILE = Path(".env")
HEADER = "# Written by `make demo`: the local environment (dagster dev, musetalk serve, submit, stats).\n"


def read_env_file(path: Path = ENV_FILE) -> dict[str, str]:
    """``KEY=VALUE`` lines of ``path`` (comments and blank lines skipped); {} when there is none."""
    if not path.is_file():
        return {}
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    return {key.strip(): value.strip() for key, value in pairs if not key.lstrip().startswith("#")}


def load_env_file(path: Path = ENV_FILE) -> None:
    """Set the variables of ``path`` that are not set yet."""
    for key, value in read_env_file(path).items():
        os.environ.setdefault(key, value)


def write_env_file(values: dict[str, str], path: Path = ENV_FILE) -> None:
    """Merge ``values`` into ``path``, keeping the variables it already names (written atomically)."""

    merged = {**read_env_file(path), **values}
    text = HEADER + "".join(f"{key}={value}\n" for key, value in merged.items())
    write_atomic(path, lambda f: f.write(text.encode()))
