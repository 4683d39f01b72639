"""OpenPose skeletons with controlnet_aux's ``OpenposeDetector``, as in the course chapter.

Its annotator weights come from the hub (``lllyasviel/Annotators``, or ``lllyasviel/ControlNet`` as in the
chapter) or from a local folder holding the same files. Offline and not cached, one message says which files
are needed and where to put them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddim_lab.methods.control.base import ControlSignal, ControlUnavailable, from_uint8, to_uint8

# repo id → (body, hand, face) weight files, as controlnet_aux's from_pretrained looks them up
ANNOTATOR_FILES = {
    "lllyasviel/Annotators": ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth"),
    "lllyasviel/ControlNet": (
        "annotator/ckpts/body_pose_model.pth",
        "annotator/ckpts/hand_pose_model.pth",
        "facenet.pth (from lllyasviel/Annotators)",
    ),
}


def missing_weights_message(repo: str, why: str) -> str:
    """One line: which annotator files are needed, and the two ways to provide them."""
    files = ANNOTATOR_FILES.get(repo, ANNOTATOR_FILES["lllyasviel/Annotators"])
    return (
        f"OpenPose annotator weights '{repo}' ({', '.join(files)}) are not available: {why}. Provide them with"
        f" `huggingface-cli download {repo} {' '.join(f.split(' ')[0] for f in files[:2])}`"
        " plus `huggingface-cli download lllyasviel/Annotators facenet.pth` on a machine with network (then"
        f" copy the cache to HF_HOME={os.environ.get('HF_HOME', '~/.cache/huggingface')}), or put"
        " body_pose_model.pth, hand_pose_model.pth and facenet.pth in a folder: control.annotators=FOLDER."
    )


def load_detector(repo: str):
    """controlnet_aux's ``OpenposeDetector`` from a hub id (local cache only when offline) or a folder."""
    from controlnet_aux import OpenposeDetector

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    if Path(repo).is_dir():
        missing = [f for f in ANNOTATOR_FILES["lllyasviel/Annotators"] if not (Path(repo) / f).is_file()]
        if missing:
            raise ControlUnavailable(missing_weights_message(repo, f"{repo} lacks {', '.join(missing)}"))
        return OpenposeDetector.from_pretrained(repo)
    try:
        return OpenposeDetector.from_pretrained(repo, local_files_only=offline)
    except Exception as err:  # hub lookups raise several error types; all mean "not here"
        why = (
            "HF_HUB_OFFLINE is set and they are not in the local cache" if offline else str(err).split("\n")[0]
        )
        raise ControlUnavailable(missing_weights_message(repo, why)) from err


class OpenPose(ControlSignal):
    """Body (optionally hand and face) keypoints drawn as a coloured skeleton on black."""

    name = "openpose"

    def __init__(
        self,
        annotators: str = "lllyasviel/Annotators",
        detect_resolution: int = 512,
        include_hand: bool = False,
        include_face: bool = False,
    ) -> None:
        self.annotators = annotators
        self.detect_resolution = int(detect_resolution)
        self.include_hand = include_hand
        self.include_face = include_face
        self._detector = None

    def __call__(self, images: torch.Tensor, names: Sequence[str] | None = None) -> torch.Tensor:
        if self._detector is None:
            self._detector = load_detector(self.annotators)
        resolution = images.shape[-1]
        poses = [
            np.asarray(
                self._detector(
                    a,
                    detect_resolution=self.detect_resolution,
                    image_resolution=resolution,
                    include_hand=self.include_hand,
                    include_face=self.include_face,
                    output_type="np",
                )
            )
            for a in to_uint8(images)
        ]
        return from_uint8(poses)

    def key(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "annotators": self.annotators,
            "detect_resolution": self.detect_resolution,
            "include_hand": self.include_hand,
            "include_face": self.include_face,
        }
