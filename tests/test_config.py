import pytest

from pipeline.config import ConfigError, linear_lr, preset_names, resolve


def test_resolve_applies_preset_then_overrides():
    config = resolve("demo", num_workers="4", lr_steps="16,22", use_gpu="false", max_epochs=None)
    # From the demo preset.
    assert config.preset == "demo"
    assert config.data_root == "data/synthetic"
    assert config.backbone_weights == "none"
    assert config.lr == 0.01
    assert config.max_epochs == 8
    assert config.clip_grad_norm == 10.0
    # The overrides, converted to the fields' types, win over the preset.
    assert config.num_workers == 4
    assert config.lr_steps == (16, 22)
    assert config.use_gpu is False
    # Fields neither sets keep the reference defaults.
    assert config.momentum == 0.9
    assert config.warmup_iters == 1000


def test_resolve_converts_strings():
    config = resolve(batch_size="8", lr="0.16", use_gpu="true", lr_steps="7", precision="amp")
    assert config.batch_size == 8
    assert config.lr == 0.16
    assert config.use_gpu is True
    assert config.lr_steps == (7,)
    assert config.precision == "amp"
    assert resolve(use_gpu="false").use_gpu is False


def test_demo_preset_lists_are_tuples():
    assert resolve("demo").lr_steps == (7,)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'; presets: .*demo"):
        resolve("nope")


def test_fp16_is_refused_pointing_to_amp():
    with pytest.raises(ConfigError, match="amp"):
        resolve(precision="fp16")


def test_invalid_values_are_refused():
    with pytest.raises(ConfigError, match="batch_size must be at least 1, got 0"):
        resolve(batch_size="0")
    with pytest.raises(ConfigError, match="lr must be positive, got -0.1"):
        resolve(lr="-0.1")
    with pytest.raises(ConfigError, match="batch_size must be a int, got 'two'"):
        resolve(batch_size="two")
    with pytest.raises(ConfigError, match="use_gpu must be true or false"):
        resolve(use_gpu="maybe")
    with pytest.raises(ConfigError, match="stall_timeout_s must be positive, got 0.0"):
        resolve(stall_timeout_s="0")


def test_linear_lr_rule():
    assert linear_lr(batch_size=2, num_workers=8) == pytest.approx(0.02)  # torchvision's recipe
    assert linear_lr(batch_size=16, num_workers=8) == pytest.approx(0.16)  # FlagPerf A100 1x8
    assert linear_lr(batch_size=8, num_workers=8) == pytest.approx(0.08)  # FlagPerf C500 1x8
    assert linear_lr(batch_size=2, num_workers=1) == pytest.approx(0.0025)
    assert linear_lr(batch_size=2, num_workers=0) == pytest.approx(0.0025)  # in-process: one device
    assert resolve().lr == pytest.approx(0.02)  # the base config is the reference 1x8


# preset: (workers, nodes, batch, lr, precision, fix_hp, worker_env); the c500 rows are the case
# page's table (../shared/seed): 1x1 fp32 '/', 1x8 and 2x8 fp32 bs=8,lr=0.08.
ROWS = {
    "1x1": (1, 1, 2, 0.0025, "fp32", "/", {}),
    "1x8": (8, 1, 2, 0.02, "fp32", "/", {}),
    "2x8": (16, 2, 2, 0.04, "fp32", "/", {}),
    "1x8-amp": (8, 1, 2, 0.02, "amp", "/", {}),
    "2x8-amp": (16, 2, 2, 0.04, "amp", "/", {}),
    "a100-1x1": (1, 1, 16, 0.16, "fp32", "bs=16,lr=0.16", {"OMP_NUM_THREADS": "1"}),
    "a100-1x8": (8, 1, 16, 0.16, "fp32", "bs=16,lr=0.16", {"OMP_NUM_THREADS": "1"}),
    "a100-2x8": (16, 2, 16, 0.16, "fp32", "bs=16,lr=0.16", {"OMP_NUM_THREADS": "1"}),
    "a100-2x8-amp": (16, 2, 16, 0.16, "amp", "bs=16,lr=0.16", {"OMP_NUM_THREADS": "1"}),
    "c500-1x1": (1, 1, 2, 0.0025, "fp32", "/", {"METAX_USE_TF32": "1", "OMP_NUM_THREADS": "1"}),
    "c500-1x8": (8, 1, 8, 0.08, "fp32", "bs=8,lr=0.08", {"METAX_USE_TF32": "1", "OMP_NUM_THREADS": "1"}),
    "c500-2x8": (16, 2, 8, 0.08, "fp32", "bs=8,lr=0.08", {"METAX_USE_TF32": "1", "OMP_NUM_THREADS": "1"}),
}


@pytest.mark.parametrize("preset", sorted(ROWS))
def test_presets_give_their_table_row(preset):
    config = resolve(preset)
    workers, nodes, batch, lr, precision, fix_hp, env = ROWS[preset]
    assert (config.num_workers, config.nodes, config.batch_size) == (workers, nodes, batch)
    assert config.lr == pytest.approx(lr)
    assert (config.precision, config.fix_hp, config.worker_env) == (precision, fix_hp, env)
    assert config.use_gpu is True and config.preset == preset
    assert config.tf32 is preset.startswith("c500")  # FlagPerf's metax configuration; the others: full fp32
    assert (config.min_size, config.max_size, config.max_epochs, config.backbone_weights) == (800, 1333, 26, "imagenet")


def test_every_preset_resolves():
    for name in preset_names():
        resolve(name)


def test_worker_env_from_the_command_line():
    assert resolve(worker_env="A=1,B=x=y").worker_env == {"A": "1", "B": "x=y"}
    with pytest.raises(ConfigError, match="worker_env must be KEY=VALUE"):
        resolve(worker_env="A")


def test_worker_env_flag_merges_into_the_presets():
    config = resolve("a100-1x8", worker_env="NCCL_SOCKET_IFNAME=eth0,OMP_NUM_THREADS=2")
    assert config.worker_env == {"OMP_NUM_THREADS": "2", "NCCL_SOCKET_IFNAME": "eth0"}
    assert resolve("c500-1x8", worker_env="GLOO_SOCKET_IFNAME=ib0").worker_env == {
        "METAX_USE_TF32": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "ib0"}


def test_nodes_and_placement_are_checked():
    with pytest.raises(ConfigError, match="nodes must be 1..num_workers, got 3 for 2 workers"):
        resolve(num_workers=2, nodes=3)
    with pytest.raises(ConfigError, match="placement_strategy must be one of PACK, SPREAD"):
        resolve(placement_strategy="STRICT")


def test_cpus_per_worker_default_is_by_device():
    assert resolve("1x8").cpus_per_worker == 4 and resolve("a100-2x8").cpus_per_worker == 4
    assert resolve("smoke").cpus_per_worker == 1 and resolve("1x8", use_gpu="false").cpus_per_worker == 1
    assert resolve("1x8", cpus_per_worker="6").cpus_per_worker == 6
    with pytest.raises(ConfigError, match="cpus_per_worker must be 0 or more, got -1"):
        resolve(cpus_per_worker="-1")
