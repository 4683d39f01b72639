"""``ddim-lab-prefetch [--check] KEY=VALUE ...``: every weight a config needs, fetched ahead of time.

On a machine with network, it downloads what the config (the same overrides as ``ddim-lab``) will load into
the standard caches: a hub model's pipeline files through diffusers' ``DiffusionPipeline.download`` (only
the files ``from_pretrained`` reads) into the Hugging Face cache (``HF_HOME``/``HF_HUB_CACHE``), for
``task=alpha_plot`` only its scheduler config, and the LPIPS backbone through torchvision into
``$TORCH_HOME/hub/checkpoints``. ``--check`` uses no network. Either way it prints a table to stdout: each
item present or missing, required or optional (what a run tolerates without: the LPIPS backbone under
``metrics.lpips=auto`` gives NaN), with its size and place, then its verdict. The exit code is 1 when a
required item is missing, so a cluster job never finds out after it has started; missing optional items
are listed, not fatal. New kinds of weights (ControlNet, CLIP, annotators) join by adding an :class:`Item` in
:func:`needed`.
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

log = logging.getLogger("ddim_lab.cli.prefetch")


@dataclass
class Item:
    """One thing a config needs: how to find it locally (a path or None) and how to fetch it."""

    kind: str
    name: str
    locate: Callable[[], Path | None]
    fetch: Callable[[], object] | None  # None: nothing to download (shipped, built locally, your own files)
    expected_mb: float | None = None  # size when known before download
    required: bool = True  # False: a run goes on without it (and says what it leaves out)
    without: str = ""  # what a run does without an optional item

    def check(self) -> tuple[bool, list[str]]:
        """(present, its table cells: status, need, kind, name, size, place or what to do)."""
        path = self.locate()
        need = "required" if self.required else "optional"
        if path is None:
            size = f"~{human_size(self.expected_mb * 2**20)}" if self.expected_mb else "?"
            how = "" if self.fetch is not None else "not downloadable: provide it yourself"
            what = "; ".join(t for t in (how, "" if self.required else f"without it: {self.without}") if t)
            return False, ["missing", need, self.kind, self.name, size, what]
        return True, ["present", need, self.kind, self.name, human_size(disk_size(path)), str(path)]


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
    from ddim_lab.models.sources import SCHEDULER_CONFIG, SHIPPED, shipped_model_dir

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
    if source in SHIPPED:
        shipped = shipped_model_dir(SHIPPED[source])
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

    from ddim_lab.models.sources import SCHEDULER_CONFIG

    return snapshot_download(model_id, revision=revision, allow_patterns=[SCHEDULER_CONFIG])


def lpips_items(cfg: DictConfig) -> list[Item]:
    """The LPIPS backbone, unless ``metrics.lpips=off`` (or the task measures nothing)."""
    import torchvision

    from ddim_lab.metrics.image import LPIPS_BACKBONE_ARCHS, lpips_backbone_path

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
            required=cfg.metrics.lpips == "required",  # auto: a run records LPIPS as NaN and says so once
            without="lpips is NaN (metrics.lpips=auto)",
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
        from ddim_lab.methods.control.openpose import ANNOTATOR_FILES

        items.append(hub_files_item("annotator weights", repo, None, list(ANNOTATOR_FILES.get(repo, []))))
    return items


def needed(cfg: DictConfig) -> list[Item]:
    """Everything ``cfg`` loads from disk or network."""
    return [*model_items(cfg), *controlnet_items(cfg), *lpips_items(cfg)]


def table(rows: list[list[str]]) -> str:
    """Rows of cells as aligned text columns (the last column as it is)."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]).rstrip()
        for row in rows
    )


def verdict(checked: list[tuple[Item, bool]]) -> str:
    """The table's last line: ready or not, and what is missing."""
    required = [i for i, present in checked if not present and i.required]
    optional = [i for i, present in checked if not present and not i.required]
    names = lambda items: ", ".join(f"{i.kind} {i.name}" for i in items)  # noqa: E731
    if required:
        line = f"NOT READY: {len(required)} required item(s) missing ({names(required)})"
    else:
        line = f"ready: every required item of {len(checked)} is present"
    if optional:
        line += f"; {len(optional)} optional item(s) missing ({names(optional)}), runs go on without them"
    return line


def main(argv: list[str] | None = None) -> int:
    """Console entry point: 0 when every required item is present (or was fetched), 1 when one is missing;
    the table goes to stdout, fetch progress and errors to stderr."""
    parser = argparse.ArgumentParser(prog="ddim-lab-prefetch", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="no network: list what is present or missing")
    parser.add_argument("overrides", nargs="*", help="config overrides, as for ddim-lab (model=sd15 ...)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    from ddim_lab.config.compose import compose_config

    try:
        cfg = compose_config(args.overrides)
    except Exception as err:  # a bad override: one line, as ddim-lab gives
        from ddim_lab.cli.main import _composition_error_line

        log.error("ddim-lab-prefetch: %s", _composition_error_line(err))
        return 2
    checked: list[tuple[Item, bool]] = []
    rows = [["status", "need", "kind", "name", "size", "where / what to do"]]
    for item in needed(cfg):
        present, cells = item.check()
        if not present and not args.check and item.fetch is not None:
            if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") and "hub" in item.kind:
                log.error("cannot fetch %s %s: HF_HUB_OFFLINE is set", item.kind, item.name)
            else:
                log.info("fetching  %s %s", item.kind, item.name)
                try:
                    item.fetch()
                except Exception as err:  # network, auth, disk: one line per item, go on with the next
                    log.error("could not fetch %s %s: %s", item.kind, item.name, " ".join(str(err).split()))
                present, cells = item.check()
        checked.append((item, present))
        rows.append(cells)
    sys.stdout.write(table(rows) + "\n" + verdict(checked) + "\n")
    return 1 if any(not present and item.required for item, present in checked) else 0


if __name__ == "__main__":
    sys.exit(main())
