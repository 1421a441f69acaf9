"""The `ray job submit` entrypoint: `python -m jobs.train [frcnn-bench run flags]`.

Inside a job, RAY_ADDRESS names the job's cluster and the run joins it; started by hand without
RAY_ADDRESS, the same command starts a local Ray, for debugging. Run it from the project's root
(`--working-dir .` makes the job's working directory a copy of it), so that `pipeline` is the
submitted code. The result row ends the job's log; results go to --output-dir, which on a
cluster must be storage every node shares.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    main(["run", *sys.argv[1:]])
