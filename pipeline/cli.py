"""The `frcnn-bench` command: `run` trains and writes a result; `synth` writes a synthetic data set;
`benchmark` compares this pipeline with a plain DataLoader + DDP baseline."""

import argparse
import sys

from pipeline import config as config_module
from pipeline import synthetic
from pipeline.manifest import AnnotationError
from pipeline.model import WeightsError
from pipeline.preflight import PreflightError

# Problems with what the user gave: one line naming it, no traceback.
USER_ERRORS = (config_module.ConfigError, AnnotationError, WeightsError, PreflightError, FileExistsError)


def _run(argv: list[str]) -> None:
    from pipeline.run import TrainingFailed, run  # imports Ray and torch: only for this command

    parser = argparse.ArgumentParser(prog="frcnn-bench run", description="train Faster R-CNN with Ray and "
                                     "write the result row")
    config_module.add_arguments(parser)
    args = vars(parser.parse_args(argv))
    config = config_module.resolve(args.pop("preset"), **args)
    try:
        result = run(config)
    except TrainingFailed as error:
        sys.exit(f"frcnn-bench: training failed: {error}")
    print("\nepoch  mean loss  bbox mAP")
    for epoch, (loss, score) in enumerate(zip(result["loss_per_epoch"], result["map_per_epoch"])):
        print(f"{epoch:5d}  {loss:9.3f}  {score:8.3f}")
    print(f"\nresults in {result['run_dir']}\n")
    print(open(f"{result['run_dir']}/row.md").read(), end="")


def _benchmark(argv: list[str]) -> None:
    from pipeline import benchmark  # imports Ray and torch: only for this command

    benchmark.main(argv)


COMMANDS = {
    "run": (_run, "train Faster R-CNN with Ray and write the result row"),
    "synth": (synthetic.main, "write a synthetic COCO 2017-format data set"),
    "benchmark": (_benchmark, "this pipeline against a plain DataLoader + DDP baseline"),
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        lines = [f"usage: frcnn-bench {{{','.join(COMMANDS)}}} [--help | options]", __doc__, ""]
        lines += [f"  {name:10s} {help}" for name, (_, help) in COMMANDS.items()]
        sys.exit("\n".join(lines))
    try:
        COMMANDS[argv[0]][0](argv[1:])
    except USER_ERRORS as e:
        sys.exit(f"frcnn-bench: {e}")


if __name__ == "__main__":
    main()
