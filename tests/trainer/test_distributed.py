"""Multi-process training the standard way: the shipped accelerate FSDP configs describe one node of
8 and two nodes of 8, and a real 2-process data-parallel run (torchrun on CPU, gloo) keeps the
global batch and trains exactly like one process that accumulates the same batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

from trainer import TrainConfig, train
from trainer.train import LOSS_LOG_FILE, RESULTS_FILE

CONFIGS = Path(__file__).parents[2] / "trainer" / "configs"


@pytest.mark.parametrize("name, machines, processes", [("fsdp_1x8.yaml", 1, 8), ("fsdp_2x8.yaml", 2, 16)])
def test_fsdp_configs_load_in_accelerate_and_shard_fully(name, machines, processes):
    config = ClusterConfig.from_yaml_file(str(CONFIGS / name))
    assert config.distributed_type == "FSDP" and config.mixed_precision == "bf16"
    assert (config.num_machines, config.num_processes) == (machines, processes)
    fsdp = config.fsdp_config
    assert fsdp["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"  # the saved model is one plain directory
    # The paper's global batch of 16 divides evenly over either layout.
    TrainConfig(model="m", dataset="d", output_dir="o").gradient_accumulation(processes)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / LOSS_LOG_FILE).read_text().splitlines() if '"loss"' in line]


def test_two_processes_train_like_one_with_the_same_global_batch(base_model, s1k_dir, tmp_path):
    flags = dict(global_batch_size=4, per_device_batch_size=1, num_epochs=1, max_seq_length=512, learning_rate=1e-3)
    single = train(TrainConfig(model=str(base_model), dataset=str(s1k_dir), output_dir=str(tmp_path / "one"), **flags))
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "trainer",
         f"--model={base_model}", f"--dataset={s1k_dir}", f"--output-dir={tmp_path / 'two'}", *argv],
        env=env, capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    hyper = json.loads((tmp_path / "two" / RESULTS_FILE).read_text())["hyperparameters"]
    assert (hyper["world_size"], hyper["gradient_accumulation_steps"], hyper["effective_batch_size"]) == (2, 2, 4)
    assert single.hyperparameters["gradient_accumulation_steps"] == 4
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-4)
