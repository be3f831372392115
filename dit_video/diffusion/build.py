"""Config mapping -> objective: the one place that knows which class each `kind` names."""

from __future__ import annotations

from dataclasses import fields

from dit_video.diffusion.edm import EDM, EDMConfig
from dit_video.diffusion.flow import FlowConfig, RectifiedFlow
from dit_video.diffusion.objective import Objective
from dit_video.diffusion.vp import VPConfig, VPDiffusion

OBJECTIVES = {
    "rectified_flow": (FlowConfig, RectifiedFlow),
    "vp": (VPConfig, VPDiffusion),
    "edm": (EDMConfig, EDM),
}


def build_objective(cfg: dict) -> Objective:
    """Objective from a plain mapping such as OmegaConf.to_container(cfg.objective, resolve=True).

    `kind` picks the class (default rectified_flow, so pre-`kind` configs keep working); unknown
    keys fail naming the field, since a typo would otherwise silently become a default.
    """
    values = dict(cfg)
    kind = values.get("kind", "rectified_flow")
    if kind not in OBJECTIVES:
        raise ValueError(f"objective.kind={kind!r}: use one of {sorted(OBJECTIVES)}")
    config_cls, objective_cls = OBJECTIVES[kind]
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"objective: unknown field(s) {unknown} for kind={kind!r}; known fields are {sorted(known)}"
        )
    if "patch_size" in values:  # YAML gives lists
        values["patch_size"] = tuple(values["patch_size"])
    return objective_cls(config_cls(**values))
