"""vae_gan_demo under 2-process DDP (gloo, torchrun): `python train.py +experiment=vae_gan_demo strategy=ddp`.

The VAE-GAN steps two optimizers by hand with two backward passes per step: the VAE's loss, then
the discriminator's on the detached reconstruction. DDP reduces gradients in the first backward
after each forward and expects every trainable parameter there, so the discriminator (trained in
the second) stopped the run at its second step. After the fix the discriminator is left out of
DDP and its gradients are averaged by VAEModule itself: the test trains past disc_start and checks
that both ranks end with identical VAE and discriminator weights (ranks read different clips, so
unsynchronised gradients would make them differ), finite losses, and collective parity.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from spawn_ranks import assert_collective_parity, free_port

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3


def worker(out: str, shards: str) -> None:
    from hydra import compose, initialize_config_dir
    from lightning.pytorch.callbacks import Callback
    from spawn_ranks import record_collectives

    from dit_video import run

    log = record_collectives("cpu")

    class RankWeights(Callback):
        def on_fit_start(self, trainer, pl_module):
            log.track_host_tensors()  # the module is built and placed: what is made from now on is checked

        def on_train_end(self, trainer, pl_module):
            state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            torch.save(state, Path(out) / f"weights-{trainer.global_rank}.pt")

    build_trainer = run.build_trainer
    run.build_trainer = lambda cfg, run_dir, extra_callbacks=(): build_trainer(cfg, run_dir, [RankWeights()])
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[
            "+experiment=vae_gan_demo", f"data.shards={shards}/train-*.tar", f"data.val_shards={shards}/val-*.tar",
            "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=8", "num_threads=1",
            "vae.base_channels=8", "vae.channel_mult=[1,1,2]", "vae.norm_groups=4", "vae.loss.disc_channels=8",
            f"trainer.max_steps={STEPS}", "vae.loss.disc_start=1", "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1", "optim.warmup_steps=3", "checkpoint_every=2", "vae_stats_batches=1",
            "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1", "+trainer.enable_progress_bar=false",
            "strategy=ddp", "strategy.process_group_backend=gloo", "trainer.devices=2", "checkpoint_reserve_gb=0",
            f"run_dir={out}"])
    try:
        run.train(cfg)
    finally:
        log.dump(Path(out) / f"collectives-{int(os.environ['RANK'])}.json")
    torch.distributed.destroy_process_group()


def test_vae_gan_demo_trains_under_two_process_ddp(tmp_path):
    import numpy as np

    from dit_video.plots import read_metric

    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "data_prep.make_demo", "--out", str(shards), "--num-clips", "16",
                    "--val-clips", "8", "--shard-size", "16"], cwd=ROOT, check=True, capture_output=True)
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}", OMP_NUM_THREADS="1", DIT_VIDEO_QUIET="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", str(Path(__file__).resolve()), str(out), str(shards)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert_collective_parity(out, 2)
    _, d_loss = read_metric(out / "metrics.csv", "train/d_loss")
    _, loss = read_metric(out / "metrics.csv", "train/loss")
    assert len(d_loss) == STEPS - 1 and np.isfinite(d_loss).all() and np.isfinite(loss).all()  # from disc_start = 1
    weights = [torch.load(out / f"weights-{r}.pt", weights_only=True) for r in range(2)]
    disc = [k for k in weights[0] if k.startswith("objective.discriminator.")]
    assert disc and any(k.startswith("vae.") for k in weights[0])
    for key, value in weights[0].items():  # DDP averaged the VAE's gradients, VAEModule the discriminator's
        assert torch.equal(weights[1][key], value), key
    assert (out / "vae.safetensors").is_file()


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
