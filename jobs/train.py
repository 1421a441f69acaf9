"""The `ray job submit` entrypoint: `python -m jobs.train [frcnn-bench run flags]`.

Inside a job, RAY_ADDRESS names the job's cluster and the run joins it; started by hand without
RAY_ADDRESS, the same command starts a local Ray, for debugging. Run it from the project's root
(`--working-dir .` makes the job's working directory a copy of it), so that `pipeline` is the
submitted code. The result row ends the job's log; results go to --output-dir, which on a
cluster must be storage every node shares.

A job's `python` is whichever the node's PATH gives (Ray's, when Ray was started from a shell
that had the project's virtualenv first on PATH). Before anything else, the entrypoint checks
that this python can run the project: Python 3.11 and every dependency of pyproject.toml
installed, none below its floor (pipeline/versions.py); if not, it ends with one line naming the
python and what it lacks.
"""

import sys

FIX = ("start Ray from a shell with the project's virtualenv first on PATH, as cluster/two-nodes-8gpu.yaml does, "
       "or submit with a runtime environment that provides them")


def environment_problem() -> str | None:
    """What keeps this python from running the project, or None."""
    here = f"{sys.executable} (Python {sys.version.split()[0]})"
    if sys.version_info[:2] != (3, 11):
        return f"{here} cannot run the project, which needs Python 3.11; {FIX}"
    from pipeline import versions  # the standard library only: nothing of the project's dependencies yet

    lacking = []
    if absent := versions.missing():
        lacking.append(f"{', '.join(absent)} not installed")
    if old := versions.below_floor():
        lacking.append(f"{', '.join(old)} installed")
    if lacking:
        return f"{here} cannot run the project: {'; '.join(lacking)}; {FIX}"
    return None


if __name__ == "__main__":
    problem = environment_problem()
    if problem:
        sys.exit(f"frcnn-bench: {problem}")
    from pipeline.cli import main

    main(["run", *sys.argv[1:]])
