"""The cluster configurations in cluster/: the Ray launcher YAML goes through Ray's own
validation (as `ray up` does), the KubeRay RayJob has the fields KubeRay requires, both run
the same entrypoint, and the image the RayJob runs (cluster/Dockerfile) is built on the Ray that
constraints.txt pins and the Python that pyproject.toml admits. No Ray cluster is started, no image is built."""

import copy
import re
import shlex
import tomllib
from pathlib import Path

import click
import jsonschema
import pytest
import yaml
from packaging.specifiers import SpecifierSet
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "two-nodes-8gpu.yaml"
RAYJOB = CLUSTER / "rayjob-2x8.yaml"
DOCKERFILE = CLUSTER / "Dockerfile"
ENTRYPOINT_PREFIX = ["python", "-m", "jobs.train", "--preset", "a100-2x8"]
SHARED = "/mnt/shared"


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return yaml.safe_load(RAYJOB.read_text())


def submit_command() -> list[str]:
    """The `# submit:` comment line of the launcher YAML, as argv."""
    lines = [line for line in LAUNCHER.read_text().splitlines() if line.startswith("# submit:")]
    assert len(lines) == 1, "the launcher YAML documents exactly one `# submit:` line"
    return shlex.split(lines[0].removeprefix("# submit:"))


def after_dashdash(argv: list[str]) -> list[str]:
    assert "--" in argv, argv
    return argv[argv.index("--") + 1:]


def pinned_ray() -> str:
    """X of constraints.txt's `ray==X`, the Ray the project is developed and measured with."""
    (version,) = [line.split("==")[1] for line in (ROOT / "constraints.txt").read_text().splitlines()
                  if line.startswith("ray==")]
    return version


def pinned_python_minor() -> str:
    """The one Python minor (e.g. "3.11") that pyproject.toml's requires-python admits."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    spec = SpecifierSet(project["requires-python"])
    minors = [f"3.{m}" for m in range(30)
              if spec.contains(f"3.{m}.0") and spec.contains(f"3.{m}.99")]
    assert len(minors) == 1, f"requires-python {spec} admits one minor, not {minors}"
    return minors[0]


def dockerfile(text: str | None = None) -> list[tuple[str, str]]:
    """cluster/Dockerfile's instructions as (INSTRUCTION, arguments), comments dropped and
    continuation lines joined."""
    text = DOCKERFILE.read_text() if text is None else text
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in joined.splitlines() if line.strip()]


BASE_TAG = re.compile(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py(?P<py>3\d+)-(?P<platform>\S+)")


def base_image(text: str | None = None) -> re.Match:
    froms = [args for instruction, args in dockerfile(text) if instruction == "FROM"]
    assert len(froms) == 1, f"one stage, one FROM: {froms}"
    match = BASE_TAG.fullmatch(froms[0])
    assert match, f"FROM {froms[0]!r} is not a rayproject/ray:<ray>-py<python>-<platform> tag"
    return match


def readme_image() -> str:
    """The -t of the README's `docker build -f cluster/Dockerfile` line."""
    builds = [shlex.split(line.strip()) for line in (ROOT / "README.md").read_text().splitlines()
              if line.strip().startswith("docker build")]
    assert len(builds) == 1, builds
    (argv,) = builds
    assert argv[argv.index("-f") + 1] == "cluster/Dockerfile" and argv[-1] == ".", argv
    return argv[argv.index("-t") + 1]


def repository(image: str) -> str:
    """`frcnn-ray-bench` of `<registry>/frcnn-ray-bench:<version>`."""
    name = image.rsplit("/", 1)[-1]
    return name.split(":", 1)[0]


# --- Ray cluster launcher -------------------------------------------------------------------


def test_launcher_passes_ray_validation(launcher):
    # What `ray up` does (ray.autoscaler._private.commands._bootstrap_config).
    prepared = prepare_config(copy.deepcopy(launcher))
    validate_config(prepared)
    # The local provider turned the ip lists into its single node type: head + 1 worker, both
    # always up.
    (node_type,) = prepared["available_node_types"].values()
    assert node_type["min_workers"] == node_type["max_workers"] == 1


@pytest.mark.parametrize("extra, error", [
    ({"target_utilization_fraction": 0.8}, jsonschema.ValidationError),  # legacy top-level key
    ({"initial_workers": 1}, jsonschema.ValidationError),  # legacy top-level key
    ({"not_a_ray_key": True}, jsonschema.ValidationError),
    ({"available_node_types": {"gpu": {"node_config": {}, "resources": {"GPU": 8}}}},
     click.ClickException),  # rejected by the on-premise (local) provider
])
def test_launcher_validation_is_real(launcher, extra, error):
    bad = {**copy.deepcopy(launcher), **extra}
    with pytest.raises(error):
        validate_config(prepare_config(bad))


def test_launcher_two_local_nodes(launcher):
    provider = launcher["provider"]
    assert provider["type"] == "local"
    assert isinstance(provider["head_ip"], str) and provider["head_ip"]
    assert len(provider["worker_ips"]) == 1
    assert provider["head_ip"] not in provider["worker_ips"]
    assert launcher["auth"]["ssh_user"]


def test_launcher_installs_the_project_on_each_node(launcher):
    remote_dir, token = launcher["file_mounts"]
    assert remote_dir == "~/frcnn-ray-bench" and launcher["file_mounts"][remote_dir] == "."
    assert any("pip install -e . -c constraints.txt" in c and remote_dir in c for c in launcher["setup_commands"])
    # setup_commands run on the head and on the worker.
    prepared = prepare_config(copy.deepcopy(launcher))
    for key in ("head_setup_commands", "worker_setup_commands"):
        assert any("pip install -e" in c for c in prepared[key]), key


@pytest.mark.parametrize("key", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_launcher_start_commands(launcher, key):
    commands = launcher[key]
    starts = [c for c in commands if "ray start" in c]
    assert len(starts) == 1, commands
    start = starts[0]
    assert "--num-gpus=8" in start
    assert ".venv/bin/ray start" in start  # the venv's ray, installed by setup_commands
    assert any("ray stop" in c for c in commands[:commands.index(start)])
    assert re.search(r"export [^;]*\bRAY_AUTH_MODE=token\b[^;]*;", start)  # token authentication on every node
    if key == "head_start_ray_commands":
        for flag in ("--head", "--port=6379", "--dashboard-host=0.0.0.0",
                     "--autoscaling-config=~/ray_bootstrap_config.yaml"):
            assert flag in start
    else:
        assert "--address=$RAY_HEAD_IP:6379" in start


def test_launcher_token_is_the_users_own_and_reaches_both_nodes(launcher):
    """The token is generated outside the repository, copied to where Ray reads it on each node,
    and made readable by its owner only."""
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert "chmod 600 ~/.ray/auth_token" in launcher["setup_commands"]
    assert "ray get-auth-token --generate" in LAUNCHER.read_text()
    assert not list(ROOT.glob("**/auth_token"))


def test_launcher_documents_submit_command():
    argv = submit_command()
    assert argv[:3] == ["ray", "job", "submit"]
    assert argv[argv.index("--address") + 1] == "http://<head_ip>:8265"
    assert argv[argv.index("--working-dir") + 1] == "."
    entrypoint = after_dashdash(argv)
    assert entrypoint[:5] == ENTRYPOINT_PREFIX
    assert entrypoint[entrypoint.index("--data-root") + 1] == f"{SHARED}/coco"
    assert entrypoint[entrypoint.index("--output-dir") + 1] == f"{SHARED}/frcnn-results"


# --- KubeRay RayJob ---------------------------------------------------------------------------


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def shared_mounts(group: dict) -> list[str]:
    """Mount paths of the group's first container that come from a PersistentVolumeClaim."""
    pod = group["template"]["spec"]
    claims = {v["name"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v}
    return [m["mountPath"] for m in containers(group)[0].get("volumeMounts", []) if m["name"] in claims]


def test_rayjob_kind_and_job_fields(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    assert rayjob["kind"] == "RayJob"
    assert rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert shlex.split(spec["entrypoint"])[:5] == ENTRYPOINT_PREFIX
    assert spec["entrypoint"].startswith("python -m jobs.train --preset a100-2x8")
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and runtime_env["working_dir"]


def test_rayjob_cluster_spec(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == pinned_ray()
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert containers(head)[0]["name"] and containers(head)[0]["image"]

    (workers,) = cluster["workerGroupSpecs"]
    assert workers["groupName"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 2
    assert isinstance(workers["rayStartParams"], dict)
    worker = containers(workers)[0]
    assert worker["name"] and worker["image"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == 8

    # KubeRay's rayStartParams is map[string]string: a bare number would be refused.
    for group in (head, workers):
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())


def test_rayjob_token_authentication_from_a_secret(rayjob):
    """KubeRay's authOptions (RayClusterSpec: mode, secretName; the Secret's key is auth_token),
    with the Secret's creation documented in the manifest."""
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": "frcnn-ray-token"}
    assert "kubectl create secret generic frcnn-ray-token --from-literal=auth_token=" in RAYJOB.read_text()


def test_rayjob_shared_volume_in_head_and_workers(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        assert SHARED in shared_mounts(group)


# --- both ---------------------------------------------------------------------------------


def test_same_entrypoint_in_both(rayjob):
    assert shlex.split(rayjob["spec"]["entrypoint"]) == after_dashdash(submit_command())


# --- the image: cluster/Dockerfile ----------------------------------------------------------


def check_base_matches_pins(text: str | None = None) -> None:
    base = base_image(text)
    python = pinned_python_minor().replace(".", "")
    assert base["ray"] == pinned_ray(), "FROM's Ray is pyproject.toml's ray pin: bump them together"
    assert base["py"] == python, "FROM's Python is the minor of pyproject.toml's requires-python"
    # An explicit CUDA, not the `-gpu` alias (Ray's default CUDA, which moves between releases).
    assert re.fullmatch(r"cu\d{3}", base["platform"]), f"explicit CUDA tag: {base['platform']}"


def test_dockerfile_base_is_the_pinned_ray_and_python():
    check_base_matches_pins()


@pytest.mark.parametrize("from_line, error", [
    ("FROM rayproject/ray:2.57.0-py311-cu130", "FROM's Ray"),
    ("FROM rayproject/ray:2.58.0-py312-cu130", "FROM's Python"),
    ("FROM rayproject/ray:2.58.0-py311-gpu", "explicit CUDA"),
    ("FROM rayproject/ray:2.58.0-py311-cu130\nFROM rayproject/ray:2.58.0-py311-cu130", "one FROM"),
])
def test_dockerfile_base_check_is_real(from_line, error):
    text = re.sub(r"(?m)^FROM .*$", lambda _: from_line, DOCKERFILE.read_text())
    with pytest.raises(AssertionError, match=error):
        check_base_matches_pins(text)


def test_dockerfile_runs_as_ray_and_installs_at_the_jobs_working_dir(rayjob):
    instructions = dockerfile()
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users and users[-1] == "ray", "the image runs as Ray's non-root user"
    (workdir,) = [args for instruction, args in instructions if instruction == "WORKDIR"]
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert workdir == runtime_env["working_dir"] == "/home/ray/frcnn-ray-bench"
    copied = [shlex.split(args) for instruction, args in instructions if instruction == "COPY"]
    sources = {src.rstrip("/") for argv in copied
               for src in [a for a in argv if not a.startswith("--")][:-1]}
    assert {"pyproject.toml", "README.md", "pipeline", "jobs"} <= sources
    assert all((ROOT / src).exists() for src in sources), sources
    assert any(instruction == "RUN" and "pip install --no-cache-dir ." in args
               for instruction, args in instructions)


def test_rayjob_runs_the_image_the_readme_builds(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    images = {containers(group)[0]["image"]
              for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"])}
    (image,) = images  # head and workers run the same image
    assert repository(image) == repository(readme_image()) == "frcnn-ray-bench"
    assert not image.startswith("rayproject/"), "the image with the project, not Ray's bare one"
