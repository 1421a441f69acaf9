"""The project's dependencies (pyproject.toml) against what a python has installed, with the
standard library only: it runs before the project is installed or imported
(cluster/install_keeping_torch.py, jobs/train.py).

A dependency is `name` or `name>=floor` (the oldest release the code works with, found as
docs/performance.md, "Dependency floors", says); local version labels are ignored in the
comparison, so a vendor's `2.4.0+mc2.29` is 2.4.0.
"""

import re
import tomllib
from importlib import metadata
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def canonical(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version: "2.4.0+mc2.29" -> (2, 4, 0), "2.3" -> (2, 3, 0)."""
    numbers = [int(part) for part in re.match(r"\d+(?:\.\d+)*", version).group().split(".")]
    return tuple(numbers + [0] * (3 - len(numbers)))


def floors(pyproject: Path = PYPROJECT) -> dict[str, str | None]:
    """Each dependency's name and floor (None where it has none)."""
    found = {}
    for requirement in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        name, floor = re.match(r"([A-Za-z0-9._-]+)(?:\[[^\]]*\])?\s*(?:>=\s*([0-9.]+))?", requirement).groups()
        found[name] = floor
    return found


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def below_floor(names=None, pyproject: Path = PYPROJECT) -> list[str]:
    """The dependencies (of `names`, default all) installed below their floor, as "torch
    2.0.0+mc2.18 (the floor is 2.3.0)"."""
    return [f"{name} {version} (the floor is {floor})" for name, floor in floors(pyproject).items()
            if (names is None or name in names) and floor and (version := installed(name))
            and release(version) < release(floor)]


def missing(pyproject: Path = PYPROJECT) -> list[str]:
    return [name for name in floors(pyproject) if installed(name) is None]
