"""The `ray job submit` entrypoint: `python -m jobs.train [frcnn-bench run flags]`.

Inside a job, RAY_ADDRESS names the job's cluster and the run joins it; started by hand without
RAY_ADDRESS, the same command starts a local Ray, for debugging. Run it from the project's root
(`--working-dir .` makes the job's working directory a copy of it), so that `pipeline` is the
submitted code. The result row ends the job's log; results go to --output-dir, which on a
cluster must be storage every node shares.

A job's `python` is whichever the node's PATH gives (Ray's, when Ray was started from a shell
that had the project's virtualenv first on PATH). Before anything else, the entrypoint checks
that this python can run the project: Python 3.11 and every dependency of pyproject.toml
installed; if not, it ends with one line naming the python and what it lacks.
"""

import re
import sys
from importlib import metadata
from pathlib import Path

FIX = ("start Ray from a shell with the project's virtualenv first on PATH, as cluster/two-nodes-8gpu.yaml does, "
       "or submit with a runtime environment that provides them")


def environment_problem() -> str | None:
    """What keeps this python from running the project, or None."""
    here = f"{sys.executable} (Python {sys.version.split()[0]})"
    if sys.version_info[:2] != (3, 11):
        return f"{here} cannot run the project, which needs Python 3.11; {FIX}"
    import tomllib

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    missing = []
    for requirement in project["dependencies"]:
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group()
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    if missing:
        return f"{here} cannot run the project: {', '.join(missing)} not installed; {FIX}"
    return None


if __name__ == "__main__":
    problem = environment_problem()
    if problem:
        sys.exit(f"frcnn-bench: {problem}")
    from pipeline.cli import main

    main(["run", *sys.argv[1:]])
