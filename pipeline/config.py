"""The run configuration: one typed dataclass whose defaults are the FlagPerf reference recipe.

A preset is a small TOML overlay in `pipeline/presets/` (`key = value` lines naming fields below;
`base = "other"` applies another preset first); command-line flags go on top. The resolved
config is saved in every result.
"""

import argparse
import ast
import dataclasses
import inspect
import io
import tokenize
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

PRESETS = Path(__file__).parent / "presets"
PRECISIONS = ("fp32", "amp", "bf16")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_SPREAD")
# CPUs of a GPU worker when cpus_per_worker is 0 (see the field).
GPU_WORKER_CPUS = 4
# torchvision's recipe: lr 0.02 for 16 images a step (8 GPUs x 2 images).
REFERENCE_LR, REFERENCE_IMAGES_PER_STEP = 0.02, 16


@dataclass(frozen=True)
class Config:
    # Every field is also a command-line flag (--data-root for data_root, ...), whose help is the
    # field's comment: the comment at the end of its line, or else the block of comment lines above it.

    # The data set: COCO 2017's layout (train2017/, val2017/, annotations/) under this folder.
    data_root: str = "data/coco"
    # > 0: generate (or reuse) a synthetic COCO-format set of this many training images at data_root.
    synthetic_train_images: int = 0
    synthetic_val_images: int = 0  # The synthetic set's val images.
    synthetic_image_size: int = 160  # The synthetic images' longer side in pixels (+-25%).

    # Where results go: <output_dir>/<run_name>/.
    output_dir: str = "results"
    run_name: str = ""  # The run's folder name; by default the preset and a timestamp.
    preset: str = ""  # The preset applied (set by --preset).
    # Ray: "" joins the cluster of RAY_ADDRESS (which `ray job submit` sets) or, without it, starts
    # a fresh local Ray; any other value goes to ray.init(address=...), e.g. "auto".
    ray_address: str = ""

    # Training workers, one per device; 0 runs the loop in the driver process (debugging).
    num_workers: int = 8
    use_gpu: bool = True  # A GPU per worker; off: CPU workers.
    # How many nodes the workers need (num_workers / nodes devices each), checked before training.
    nodes: int = 1
    # Ray Train's placement of the workers: PACK fills a node before the next, SPREAD spreads them
    # where it can, STRICT_SPREAD puts each on a node of its own (a restart waits for as many nodes).
    placement_strategy: str = "PACK"
    # Environment variables of the training worker processes (vendor switches, OMP_NUM_THREADS).
    worker_env: dict[str, str] = field(default_factory=dict)
    # CPUs Ray reserves for each training worker, which are its torch threads (OMP_NUM_THREADS in
    # worker_env, when set, is the thread count instead); the node's other CPUs decode images in
    # Ray Data. 0 means 1 for a CPU worker and 4 for a GPU worker, whose process needs a few cores
    # (its loop, the batch puller, DDP's reducer, the CPU side of a step) and no more: 8 GPU
    # workers then take 32 of a node's cores and leave the rest to decoding.
    cpus_per_worker: int = 0

    # Backbone weights: "imagenet" (torchvision's file, from its URL), an http(s):// URL (a mirror), a
    # local path, a file:// URL, or "none" (random init). A URL's file is downloaded once, by the
    # driver, into weights_cache; the workers load that file and never download.
    backbone_weights: str = "imagenet"
    # The folder every node sees where the driver keeps downloaded backbone weights ("" is
    # <output_dir>/.weights); a file there that matches the hash in its name is not downloaded again.
    weights_cache: str = ""
    # The model's transform resizes each image so that its shorter side is min_size and its longer
    # side at most max_size (torchvision's fasterrcnn_resnet50_fpn, 91 classes).
    min_size: int = 800
    max_size: int = 1333
    # RoIs sampled per image for the box head's loss (torchvision's 512). The box head's cost does
    # not shrink with the image, so small CPU runs lower it.
    box_batch_size_per_image: int = 512

    # The recipe: torchvision's references/detection, as FlagPerf runs it.

    batch_size: int = 2  # Images per worker and step.
    # The base learning rate; 0 means the linear rule: 0.02 x (batch_size x workers) / 16.
    lr: float = 0.0
    momentum: float = 0.9  # SGD's momentum.
    weight_decay: float = 1e-4  # SGD's weight decay.
    # Epoch 0's linear warm-up: the lr rises from warmup_factor x lr to lr over warmup_iters steps.
    warmup_factor: float = 1.0 / 1000
    warmup_iters: int = 1000
    # The lr is multiplied by lr_gamma at the start of each of these epochs.
    lr_steps: tuple[int, ...] = (16, 22)
    lr_gamma: float = 0.1
    max_epochs: int = 26  # The run stops after this many epochs, or once it reaches target_map.
    target_map: float = 0.36  # The bbox mAP at which the run has converged and stops.
    # fp32, amp (fp16 autocast with loss scaling) or bf16 (bf16 autocast).
    precision: str = "fp32"
    # TF32 for the fp32 matmuls and convolutions of CUDA devices (torch.backends.cuda.matmul and
    # torch.backends.cudnn allow_tf32, set in every worker; the row's precision then reads
    # "fp32 (tf32)"). Off by default: every fp32 product in full fp32, where PyTorch's own default
    # computes convolutions in TF32 and matmuls not. CPUs have no TF32 and ignore it.
    tf32: bool = False
    # Gradient-norm clipping; 0 is off, as in the reference. Randomly initialised short runs
    # (the demo) diverge without it.
    clip_grad_norm: float = 0.0
    seed: int = 0  # The model's initialisation and the shuffling of every epoch.
    # The row's fix_hp column: hyper-parameters changed from the reference, e.g. "bs=16,lr=0.16".
    fix_hp: str = "/"

    # The device's peak TFLOP/s at the run's precision, for the utilisation figure; 0 takes it from
    # the table of known devices in pipeline/worker/flops.py (utilisation null for a device not there).
    peak_tflops: float = 0.0

    # Restarts of the worker group from the last epoch checkpoint after a worker dies (0: fail).
    max_failures: int = 0
    # Images that cannot be decoded (or whose size differs from the annotations') are left out
    # and listed in the result; more than this many in a split stop the run.
    max_bad_images: int = 100
    # COCOeval implementation: "faster-coco-eval" (same figures, faster) or "pycocotools".
    coco_evaluator: str = "faster-coco-eval"
    # Aspect-ratio grouping of training batches (torchvision's reference default 3; 0 is off).
    aspect_group_factor: int = 3
    decode_batch_size: int = 8  # Images per Ray Data decode task batch.
    prefetch_batches: int = 4  # Batches each worker prefetches from its stream.
    # Seconds a worker waits for its next training or val batch before the run stops, naming the
    # stream and the files being read (a read that never returns: a stalled mount). A run's first
    # batch takes 2 to 7 s on one machine (docs/performance.md), minutes where the cluster must
    # first start a node for Ray Data's tasks; 600 s leaves room for that and ends a hang in 10 min.
    stall_timeout_s: float = 600.0

    def validate(self) -> "Config":
        problems = []
        if self.precision == "fp16":
            problems.append(
                "precision 'fp16' (weights cast with model.half(), as the reference does) is refused: "
                "SGD on half-precision weights loses small updates and detection heads overflow; "
                "use 'amp' (fp16 autocast with loss scaling) or 'bf16'"
            )
        elif self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("batch_size", "max_epochs", "min_size", "max_size", "box_batch_size_per_image", "decode_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_failures", "max_bad_images", "cpus_per_worker", "peak_tflops"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.num_workers < 0:
            problems.append(f"num_workers must be 0 or more, got {self.num_workers}")
        if not 1 <= self.nodes <= max(1, self.num_workers):
            problems.append(f"nodes must be 1..num_workers, got {self.nodes} for {self.num_workers} workers")
        if self.coco_evaluator not in ("faster-coco-eval", "pycocotools"):
            problems.append(f"coco_evaluator must be faster-coco-eval or pycocotools, got {self.coco_evaluator!r}")
        if self.placement_strategy not in PLACEMENTS:
            problems.append(f"placement_strategy must be one of {', '.join(PLACEMENTS)}, got {self.placement_strategy!r}")
        if self.lr <= 0:
            problems.append(f"lr must be positive, got {self.lr}")
        if self.stall_timeout_s <= 0:
            problems.append(f"stall_timeout_s must be positive, got {self.stall_timeout_s}")
        if self.clip_grad_norm < 0:
            problems.append(f"clip_grad_norm must be 0 (off) or positive, got {self.clip_grad_norm}")
        if problems:
            raise ConfigError("; ".join(problems))
        return self


class ConfigError(ValueError):
    pass


def linear_lr(batch_size: int, num_workers: int) -> float:
    """The linear scaling rule: lr in proportion to the images of one step over all devices,
    0.02 for 16 (torchvision's recipe, FlagPerf's 1x8 default: 8 x 2)."""
    return REFERENCE_LR * batch_size * max(1, num_workers) / REFERENCE_IMAGES_PER_STEP


def _convert(name: str, value):
    """A TOML or command-line value in the field's type."""
    kind = {f.name: f.type for f in dataclasses.fields(Config)}[name]
    if kind == tuple[int, ...]:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        return tuple(int(v) for v in value)
    if kind == dict[str, str]:
        if isinstance(value, str):
            pairs = [item.split("=", 1) for item in value.split(",") if item.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ConfigError(f"{name} must be KEY=VALUE[,KEY=VALUE...], got {value!r}")
            value = dict(pairs)
        return {str(k): str(v) for k, v in value.items()}
    if kind is bool and isinstance(value, str):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes")
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{name} must be a {kind.__name__}, got {value!r}") from None


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.toml"))


def load_preset(name: str) -> dict:
    """The preset's fields, over those of its `base` preset if it names one."""
    path = PRESETS / f"{name}.toml"
    if not path.exists():
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    overlay = tomllib.loads(path.read_text())
    base = overlay.pop("base", None)
    known = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(overlay) - known)
    if unknown:
        raise ConfigError(f"preset {path} sets unknown fields: {', '.join(unknown)}")
    return {**load_preset(base), **overlay} if base else overlay


def resolve(preset: str = "", **overrides) -> Config:
    """Base config, then the preset's overlay, then the overrides; the lr rule; validated. A
    dict field (worker_env) given as an override is merged into the preset's, its keys winning:
    `--worker-env NCCL_SOCKET_IFNAME=eth0` must not drop the preset's OMP_NUM_THREADS."""
    values = {k: _convert(k, v) for k, v in load_preset(preset).items()} if preset else {}
    for name, value in overrides.items():
        if value is not None:
            value = _convert(name, value)
            values[name] = {**values.get(name, {}), **value} if isinstance(value, dict) else value
    config = Config(preset=preset, **values)
    if config.lr == 0:
        config = dataclasses.replace(config, lr=linear_lr(config.batch_size, config.num_workers))
    if config.cpus_per_worker == 0:
        config = dataclasses.replace(config, cpus_per_worker=GPU_WORKER_CPUS if config.use_gpu else 1)
    return config.validate()


def field_help() -> dict[str, str]:
    """Each Config field's help, from the comments of this file's source: the comment at the end of
    the field's line, or else the block of comment lines above it (a block applies to every field
    that follows it until a blank line or the next block)."""
    try:
        source = inspect.getsource(Config)
    except OSError:  # no source files (a bytecode-only install): flags without their comments
        return {}
    lines = source.splitlines()
    fields_at = {node.lineno: node.target.id for node in ast.parse(source).body[0].body
                 if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
    standalone, trailing = {}, {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, column = token.start
            text = token.string.lstrip("#").strip()
            (standalone if not lines[row - 1][:column].strip() else trailing)[row] = text
    helps, block, previous = {}, [], "blank"
    for row, line in enumerate(lines, start=1):
        if row in standalone:
            block = block + [standalone[row]] if previous == "comment" else [standalone[row]]
            previous = "comment"
        elif not line.strip():
            block, previous = [], "blank"
        elif row in fields_at:
            helps[fields_at[row]] = trailing.get(row) or " ".join(block)
            previous = "field"
    return helps


def _shown(value) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or '""'
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "{}"
    return repr(value) if isinstance(value, str) else str(value)


# Command-line formats of the fields that are not a single value.
FORMATS = {tuple[int, ...]: ("INT,...", "comma-separated ints"),
           dict[str, str]: ("KEY=VALUE,...", "comma-separated KEY=VALUE pairs")}


def add_field_arguments(parser: argparse.ArgumentParser, names, defaults: dict | None = None) -> None:
    """A --flag for each named Config field, its help the field's comment (`field_help`) and its
    default. A flag not given is None, so that a preset's value stands, unless `defaults` gives the
    command's own default for the field; values are strings that `resolve` converts, booleans
    switches (--use-gpu / --no-use-gpu)."""
    defaults = defaults or {}
    helps = field_help()
    by_name = {f.name: f for f in dataclasses.fields(Config)}
    for name in names:
        f = by_name[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        metavar, form = FORMATS.get(f.type, (f.type.__name__.upper(), ""))
        text = helps.get(name, "") + (f" Format: {form}." if form else "")
        text = f"{text} (default: {_shown(defaults.get(name, default))})".strip().replace("%", "%%")
        flag = f"--{name.replace('_', '-')}"
        if f.type is bool:
            parser.add_argument(flag, dest=name, default=defaults.get(name), action=argparse.BooleanOptionalAction,
                                help=text)
        else:
            parser.add_argument(flag, dest=name, default=defaults.get(name), metavar=metavar, help=text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--preset, then one --flag per config field (see `add_field_arguments`)."""
    parser.add_argument("--preset", default="", help=f"overlay from pipeline/presets, applied before the flags: "
                                                     f"{', '.join(preset_names())}")
    add_field_arguments(parser, [f.name for f in dataclasses.fields(Config) if f.name != "preset"])


def to_dict(config: Config) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}

