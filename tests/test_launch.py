"""Launch configs (accelerate YAML, DeepSpeed JSON, SLURM sbatch) and a real 2-process CPU `accelerate launch`."""
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import yaml
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from tessera.registry import build_model

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "launch" / "accelerate"
DEEPSPEED = ROOT / "launch" / "deepspeed"
SBATCH = ROOT / "launch" / "slurm" / "multinode.sbatch"
EXPECTED = {"single_gpu": DistributedType.NO, "multi_gpu_ddp": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP,
            "zero1": DistributedType.DEEPSPEED, "zero2": DistributedType.DEEPSPEED, "zero3": DistributedType.DEEPSPEED}
AUTO_FIELDS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")
# accelerate fills these from `model.config.hidden_size` when "auto"; tessera configs have no hidden_size
HIDDEN_SIZE_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def test_every_config_is_present():
    assert sorted(p.stem for p in ACCELERATE.glob("*.yaml")) == sorted(EXPECTED)
    assert sorted(p.name for p in DEEPSPEED.glob("*.json")) == ["zero1.json", "zero2.json", "zero3.json"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_yaml_loads_through_accelerate(name):
    path = ACCELERATE / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    config = load_config_from_file(str(path))  # unknown top-level keys raise here
    assert isinstance(config, ClusterConfig) and config == ClusterConfig.from_yaml_file(str(path))
    assert config.distributed_type == EXPECTED[name]
    assert config.num_processes >= 1 and config.num_machines == 1 and config.machine_rank == 0
    assert config.use_cpu is False
    if config.distributed_type == DistributedType.DEEPSPEED:
        # accelerate raises if an accelerate config sets mixed_precision next to a deepspeed_config_file;
        # precision lives in the JSON (bf16.enabled)
        assert "mixed_precision" not in raw
    else:
        assert config.mixed_precision == "bf16"
    if config.distributed_type == DistributedType.NO:
        assert config.num_processes == 1
    # nested keys are copied onto `accelerate launch` arguments: each must be one
    launch_args = vars(launch_command_parser().parse_args(["x.py"]))
    for section, prefix in (("fsdp_config", "fsdp_"), ("deepspeed_config", "")):
        for key in raw.get(section, {}):
            arg = key if key.startswith(prefix) else prefix + key
            assert arg in launch_args, f"{name}: {section}.{key} is not an accelerate launch option"


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_yaml_points_at_its_json(stage):
    config = load_config_from_file(str(ACCELERATE / f"zero{stage}.yaml"))
    rel = config.deepspeed_config["deepspeed_config_file"]
    assert not Path(rel).is_absolute() and (ROOT / rel).resolve() == (DEEPSPEED / f"zero{stage}.json").resolve()
    ds = json.loads((ROOT / rel).read_text())
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    for field in AUTO_FIELDS:
        assert ds[field] == "auto", field
    assert "optimizer" not in ds and "scheduler" not in ds  # the trainer builds AdamW and its LR schedule
    for key in HIDDEN_SIZE_KEYS:
        assert ds["zero_optimization"].get(key) != "auto", key
    if stage == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def _launch_args(name: str, *extra: str):
    """Run accelerate's own argument validation on `accelerate launch --config_file NAME.yaml -m tessera.cli ...`."""
    argv = ["--config_file", f"launch/accelerate/{name}.yaml", *extra, "-m", "tessera.cli", "train", "--config", "r.yaml"]
    args = launch_command_parser().parse_args(argv)
    return _validate_launch_command(args)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_plugin_accepts_the_launch_environment(stage, monkeypatch):
    """Builds the env `accelerate launch` gives each process, then the DeepSpeedPlugin the Accelerator builds from
    it, and fills the "auto" fields the way `Accelerator.prepare` does (DeepSpeed itself is not needed)."""
    monkeypatch.chdir(ROOT)
    args, defaults, mp_from_config = _launch_args(f"zero{stage}")
    assert args.use_deepspeed and not mp_from_config
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    with mock.patch.dict(os.environ, env):
        plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == stage
    plugin.set_mixed_precision("bf16")
    plugin.deepspeed_config_process(must_match=True, train_micro_batch_size_per_gpu=4, train_batch_size=64,
                                    gradient_accumulation_steps=2, gradient_clipping=1.0)
    filled = json.dumps(plugin.deepspeed_config)
    assert '"auto"' not in filled
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 4
    assert plugin.deepspeed_config["bf16"]["enabled"] is True
    if stage == 3:
        assert plugin.zero3_save_16bit_model is True


def test_fsdp_plugin_wraps_the_trunk_blocks(monkeypatch):
    monkeypatch.chdir(ROOT)
    args, _, _ = _launch_args("fsdp")
    assert args.use_fsdp
    env = prepare_multi_gpu_env(args)
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.transformer_cls_names_to_wrap == ["Block"]
        plugin.set_auto_wrap_policy(build_model("next_token", "tiny", vocab_size=32, grid_size=4, num_classes=3))
    from tessera.nn.trunk import Block
    assert plugin.auto_wrap_policy.keywords["transformer_layer_cls"] == {Block}


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu_ddp"])
def test_plain_configs_pass_accelerate_validation(name, monkeypatch):
    monkeypatch.chdir(ROOT)
    args, _, _ = _launch_args(name, "--num_processes", "2" if name != "single_gpu" else "1")
    assert args.multi_gpu == (name == "multi_gpu_ddp") and not args.use_fsdp and not args.use_deepspeed
    assert args.mixed_precision == "bf16"


def _executable(path: Path, body: str) -> None:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_sbatch_runs_one_accelerate_launch_per_node(tmp_path):
    """The sbatch script under fake `scontrol`/`srun`/`accelerate`: srun runs the task once per node."""
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    head = SBATCH.read_text().split("set -euo pipefail")[0]
    assert "#SBATCH --gpus-per-node=8" in head and "#SBATCH --ntasks-per-node=1" in head
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "scontrol", 'test "$1 $2 $3" = "show hostnames gpu[07-08]" && printf "gpu07\\ngpu08\\n"\n')
    _executable(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done\n'
                                  'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" || exit; done\n')
    _executable(bin_dir / "accelerate", 'printf "%s\\0" "$@" > "$ARGV_DIR/node$SLURM_NODEID"\n')
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_NNODES": "2", "ARGV_DIR": str(tmp_path)}
    env.pop("MAIN_PROCESS_PORT", None)
    proc = subprocess.run(["bash", str(SBATCH), "configs/next_token_shapes64.yaml", "train.steps=5", "out=runs/x y"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for node in (0, 1):
        argv = (tmp_path / f"node{node}").read_text().split("\0")[:-1]
        assert argv[0] == "launch"
        args = launch_command_parser().parse_args(argv[1:])
        assert args.config_file == "launch/accelerate/multi_gpu_ddp.yaml"
        assert (args.num_machines, args.machine_rank, args.num_processes) == (2, node, 16)
        assert (args.main_process_ip, args.main_process_port) == ("gpu07", 29500)
        assert args.module and args.training_script == "tessera.cli"
        assert args.training_script_args == ["train", "--config", "configs/next_token_shapes64.yaml",
                                             "train.steps=5", "out=runs/x y"]
    assert subprocess.run(["bash", str(SBATCH)], cwd=ROOT, env=env, capture_output=True).returncode != 0


# ---------------------------------------------------------------------------------------------------------------
# A real 2-process CPU run of `tessera train` under `accelerate launch`.

PROBE = '''\
"""Test-only: each Python process that ran tessera's trainer records accelerate's process state at exit."""
import atexit, json, os, sys

def _record():
    if "tessera.train.trainer" not in sys.modules:
        return
    shared = dict(sys.modules["accelerate.state"].PartialState._shared_state)
    record = {"pid": os.getpid(), "RANK": os.environ.get("RANK"), "WORLD_SIZE": os.environ.get("WORLD_SIZE"),
              "num_processes": shared.get("num_processes"), "process_index": shared.get("process_index"),
              "distributed_type": str(shared.get("distributed_type")), "backend": shared.get("backend")}
    with open(os.path.join(os.environ["TESSERA_LAUNCH_PROBE"], f"{os.getpid()}.json"), "w") as f:
        json.dump(record, f)

atexit.register(_record)
'''

TWO_CPU_PROCESSES = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                     "--dynamo_backend", "no"]


def launch_two_cpu_processes(recipe: Path, work: Path, launch_args: list[str] = TWO_CPU_PROCESSES,
                             use_cpu: bool = True) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """`[ACCELERATE_USE_CPU=1] accelerate launch LAUNCH_ARGS -m tessera.cli train --config RECIPE`; returns the
    result and one probe record per process that ran the trainer."""
    probe_dir, records = work / "probe", work / "records"
    probe_dir.mkdir(parents=True)
    records.mkdir()
    (probe_dir / "sitecustomize.py").write_text(PROBE)
    env = {**os.environ, "HF_HOME": str(work / "hf"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(probe_dir), os.environ.get("PYTHONPATH")])),
           "TESSERA_LAUNCH_PROBE": str(records), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("ACCELERATE_USE_CPU", None)
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", *launch_args,
           "--main_process_port", "0", "-m", "tessera.cli", "train", "--config", str(recipe)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc, [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))]


def assert_two_ranks(proc: subprocess.CompletedProcess, records: list[dict], kind: str = "MULTI_CPU") -> None:
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert len(records) == 2, (records, log[-4000:])
    assert sorted(r["process_index"] for r in records) == [0, 1]
    for r in records:
        assert r["num_processes"] == 2 and r["WORLD_SIZE"] == "2" and r["RANK"] == str(r["process_index"])
        assert r["distributed_type"] == f"DistributedType.{kind}" and r["backend"] == "gloo"
    assert len(re.findall(r"^training \S+: ", proc.stdout, re.M)) == 1  # the banner: main process only


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


TINY_TRAIN = {"steps": 3, "batch_size": 4, "lr": 1.0e-3, "warmup_steps": 1, "log_every": 1, "ckpt_every": 3,
              "sample_every": 3, "mixed_precision": "no"}


def vq_recipe(tmp_path: Path) -> Path:
    from tessera.data.shapes import write_shapes_dataset
    shards = tmp_path / "shapes32"
    write_shapes_dataset(shards, n=64, resolution=32, seed=0, per_shard=16)
    return write_recipe(tmp_path / "vq.yaml", {
        "model": {"kind": "vq", "preset": "tiny", "config": {"image_size": 32, "base_channels": 16}},
        "data": {"shards": str(shards), "resolution": 32}, "train": TINY_TRAIN, "out": str(tmp_path / "vq")})


def test_two_process_cpu_training_vq_then_next_token(tmp_path):
    vq, shards, train = vq_recipe(tmp_path), tmp_path / "shapes32", TINY_TRAIN
    proc, records = launch_two_cpu_processes(vq, tmp_path / "w1")
    assert_two_ranks(proc, records)
    assert_run_folder(tmp_path / "vq", steps=3)

    ar = write_recipe(tmp_path / "ar.yaml", {
        "model": {"kind": "next_token", "preset": "tiny", "config": {
            "tokenizer": str(tmp_path / "vq"), "image_size": 32, "cond": "text", "text_tokenizer": "auto",
            "text_len": 12, "trunk": {"dim": 64, "n_layers": 2, "n_heads": 2}}},
        "data": {"shards": str(shards), "resolution": 32}, "train": train, "out": str(tmp_path / "ar")})
    proc, records = launch_two_cpu_processes(ar, tmp_path / "w2")
    assert_two_ranks(proc, records)
    assert_run_folder(tmp_path / "ar", steps=3)
    assert (tmp_path / "ar" / "text_tokenizer.json").is_file()


def assert_run_folder(run: Path, steps: int) -> None:
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == steps and metrics["loss"] > 0
    logged = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))  # written once per step: by one process only
    assert (run / "checkpoints" / "latest").read_text() == f"step-{steps:07d}"
    assert (run / "checkpoints" / f"step-{steps:07d}" / "model.safetensors").is_file()
    assert (run / "samples" / f"step-{steps:07d}.png").is_file()


def test_two_process_cpu_deepspeed_zero2_from_the_launch_config(tmp_path):
    """launch/accelerate/zero2.yaml as shipped, on CPU: DeepSpeed needs the gloo group the trainer asks for on
    CPU-only machines (ACCELERATE_USE_CPU=1 would silently drop DeepSpeed, so it is not set)."""
    recipe = vq_recipe(tmp_path)
    proc, records = launch_two_cpu_processes(
        recipe, tmp_path / "w", ["--config_file", "launch/accelerate/zero2.yaml", "--num_processes", "2"], use_cpu=False)
    assert_two_ranks(proc, records, kind="DEEPSPEED")
    assert_run_folder(tmp_path / "vq", steps=3)
