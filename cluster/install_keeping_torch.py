"""Install the project into a python whose PyTorch came from the accelerator's vendor (MetaX's
`torch 2.x+mc...` on MACA, a ROCm or other build), keeping that torch:

    python cluster/install_keeping_torch.py [--lock FILE] [EXTRAS]

e.g. `/opt/conda/bin/python cluster/install_keeping_torch.py` or `... '[test]'`. Run with the
python that has the vendor's torch and torchvision (a virtualenv made with
--system-site-packages sees them too). Before pip runs, it checks that both are installed and
not below the project's floors (pyproject.toml); if not, it ends with one line and changes
nothing. Then `pip install -e ROOT[EXTRAS] -c CONSTRAINTS`, where CONSTRAINTS is the lock
(constraints.txt, or --lock) with torch, torchvision and every installed distribution they
require, transitively (numpy, pillow, the vendor's runtime libraries...), pinned to the versions
installed: pip keeps them or fails, it never replaces them. Afterwards it checks that torch
and torchvision are still the ones it found.
"""

import argparse
import re
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from pipeline import versions  # noqa: E402  (the standard library only: the project is not installed yet)

KEPT = ("torch", "torchvision")


def kept_distributions() -> dict[str, str]:
    """torch, torchvision and the installed distributions they require, transitively: name -> version."""
    found, pending = {}, list(KEPT)
    while pending:
        name = versions.canonical(pending.pop())
        if name in found or (version := versions.installed(name)) is None:
            continue
        found[name] = version
        for requirement in metadata.requires(name) or []:
            if "extra ==" not in requirement:  # an optional extra's requirements are not installed for it
                pending.append(re.match(r"[A-Za-z0-9._-]+", requirement).group())
    return found


def constraints(lock: str, keep: dict[str, str]) -> str:
    """The lock's pins but for the kept distributions, which are pinned as installed."""
    lines = [line for line in lock.splitlines()
             if not line.strip() or line.startswith("#") or versions.canonical(line.split("==")[0]) not in keep]
    return "\n".join(lines + [f"{name}=={version}" for name, version in sorted(keep.items())]) + "\n"


def problem() -> str | None:
    here = f"{sys.executable} (Python {sys.version.split()[0]})"
    absent = [name for name in KEPT if versions.installed(name) is None]
    if absent:
        return (f"{here} has no {' and no '.join(absent)}: install the vendor's torch and its matching torchvision "
                "first (this script keeps them), or use the README's plain install")
    if old := versions.below_floor(KEPT):
        return (f"{here} has {', '.join(old)}, below the project's floor (pyproject.toml); ask the vendor for a "
                "newer build")
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("extras", nargs="?", default="", help="the project's extras, e.g. '[test]'")
    parser.add_argument("--lock", default=str(ROOT / "constraints.txt"),
                        help="the pins for everything else (default: constraints.txt)")
    args = parser.parse_args()
    if found := problem():
        sys.exit(f"frcnn-bench: {found}")
    keep = kept_distributions()
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="constraints-") as file:
        file.write(constraints(Path(args.lock).read_text(), keep))
        file.flush()
        subprocess.run([sys.executable, "-m", "pip", "install", "-e", f"{ROOT}{args.extras}", "-c", file.name],
                       check=True)
    changed = [f"{name} {keep[name]} -> {now}" for name in KEPT if (now := versions.installed(name)) != keep[name]]
    if changed:
        sys.exit(f"frcnn-bench: the install replaced {', '.join(changed)}")
    print(f"installed the project, keeping torch {keep['torch']} and torchvision {keep['torchvision']}")


if __name__ == "__main__":
    main()
