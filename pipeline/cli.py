"""The `frcnn-bench` command: `run` trains and writes a result; `synth` writes a synthetic data set."""

import argparse
import sys

from pipeline import config as config_module
from pipeline import synthetic
from pipeline.manifest import AnnotationError
from pipeline.model import WeightsError
from pipeline.preflight import PreflightError

# Problems with what the user gave: one line naming it, no traceback.
USER_ERRORS = (config_module.ConfigError, AnnotationError, WeightsError, PreflightError, FileExistsError)


def _run(args: argparse.Namespace) -> None:
    from pipeline.run import run  # imports Ray and torch: only for this command

    overrides = {k: v for k, v in vars(args).items() if k not in ("command", "func", "preset")}
    config = config_module.resolve(args.preset, **overrides)
    result = run(config)
    print("\nepoch  mean loss  bbox mAP")
    for epoch, (loss, score) in enumerate(zip(result["loss_per_epoch"], result["map_per_epoch"])):
        print(f"{epoch:5d}  {loss:9.3f}  {score:8.3f}")
    print(f"\nresults in {result['run_dir']}\n")
    print(open(f"{result['run_dir']}/row.md").read(), end="")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="frcnn-bench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="train Faster R-CNN with Ray and write the result row")
    config_module.add_arguments(run_parser)
    run_parser.set_defaults(func=_run)
    synth_parser = commands.add_parser("synth", help="write a synthetic COCO 2017-format data set")
    synth_parser.add_argument("argv", nargs=argparse.REMAINDER)
    synth_parser.set_defaults(func=lambda args: synthetic.main(args.argv))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as e:
        sys.exit(f"frcnn-bench: {e}")


if __name__ == "__main__":
    main()
