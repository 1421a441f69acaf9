"""The `frcnn-bench` command line: help texts from Config's comments, boolean switches, the
benchmark's flags from Config, lazy imports, and the usage and exit status of the command itself.
No training: parsing and --help only."""

import argparse
import dataclasses
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import cli
from pipeline.config import Config, add_arguments, resolve

ROOT = Path(__file__).resolve().parents[1]
FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def comments_of_fields() -> dict[str, str]:
    """Each field's comment read off the lines of Config's source: the comment at the end of its own
    line, or else the comment lines above it (other fields may lie between; a blank line ends the
    search)."""
    lines = inspect.getsource(Config).splitlines()
    comments = {}
    for i, line in enumerate(lines):
        field = re.match(r"\s+(\w+): .+ = ", line)
        if not field:
            continue
        if "  # " in line:
            comments[field.group(1)] = line.split("  # ", 1)[1]
            continue
        found, above = [], i - 1
        while above >= 0 and lines[above].strip() and not lines[above].strip().startswith("#"):
            above -= 1
        while above >= 0 and lines[above].strip().startswith("#"):
            found.insert(0, lines[above].strip().lstrip("#"))
            above -= 1
        comments[field.group(1)] = " ".join(found)
    return comments


def config_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test")
    add_arguments(parser)
    return parser


def helps(parser: argparse.ArgumentParser) -> dict[str, str]:
    return {action.dest: action.help for action in parser._actions}


def test_every_field_has_its_comment_as_help():
    comments, shown = comments_of_fields(), helps(config_parser())
    assert set(comments) == set(FIELDS)
    for name in FIELDS:
        if name == "preset":  # its own help: the list of presets
            assert "pipeline/presets" in shown[name] and "smoke" in shown[name]
            continue
        words = re.findall(r"[A-Za-z_]{4,}", comments[name])
        assert words, f"{name} has no comment in Config"
        missing = [word for word in words if word not in shown[name]]
        assert not missing, f"--{name}'s help {shown[name]!r} lacks {missing} of its comment {comments[name]!r}"
    # A block comment reaches every field of its block that has no comment of its own.
    assert "ray.init(address=...)" in shown["ray_address"]
    assert "shorter side is min_size" in shown["max_size"] and "file://" not in shown["min_size"]
    assert "Where results go" in shown["output_dir"] and "Where results go" not in shown["run_name"]


def test_help_shows_real_defaults_and_formats():
    shown = helps(config_parser())
    assert shown["worker_env"].endswith("(default: {})") and "KEY=VALUE" in shown["worker_env"]
    assert shown["lr_steps"].endswith("(default: 16,22)") and "comma-separated ints" in shown["lr_steps"]
    assert shown["num_workers"].endswith("(default: 8)")
    assert shown["data_root"].endswith("(default: 'data/coco')")
    assert shown["use_gpu"].endswith("(default: True)")
    text = config_parser().format_help()
    assert "_MISSING_TYPE" not in text and "object at 0x" not in text
    assert "--worker-env KEY=VALUE,..." in text and "--lr-steps INT,..." in text


def test_boolean_fields_are_switches_that_leave_presets_alone(capsys):
    parser = config_parser()
    switches = [name for name, f in FIELDS.items() if f.type is bool]
    assert switches == ["use_gpu", "tf32"]
    for name in switches:
        flag = name.replace("_", "-")
        assert getattr(parser.parse_args([f"--{flag}"]), name) is True
        assert getattr(parser.parse_args([f"--no-{flag}"]), name) is False
        assert getattr(parser.parse_args([]), name) is None  # not given: the preset's or Config's value
        with pytest.raises(SystemExit):
            parser.parse_args([f"--{flag}", "false"])
    capsys.readouterr()

    def config(*argv):
        values = vars(parser.parse_args(list(argv)))
        return resolve(values.pop("preset"), **values)

    assert config("--preset", "smoke").use_gpu is False  # smoke.toml: use_gpu = false
    assert config("--preset", "smoke", "--use-gpu").use_gpu is True
    assert config("--preset", "1x8").use_gpu is True
    assert config("--preset", "1x8", "--no-use-gpu").use_gpu is False
    assert config("--preset", "c500-1x8").tf32 is True and config("--preset", "c500-1x8", "--no-tf32").tf32 is False


def test_benchmark_takes_configs_flags_with_its_own_defaults(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["benchmark", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    options = {" ".join(option.split()) for option in re.split(r"\n  (?=-)", text)}  # one per flag, unwrapped
    for flag, default in (("--num-workers INT", "2"), ("--batch-size INT", "2"), ("--min-size INT", "384"),
                          ("--max-size INT", "640"), ("--precision STR", "'fp32'"),
                          ("--use-gpu, --no-use-gpu", "False")):
        assert any(o.startswith(f"{flag} ") and o.endswith(f"(default: {default})") for o in options), flag
    assert any(o.startswith("--num-workers INT Training workers, one per device;") for o in options)  # Config's
    assert "--workers" not in text
    for own in ("--output-dir", "--steps", "--repeats", "--eval-images"):
        assert own in text


def frcnn_bench(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_usage_help_exits_0_on_stdout_errors_exit_2_on_stderr():
    for flag in ("--help", "-h"):
        done = frcnn_bench(flag)
        assert (done.returncode, done.stderr) == (0, ""), flag
        assert done.stdout.startswith("usage: frcnn-bench {run,report,coco,synth,benchmark,acceptance}")
        assert all(f"  {name}" in done.stdout for name in cli.COMMANDS)
    for argv, problem in (((), "no command given"), (("nope",), "unknown command 'nope'")):
        done = frcnn_bench(*argv)
        assert (done.returncode, done.stdout) == (2, ""), argv
        assert done.stderr.startswith("usage: frcnn-bench ")
        assert done.stderr.rstrip().endswith(f"frcnn-bench: error: {problem}")


def test_run_help_imports_neither_ray_nor_torch():
    code = ("import sys\nfrom pipeline import cli\ntry:\n    cli.main(['run', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('ray', 'torch', 'torchvision') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--use-gpu, --no-use-gpu" in done.stdout
    assert done.stdout.splitlines()[-1] == "HEAVY []"


def test_the_driver_imports_neither_torchvision_nor_matplotlib_before_training():
    # torchvision (2 s: torchvision.ops imports torch._dynamo) is the workers'; matplotlib the
    # results'. Both would be start-up time of every run.
    code = ("import sys\nimport pipeline.run\n"
            "print('HEAVY', sorted(m for m in ('torchvision', 'matplotlib') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "HEAVY []"


def test_user_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match=rf"^frcnn-bench: {re.escape(str(tmp_path))}: no result.json"):
        cli.main(["report", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"^frcnn-bench: precision 'fp16' .* is refused"):
        cli.main(["run", "--precision", "fp16"])
    with pytest.raises(SystemExit, match=r"^frcnn-bench: worker_env must be KEY=VALUE"):
        cli.main(["run", "--worker-env", "A"])
