"""``ddim-lab-prefetch [--check] KEY=VALUE ...``: every weight a config needs, fetched ahead of time.

On a machine with network, it downloads what the config (the same overrides as ``ddim-lab``) will load into
the standard caches: a hub model's pipeline files through diffusers' ``DiffusionPipeline.download`` (only
the files ``from_pretrained`` reads) into the Hugging Face cache (``HF_HOME``/``HF_HUB_CACHE``), for
``task=alpha_plot`` only its scheduler config, and the LPIPS backbone through torchvision into
``$TORCH_HOME/hub/checkpoints``. ``--check`` uses no network: it lists each item as present or missing with
its size and exits 1 when something is missing, so a cluster job never finds out after it has started.
New kinds of weights (ControlNet, CLIP, annotators) join by adding an :class:`Item` in :func:`needed`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("ddim_lab.prefetch")


@dataclass
class Item:
    """One thing a config needs: how to find it locally (a path or None) and how to fetch it."""

    kind: str
    name: str
    locate: Callable[[], Path | None]
    fetch: Callable[[], object] | None  # None: nothing to download (shipped, built locally, your own files)
    expected_mb: float | None = None  # size when known before download

    def check(self) -> tuple[bool, str]:
        """(present, one-line description with size)."""
        path = self.locate()
        if path is None:
            size = f", about {human_size(self.expected_mb * 2**20)}" if self.expected_mb else ""
            how = "" if self.fetch is not None else " (not downloadable: provide it yourself)"
            return False, f"missing  {self.kind} {self.name}{size}{how}"
        return True, f"present  {self.kind} {self.name} ({human_size(disk_size(path))}) at {path}"


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def disk_size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (symlinks into the HF blob store followed)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _hub_snapshot(model_id: str, revision: str | None, patterns: list[str] | None = None) -> Path | None:
    """The local snapshot of a hub repo (None when not cached); with ``patterns``, only if those files are."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(
            snapshot_download(model_id, revision=revision, local_files_only=True, allow_patterns=patterns)
        )
    except Exception:  # not in the cache (huggingface_hub raises several kinds)
        return None
    if patterns is None and not (folder / "model_index.json").is_file():
        return None
    if patterns is not None and not all((folder / p).is_file() for p in patterns):
        return None
    return folder


WEIGHT_FOLDERS = (
    "unet",
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "controlnet",
)


def _complete_pipeline(folder: Path | None, skip: tuple[str, ...] = ()) -> Path | None:
    """``folder`` when every component of its model_index.json (but ``skip``) has its config and weights."""
    import json

    if folder is None or not (folder / "model_index.json").is_file():
        return None
    index = json.loads((folder / "model_index.json").read_text())
    for name, value in index.items():
        if name.startswith("_") or name in skip or not isinstance(value, list) or value[0] is None:
            continue
        sub = folder / name
        if not sub.is_dir():
            return None
        weights = name in WEIGHT_FOLDERS
        if weights and not any(sub.glob("*.safetensors")) and not any(sub.glob("*.bin")):
            return None
    return folder


def model_items(cfg: DictConfig) -> list[Item]:
    """What the model config needs."""
    from ddim_lab.models.loading import SCHEDULER_CONFIG, shipped_model_dir

    spec = OmegaConf.to_container(cfg.model, resolve=True)
    source = spec["source"]
    if source == "hub":
        model_id, revision = spec["id"], spec.get("revision")
        if cfg.task == "alpha_plot":
            return [
                Item(
                    "hub file",
                    f"{model_id}/{SCHEDULER_CONFIG}",
                    lambda: _hub_snapshot(model_id, revision, [SCHEDULER_CONFIG]),
                    lambda: _download_scheduler(model_id, revision),
                )
            ]

        # an SD3 model with t5=false never loads T5-XXL: neither download nor require it (~9.5 GB)
        skip = (
            ("text_encoder_3", "tokenizer_3")
            if spec.get("family") == "sd3" and not spec.get("t5", True)
            else ()
        )

        def fetch() -> object:
            from diffusers import DiffusionPipeline

            return DiffusionPipeline.download(model_id, revision=revision, **dict.fromkeys(skip))

        return [
            Item(
                "hub model",
                model_id,
                lambda: _complete_pipeline(_hub_snapshot(model_id, revision), skip),
                fetch,
            )
        ]
    if source in ("digits", "digits-flow"):
        shipped = shipped_model_dir("digits-ldm" if source == "digits" else "digits-flow")
        return [Item("shipped model", source, lambda: _complete_pipeline(_existing(shipped)), None)]
    if source == "local":
        return [
            Item("local model", str(spec.get("path")), lambda: _existing(Path(str(spec.get("path")))), None)
        ]
    return [Item("built model", spec["name"], lambda: Path(str(cfg.cache.dir)), None)]  # random weights


def _existing(path: Path) -> Path | None:
    return path if path.exists() else None


def _download_scheduler(model_id: str, revision: str | None) -> object:
    from huggingface_hub import snapshot_download

    from ddim_lab.models.loading import SCHEDULER_CONFIG

    return snapshot_download(model_id, revision=revision, allow_patterns=[SCHEDULER_CONFIG])


def lpips_items(cfg: DictConfig) -> list[Item]:
    """The LPIPS backbone, unless ``metrics.lpips=off`` (or the task measures nothing)."""
    import torchvision

    from ddim_lab.metrics import LPIPS_BACKBONE_ARCHS, lpips_backbone_path

    if cfg.metrics.lpips == "off" or cfg.task not in ("reconstruct", "edit"):
        return []
    net = cfg.metrics.lpips_net
    weights = torchvision.models.get_model_weights(LPIPS_BACKBONE_ARCHS[net]).DEFAULT
    path = lpips_backbone_path(net)
    return [
        Item(
            "LPIPS backbone",
            f"{net} ({path.name})",
            lambda: _existing(path),
            lambda: weights.get_state_dict(progress=False),
            weights.meta.get("_file_size"),
        )
    ]


def hub_files_item(kind: str, repo: str, revision: str | None, files: list[str]) -> Item:
    """Named files of a hub repo, fetched alone."""
    from huggingface_hub import snapshot_download

    return Item(
        kind,
        f"{repo} ({', '.join(files)})",
        lambda: _hub_snapshot(repo, revision, files),
        lambda: snapshot_download(repo, revision=revision, allow_patterns=files),
    )


def controlnet_items(cfg: DictConfig) -> list[Item]:
    """A hub ControlNet (its config and safetensors weights) and the OpenPose annotator weights."""
    items = []
    spec = cfg.get("controlnet") or {}
    if spec.get("source") == "hub" and cfg.task != "alpha_plot":
        files = ["config.json", "diffusion_pytorch_model.safetensors"]
        items.append(hub_files_item("hub ControlNet", spec["id"], spec.get("revision"), files))
    control = cfg.get("control") or {}
    repo = control.get("annotators")
    if control.get("name") == "openpose" and repo and not Path(str(repo)).is_dir():
        from ddim_lab.control.openpose import ANNOTATOR_FILES

        items.append(hub_files_item("annotator weights", repo, None, list(ANNOTATOR_FILES.get(repo, []))))
    return items


def needed(cfg: DictConfig) -> list[Item]:
    """Everything ``cfg`` loads from disk or network."""
    return [*model_items(cfg), *controlnet_items(cfg), *lpips_items(cfg)]


def main(argv: list[str] | None = None) -> int:
    """Console entry point: 0 when everything is present (or was fetched), 1 when something is missing."""
    parser = argparse.ArgumentParser(prog="ddim-lab-prefetch", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="no network: list what is present or missing")
    parser.add_argument("overrides", nargs="*", help="config overrides, as for ddim-lab (model=sd15 ...)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from ddim_lab.config import compose_config

    try:
        cfg = compose_config(args.overrides)
    except Exception as err:  # a bad override: one line, as ddim-lab gives
        from ddim_lab.cli import _composition_error_line

        log.error("ddim-lab-prefetch: %s", _composition_error_line(err))
        return 2
    items = needed(cfg)
    missing = 0
    for item in items:
        present, line = item.check()
        if not present and not args.check and item.fetch is not None:
            if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") and "hub" in item.kind:
                log.error("cannot fetch %s %s: HF_HUB_OFFLINE is set", item.kind, item.name)
            else:
                log.info("fetching  %s %s", item.kind, item.name)
                try:
                    item.fetch()
                except Exception as err:  # network, auth, disk: one line per item, go on with the next
                    log.error("could not fetch %s %s: %s", item.kind, item.name, " ".join(str(err).split()))
                present, line = item.check()
        log.info("%s", line)
        missing += not present
    log.info("%d item(s) needed, %d missing", len(items), missing)
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
