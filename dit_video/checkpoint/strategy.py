"""FSDP2 training resume that unpickles no code: Lightning's ModelParallelStrategy with a safe load.

Lightning's `ModelParallelStrategy.load_checkpoint` hands a DCP folder to
`torch.distributed.checkpoint.load` with torch's default reader and planner, which `pickle.load`
the folder's `.metadata` and load every non-tensor entry (the optimizer's hyperparameters) with
`torch.load(weights_only=False)`: a crafted checkpoint given to `ckpt_path=` or `+resume=` would
run code on every rank. This subclass loads the same state through dit_video.checkpoint.dcp.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from dit_video.checkpoint.dcp import SafeLoadPlanner, load_dcp
from dit_video.checkpoint.verify import load_checkpoint_file, verify_dcp_checkpoint


class SafeModelParallelStrategy(ModelParallelStrategy):
    """ModelParallelStrategy whose resume from a DCP folder reads `.metadata` through the allowlist
    and loads non-tensor entries with weights_only=True; everything else is Lightning's."""

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict:
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_dir():  # one full file: Lightning reads it with torch.load(weights_only=...)
            return super().load_checkpoint(path, weights_only=True)
        metadata = verify_dcp_checkpoint(path)
        module = self.model
        # The same state, in the same order, as Lightning's load: the module, then each optimizer.
        state = {"state_dict": get_model_state_dict(module)}
        load_dcp(state, path, metadata, SafeLoadPlanner(path))
        module.load_state_dict(state["state_dict"], strict=self.lightning_module.strict_loading)
        for i, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{i}"
            state = {key: get_optimizer_state_dict(module, optimizer)}
            load_dcp(state, path, metadata, SafeLoadPlanner(path))
            set_optimizer_state_dict(module, optimizer, optim_state_dict=state[key],
                                     options=StateDictOptions(cpu_offload=True))
        return load_checkpoint_file(path / "meta.pt")  # loops, callbacks, datamodule, run metadata
