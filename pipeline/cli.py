"""The `frcnn-bench` command: `run` trains and writes a result; `report` builds the FlagPerf table of
several runs; `synth` writes a synthetic data set; `benchmark` compares this pipeline with a plain
DataLoader + DDP baseline."""

import argparse
import sys

from pipeline import config as config_module

# Problems with what the user gave: one line naming it, no traceback. By module, so that a command
# imports only what it uses (see `user_errors`); FileExistsError is the builtin.
USER_ERRORS = {"pipeline.config": "ConfigError", "pipeline.data.manifest": "AnnotationError",
               "pipeline.worker.weights": "WeightsError", "pipeline.preflight": "PreflightError",
               "pipeline.records.report": "ReportError", "pipeline.data.coco": "CocoError"}


def user_errors() -> tuple[type[BaseException], ...]:
    """The classes of USER_ERRORS whose modules are imported: one the command did not import raised nothing."""
    return (FileExistsError, *(getattr(sys.modules[module], name) for module, name in USER_ERRORS.items()
                               if module in sys.modules))


def _run(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="frcnn-bench run", description="train Faster R-CNN with Ray and "
                                     "write the result row")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own output (worker logs, Ray Data progress, warnings) as well")
    config_module.add_arguments(parser)
    args = vars(parser.parse_args(argv))
    verbose = args.pop("verbose")
    config = config_module.resolve(args.pop("preset"), **args)
    from pipeline.records.results import summary
    from pipeline.run import TrainingFailed, run  # imports Ray and torch: only for this command, after --help

    try:
        result = run(config, verbose=verbose, progress=sys.stdout)
    except TrainingFailed as error:
        hint = "" if verbose else " (tracebacks: rerun with --verbose, or Ray's logs, /tmp/ray/session_latest/logs)"
        sys.exit(f"frcnn-bench: training failed: {error}{hint}")
    print(f"\n{summary(result)}", end="")


def _benchmark(argv: list[str]) -> None:
    from pipeline.bench import benchmark  # imports Ray and torch: only for this command

    benchmark.main(argv)


def _acceptance(argv: list[str]) -> None:
    from pipeline.bench import acceptance  # imports torch: only for this command

    acceptance.main(argv)


def _report(argv: list[str]) -> None:
    from pipeline.records import report  # numpy, pyarrow, matplotlib; neither Ray nor torch

    report.main(argv)


def _coco(argv: list[str]) -> None:
    from pipeline.data import coco

    coco.main(argv)


def _synth(argv: list[str]) -> None:
    from pipeline.data import synthetic  # imports torchvision (torch): only for this command

    synthetic.main(argv)


COMMANDS = {
    "run": (_run, "train Faster R-CNN with Ray and write the result row"),
    "report": (_report, "the FlagPerf table, with scaling efficiency, of several runs' results"),
    "coco": (_coco, "download, check and unpack COCO 2017 into the layout `run` reads"),
    "synth": (_synth, "write a synthetic COCO 2017-format data set"),
    "benchmark": (_benchmark, "this pipeline against a plain DataLoader + DDP baseline"),
    "acceptance": (_acceptance, "the GPU acceptance run: fp32 and amp (and 1x2 NCCL) checked on a CUDA machine"),
}


def usage() -> str:
    lines = [f"usage: frcnn-bench {{{','.join(COMMANDS)}}} [--help | options]", "", __doc__, ""]
    return "\n".join(lines + [f"  {name:10s} {help}" for name, (_, help) in COMMANDS.items()])


def main(argv: list[str] | None = None) -> None:
    """As argparse does: --help prints the usage to stdout (exit 0); no command or an unknown one
    prints it to stderr with the error (exit 2)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return
    if not argv or argv[0] not in COMMANDS:
        problem = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(f"{usage()}\n\nfrcnn-bench: error: {problem}", file=sys.stderr)
        sys.exit(2)
    try:
        COMMANDS[argv[0]][0](argv[1:])
    except user_errors() as e:  # evaluated once an exception is raised: after the command's imports
        sys.exit(f"frcnn-bench: {e}")


if __name__ == "__main__":
    main()
