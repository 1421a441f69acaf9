"""The `frcnn-bench` command: `run` trains and writes a result; `report` builds the FlagPerf table of
several runs; `synth` writes a synthetic data set; `benchmark` compares this pipeline with a plain
DataLoader + DDP baseline."""

import argparse
import sys

from pipeline import config as config_module
from pipeline import coco, report, synthetic
from pipeline.manifest import AnnotationError
from pipeline.model import WeightsError
from pipeline.preflight import PreflightError
from pipeline.report import ReportError

# Problems with what the user gave: one line naming it, no traceback.
USER_ERRORS = (config_module.ConfigError, AnnotationError, WeightsError, PreflightError, FileExistsError, ReportError,
               coco.CocoError)


def _run(argv: list[str]) -> None:
    from pipeline.results import summary
    from pipeline.run import TrainingFailed, run  # imports Ray and torch: only for this command

    parser = argparse.ArgumentParser(prog="frcnn-bench run", description="train Faster R-CNN with Ray and "
                                     "write the result row")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own output (worker logs, Ray Data progress, warnings) as well")
    config_module.add_arguments(parser)
    args = vars(parser.parse_args(argv))
    verbose = args.pop("verbose")
    config = config_module.resolve(args.pop("preset"), **args)
    try:
        result = run(config, verbose=verbose, progress=sys.stdout)
    except TrainingFailed as error:
        hint = "" if verbose else " (tracebacks: rerun with --verbose, or Ray's logs, /tmp/ray/session_latest/logs)"
        sys.exit(f"frcnn-bench: training failed: {error}{hint}")
    print(f"\n{summary(result)}", end="")


def _benchmark(argv: list[str]) -> None:
    from pipeline import benchmark  # imports Ray and torch: only for this command

    benchmark.main(argv)


def _acceptance(argv: list[str]) -> None:
    from pipeline import acceptance  # imports torch: only for this command

    acceptance.main(argv)


COMMANDS = {
    "run": (_run, "train Faster R-CNN with Ray and write the result row"),
    "report": (report.main, "the FlagPerf table, with scaling efficiency, of several runs' results"),
    "coco": (coco.main, "download, check and unpack COCO 2017 into the layout `run` reads"),
    "synth": (synthetic.main, "write a synthetic COCO 2017-format data set"),
    "benchmark": (_benchmark, "this pipeline against a plain DataLoader + DDP baseline"),
    "acceptance": (_acceptance, "the GPU acceptance run: fp32 and amp (and 1x2 NCCL) checked on a CUDA machine"),
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
