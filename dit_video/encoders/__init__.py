"""Video autoencoders and text encoders (frozen during DiT training)."""

from dit_video.encoders.base import TextEncoder, VideoAutoencoder, clip_to_video, video_to_clip

__all__ = ["TextEncoder", "VideoAutoencoder", "clip_to_video", "video_to_clip"]
