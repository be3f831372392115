"""Launch scripts: the sbatch templates and torchrun script parse (`bash -n`, shellcheck), run
against fake `srun`/`scontrol` with the variables SLURM sets, and a Lightning SLURMEnvironment
built from those variables reports the ranks the job expects; the Hydra submitit preset composes;
run.build_strategy leaves the choice of cluster environment to Lightning's rule (srun with one task
per device, torchrun inside an allocation, one task with several devices), checked on the Trainer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted([*LAUNCH.glob("slurm/*.sbatch"), *LAUNCH.glob("slurm/*.sh"), *LAUNCH.glob("*.sh")])


def test_there_are_single_and_multi_node_templates_and_a_torchrun_script():
    names = {p.name for p in SCRIPTS}
    assert {"train_1node.sbatch", "train_multinode.sbatch", "env.sh", "torchrun.sh"} <= names
    for sbatch in LAUNCH.glob("slurm/*.sbatch"):
        text = sbatch.read_text()
        for needed in ("#SBATCH --signal=USR1@120", "#SBATCH --requeue", "srun", "ckpt_path=auto",
                       "--ntasks-per-node=8", "--gpus-per-node=8"):
            assert needed in text, (sbatch.name, needed)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_pass_bash_n(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (apt-get install shellcheck)")
def test_scripts_pass_shellcheck():
    proc = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def fake_slurm_bin(tmp_path: Path, hosts: list[str]) -> Path:
    """`scontrol show hostnames` prints `hosts`; `srun` records its arguments and environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\n" + "".join(f"echo {h}\n" for h in hosts))
    (bin_dir / "srun").write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > {tmp_path}/srun_args\n'
        f"env > {tmp_path}/srun_env\n"
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def slurm_env(bin_dir: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RUN_DIR"))}
    env.update(PATH=f"{bin_dir}:{env['PATH']}", SLURM_JOB_ID="777123", SLURM_JOB_NAME="dit-video",
               SLURM_JOB_NODELIST="gpu-[017-024]", SLURM_JOB_NUM_NODES="8", SLURM_NNODES="8",
               SLURM_CPUS_PER_TASK="12", SLURM_SUBMIT_DIR=str(ROOT))
    env.update(extra)
    return env


def test_multinode_sbatch_runs_srun_with_resumable_train_command(tmp_path):
    hosts = [f"gpu-{i:03d}" for i in range(17, 25)]
    bin_dir = fake_slurm_bin(tmp_path, hosts)
    proc = subprocess.run(["bash", str(LAUNCH / "slurm" / "train_multinode.sbatch"), "+experiment=dit_256"],
                          cwd=ROOT, env=slurm_env(bin_dir), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun_args").read_text().splitlines()
    assert args[args.index("python") + 1] == "train.py"
    for expected in ("trainer.num_nodes=8", "trainer.devices=8", "strategy=fsdp", "ckpt_path=auto",
                     "run_dir=outputs/dit-video/777123", "+experiment=dit_256"):
        assert expected in args, expected
    env = dict(line.split("=", 1) for line in (tmp_path / "srun_env").read_text().splitlines() if "=" in line)
    assert env["MASTER_ADDR"] == "gpu-017" and env["MASTER_PORT"] == str(20000 + 777123 % 10000)
    assert env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" and env["OMP_NUM_THREADS"] == "12"
    # A requeued job (same id, SLURM_RESTART_COUNT=1) gets the same run_dir and port: it resumes.
    subprocess.run(["bash", str(LAUNCH / "slurm" / "train_multinode.sbatch")], cwd=ROOT, check=True,
                   env=slurm_env(bin_dir, SLURM_RESTART_COUNT="1"), capture_output=True, timeout=30)
    assert "run_dir=outputs/dit-video/777123" in (tmp_path / "srun_args").read_text().splitlines()


@pytest.mark.parametrize("script", sorted(LAUNCH.glob("slurm/*.sbatch")), ids=lambda p: p.name)
def test_sbatch_scripts_give_srun_the_cpus_per_task(tmp_path, script):
    """Slurm >= 22.05: srun does not inherit --cpus-per-task from sbatch, so each task (and its
    decode workers) may get one core. The scripts pass it to srun and export SRUN_CPUS_PER_TASK."""
    bin_dir = fake_slurm_bin(tmp_path, [f"gpu-{i:03d}" for i in range(17, 25)])
    proc = subprocess.run(["bash", str(script)], cwd=ROOT, env=slurm_env(bin_dir), capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stderr
    args = (tmp_path / "srun_args").read_text().splitlines()
    assert "--cpus-per-task=12" in args[: args.index("python")], args  # an srun option, not a train.py override
    env = dict(line.split("=", 1) for line in (tmp_path / "srun_env").read_text().splitlines() if "=" in line)
    assert env["SRUN_CPUS_PER_TASK"] == "12"


def test_env_sh_takes_the_first_host_of_a_long_list_under_pipefail(tmp_path):
    """`scontrol show hostnames | head -n 1` under `set -o pipefail` dies of SIGPIPE (exit 141)
    when scontrol still writes after head has exited: a long host list makes that certain."""
    bin_dir = fake_slurm_bin(tmp_path, [])
    (bin_dir / "scontrol").write_text("#!/bin/sh\nseq -f 'gpu-%06g' 1 200000\n")
    proc = subprocess.run(["bash", "-c", 'set -euo pipefail; source launch/slurm/env.sh; echo "$MASTER_ADDR"'],
                          cwd=ROOT, env=slurm_env(bin_dir), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert proc.stdout.strip() == "gpu-000001"


_PROBE = """
import json
from lightning.fabric.plugins.environments import SLURMEnvironment
assert SLURMEnvironment.detect()
env = SLURMEnvironment(auto_requeue=False)
print(json.dumps({"global_rank": env.global_rank(), "local_rank": env.local_rank(), "node_rank": env.node_rank(),
                  "world_size": env.world_size(), "main_address": env.main_address, "main_port": env.main_port}))
"""


@pytest.mark.parametrize("node,local", [(0, 0), (3, 5)])
def test_lightning_slurm_environment_from_the_templates_variables_reports_the_right_ranks(tmp_path, node, local):
    """What each srun task of `train_multinode.sbatch` (8 nodes x 8 tasks) sees: SLURM's per-task
    variables plus what env.sh exports; Lightning must agree with env.sh on the master address."""
    bin_dir = fake_slurm_bin(tmp_path, [f"gpu-{i:03d}" for i in range(17, 25)])
    task = {"SLURM_NTASKS": "64", "SLURM_NTASKS_PER_NODE": "8", "SLURM_PROCID": str(node * 8 + local),
            "SLURM_LOCALID": str(local), "SLURM_NODEID": str(node), "SLURM_NODELIST": "gpu-[017-024]"}
    cmd = f'source launch/slurm/env.sh && exec "{sys.executable}" -c \'{_PROBE}\''
    proc = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=slurm_env(bin_dir, **task), capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"global_rank": node * 8 + local, "local_rank": local, "node_rank": node, "world_size": 64,
                   "main_address": "gpu-017", "main_port": 20000 + 777123 % 10000}


def test_submitit_launcher_preset_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=dit_slurm", "hydra.launcher.nodes=8"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (8, 8, 8)
    assert launcher.signal_delay_s == 120 and launcher.additional_parameters.requeue is True
    assert "SIGUSR2" in cfg.preemption.requeue_signals  # submitit's signal saves and requeues
    # submitit's srun passes no --cpus-per-task; Slurm >= 22.05 reads it from SRUN_CPUS_PER_TASK
    assert "export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK" in launcher.setup


# ----------------------------------------------------------------------------- who starts the processes

_LAUNCH_VARS = ("SLURM_", "TORCHELASTIC_", "RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE",
                "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")
# What one srun task of an 8-task, 1-node job sees (its own rank, the job's counts).
_SRUN_TASK_5 = {"SLURM_JOB_ID": "777123", "SLURM_JOB_NAME": "dit-video", "SLURM_NTASKS": "8",
                "SLURM_NTASKS_PER_NODE": "8", "SLURM_NNODES": "1", "SLURM_PROCID": "5", "SLURM_LOCALID": "5",
                "SLURM_NODEID": "0", "SLURM_NODELIST": "gpu-017"}
# torchrun inside the batch script of that allocation: SLURM's variables are the batch step's
# (every process sees PROCID 0), the ranks are torchrun's.
_TORCHRUN_IN_SBATCH_RANK_3 = {**_SRUN_TASK_5, "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                              "TORCHELASTIC_RUN_ID": "777123", "RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "8",
                              "GROUP_RANK": "0", "LOCAL_WORLD_SIZE": "8"}
# `sbatch --ntasks=1 --gpus-per-node=8` running `python train.py trainer.devices=8`.
_ONE_TASK = {**_SRUN_TASK_5, "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0"}


def lightning_trainer_under(monkeypatch, env: dict, devices: int, num_nodes: int = 1):
    """A Lightning Trainer (DDP, CPU) built with run.build_strategy's plugins in the environment
    SLURM/torchrun would set: Lightning's own detection decides what it does with them."""
    import lightning as L
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    from omegaconf import OmegaConf

    from dit_video.run import build_strategy

    for name in list(os.environ):
        if name.startswith(_LAUNCH_VARS):
            monkeypatch.delenv(name)
    for name in ("MASTER_ADDR", "MASTER_PORT"):  # Lightning's environments write these: restore after the test
        monkeypatch.setenv(name, "gpu-017" if name == "MASTER_ADDR" else "29501")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    cfg = OmegaConf.create({"strategy": {"kind": "ddp", "process_group_backend": "gloo"}, "data": {"batch_size": 2}})
    kwargs = {"accelerator": "cpu", "devices": devices, "num_nodes": num_nodes}
    strategy, plugins = build_strategy(cfg, kwargs)
    return L.Trainer(**kwargs, strategy=strategy, plugins=plugins, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False)


def test_srun_with_one_task_per_device_uses_slurms_ranks_without_lightnings_requeue(monkeypatch):
    from lightning.fabric.plugins.environments import SLURMEnvironment

    trainer = lightning_trainer_under(monkeypatch, _SRUN_TASK_5, devices=8)
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment) and not env.auto_requeue  # dit_video's Preemption requeues
    assert (trainer.global_rank, trainer.local_rank, trainer.world_size) == (5, 5, 8)


def test_torchrun_inside_an_sbatch_allocation_keeps_torchruns_ranks(monkeypatch):
    """SLURM_NTASKS is set in the batch script, yet the processes are torchrun's: forcing
    SLURMEnvironment made every process rank 0 (SLURM_PROCID of the batch step)."""
    from lightning.fabric.plugins.environments import TorchElasticEnvironment

    trainer = lightning_trainer_under(monkeypatch, _TORCHRUN_IN_SBATCH_RANK_3, devices=8)
    assert isinstance(trainer.strategy.cluster_environment, TorchElasticEnvironment)
    assert (trainer.global_rank, trainer.local_rank, trainer.world_size) == (3, 3, 8)


def test_one_slurm_task_with_8_devices_lets_lightning_start_the_processes(monkeypatch):
    """One task, 8 devices: Lightning must launch 8 processes itself (world size 8), not read a
    world size of 1 from SLURM_NTASKS and wait for tasks srun never starts."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    trainer = lightning_trainer_under(monkeypatch, _ONE_TASK, devices=8)
    env = trainer.strategy.cluster_environment
    assert isinstance(env, LightningEnvironment) and not env.creates_processes_externally
    assert trainer.world_size == 8 and trainer.num_devices == 8


@pytest.mark.parametrize("env,devices,num_nodes,match", [
    (_SRUN_TASK_5 | {"SLURM_NTASKS": "16"}, 8, 1, r"SLURM started 16 task\(s\) but trainer.devices x trainer.num_nodes"),
    # 8 tasks = 4 devices x 2 nodes, but the allocation is 8 tasks on 1 node: Lightning's own check
    (_SRUN_TASK_5, 4, 2, "ntasks-per-node=8"),
    (_ONE_TASK, 8, 2, r"SLURM started 1 task\(s\)"),
], ids=["tasks!=devices*nodes", "tasks-per-node!=devices", "one-task-two-nodes"])
def test_a_slurm_allocation_that_cannot_match_the_trainer_is_a_config_error(monkeypatch, env, devices, num_nodes,
                                                                            match):
    from dit_video.errors import ConfigError

    with pytest.raises(ConfigError, match=match):
        lightning_trainer_under(monkeypatch, env, devices=devices, num_nodes=num_nodes)


def test_first_cluster_run_checklist_quotes_what_the_code_prints(tmp_path, capsys):
    """Every line the checklist in launch/README.md says to look for is one the code (ours or
    Lightning's) prints, so the checklist cannot drift from the code."""
    import lightning

    from dit_video.preflight import main as preflight_main

    readme = (LAUNCH / "README.md").read_text()
    checklist = readme[readme.index("## First cluster run"):readme.index("## 1. The demo")]
    ours = "".join((ROOT / f).read_text() for f in ("dit_video/run.py", "dit_video/checkpoint/save.py",
                                                      "dit_video/callbacks.py"))
    lightning_src = "".join(p.read_text() for p in Path(lightning.__file__).parent.rglob("*.py")
                            if p.name in ("checkpoint_connector.py", "distributed.py"))
    for quoted, source in [("checkpoint saved: ", ours), ("run directory: ", ours), ("requeued SLURM job ", ours),
                           ("received %s: saving a checkpoint at step %d and stopping", ours),
                           ("Restoring states from the checkpoint path at ", lightning_src),
                           ("All distributed processes registered. Starting with ", lightning_src)]:
        assert quoted in source, quoted
        assert quoted.replace("%s", "SIGUSR1").replace("%d", "N") in checklist.replace("\n   ", " "), quoted
    preflight_main(["+experiment=dit_256"])
    assert capsys.readouterr().out.splitlines()[0] in checklist
    bin_dir = fake_slurm_bin(tmp_path, ["gpu-017"])
    proc = subprocess.run(["bash", str(LAUNCH / "slurm" / "train_1node.sbatch")], cwd=ROOT, capture_output=True,
                          text=True, env=slurm_env(bin_dir, SLURM_JOB_NUM_NODES="1"), timeout=30)
    printed = proc.stdout.splitlines()[0].replace("777123", "<jobid>").replace("gpu-017", "<host>")
    assert printed.replace(str(20000 + 777123 % 10000), "<port>") in checklist.replace("\n   ", " ")
