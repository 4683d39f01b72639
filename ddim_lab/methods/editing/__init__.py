"""Editors, one module each, behind one contract (``ddim_lab.methods.editing.base.Editor``): ``prompt_swap``
(sample with the target prompt) and ``p2p`` (prompt-to-prompt attention control) on UNets; ``rf_edit``
(RF-Solver-Edit's value sharing), ``uni_edit`` (UniEdit-Flow's velocity fusion) and ``kv_edit`` (KV-Edit's
preserved background keys and values) on flow transformers.

``make_editor(cfg.editor)`` builds the editor a ``conf/editor/NAME.yaml`` names, with its knobs.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from ddim_lab.methods.editing.base import Editor, EditPrompts

__all__ = ["EDITORS", "EditPrompts", "Editor", "make_editor"]

# name → "module:class"; imported on first use
EDITORS: dict[str, str] = {
    "prompt_swap": "ddim_lab.methods.editing.prompt_swap:PromptSwap",
    "p2p": "ddim_lab.methods.editing.p2p:PromptToPrompt",
    "sdedit": "ddim_lab.methods.editing.sdedit:SDEdit",
    "flowedit": "ddim_lab.methods.editing.flowedit:FlowEdit",
    "rf_edit": "ddim_lab.methods.editing.rf_edit:RFEdit",
    "uni_edit": "ddim_lab.methods.editing.uni_edit:UniEdit",
    "kv_edit": "ddim_lab.methods.editing.kv_edit:KVEdit",
}


def make_editor(spec: Mapping[str, Any] | str | None) -> Editor:
    """The editor a config names: ``{"name": NAME, **knobs}`` (or just NAME; None: prompt_swap), checked."""
    knobs = {"name": spec or "prompt_swap"} if spec is None or isinstance(spec, str) else dict(spec)
    name = knobs.pop("name", "prompt_swap")
    if name not in EDITORS:
        raise ValueError(f"unknown editor {name!r}; choose one of {', '.join(sorted(EDITORS))}")
    module, cls = EDITORS[name].split(":")
    try:
        editor = getattr(importlib.import_module(module), cls)(**knobs)
    except TypeError as err:
        raise ValueError(f"editor={name}: {err}") from err
    editor.check()
    return editor
