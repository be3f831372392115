"""python -m dit_video.checkpoint export ... (see dit_video/checkpoint/export.py)."""

from dit_video.checkpoint.export import main

main()
