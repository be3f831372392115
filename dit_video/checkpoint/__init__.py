"""Checkpoints that cannot be half-written, `ckpt_path=auto`, safe loading and an EMA exporter.

On disk, one run's `checkpoints/` folder holds

    step-00000400.ckpt     a complete checkpoint (a file; a folder of DCP shards under FSDP2)
    step-00000800.ckpt
    latest                 text: the name of the newest complete checkpoint
    last.ckpt -> step-00000800.ckpt   (convenience symlink, same target as `latest`)

A checkpoint is written under a temporary name (`.step-00000800.ckpt.tmp`), flushed to disk
(fsync of every file, then of the folder), and only then renamed to its final name; `latest` is
replaced the same way afterwards. A job killed at any moment (SIGKILL, node loss, full disk)
therefore leaves either the new checkpoint complete and pointed at, or the previous one still
complete and still pointed at; a leftover `.tmp` is ignored and removed by the next save.

Loading never unpickles code: files load with `torch.load(weights_only=True)`; a DCP folder's
`.metadata` passes an exact allowlist and its declarations are checked against the shard files
before anything is allocated, and its non-tensor entries load with weights_only=True, in every
reader including training resume; the exported EMA weights are a safetensors file.

Modules:
  paths.py    names on disk, the newest complete checkpoint, `ckpt_path=auto`, run dir -> checkpoint
  verify.py   refuse a file or DCP folder that would unpickle code, cheaply, before anything else reads it
  dcp.py      DCP folders (FSDP2) read safely: checked .metadata, torch's reader and planners made safe
  load.py     a step checkpoint as one dict (file or DCP folder, read whole on this process)
  save.py     StepCheckpoint (the callback) and SafeCheckpointIO: atomic, durable writes
  strategy.py SafeModelParallelStrategy: FSDP2 training resume through dcp.py
  resume.py   the training loader's position in every checkpoint (replay fallback)
  export.py   EMA weights -> one safetensors file (`python -m dit_video.checkpoint export ...`)
  deepspeed.py  ZeRO checkpoint folders (Lightning's DeepSpeedStrategy): recognise, verify, read whole
"""
