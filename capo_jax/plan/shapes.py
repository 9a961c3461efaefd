"""Model shapes without weights: a Hugging Face config.json (a checkpoint folder or the file), or a preset shipped in
`capo_jax/models/presets` keyed by hub id (`Qwen/Qwen2.5-1.5B`) or its last part (`Qwen2.5-1.5B`)."""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from capo_jax.models.config import ModelConfig

PRESET_DIR = pathlib.Path(__file__).resolve().parent.parent / "models" / "presets"


def preset_names() -> list[str]:
    """Hub ids of the shipped presets."""
    out = []
    for path in sorted(PRESET_DIR.glob("*.json")):
        out.append(json.loads(path.read_text()).get("_name_or_path", path.stem))
    return out


def hf_config(source: str) -> dict:
    """The config.json dict that `source` names: a folder holding config.json, a .json file, or a preset."""
    text = str(source).strip()
    if not text:
        raise ValueError("no model named: give a checkpoint folder, a config.json or a preset "
                         f"({', '.join(preset_names())})")
    path = pathlib.Path(os.path.expanduser(text))
    if path.is_dir() and (path / "config.json").is_file():
        return json.loads((path / "config.json").read_text())
    if path.is_file() and path.suffix == ".json":
        return json.loads(path.read_text())
    key = text.rstrip("/").split("/")[-1].lower()
    for preset in PRESET_DIR.glob("*.json"):
        if preset.stem.lower() == key:
            return json.loads(preset.read_text())
    raise ValueError(f"{text!r} is neither a folder with config.json, a .json file, nor a preset; presets: "
                     f"{', '.join(preset_names())}")


def model_config(source: str, *, dtype: Any, param_dtype: Any, **overrides: Any) -> ModelConfig:
    """A ModelConfig for the model `source` names, with compute / storage dtypes and other overrides."""
    return ModelConfig.from_hf(hf_config(source), dtype=dtype, param_dtype=param_dtype, **overrides)


def role_source(path: str, model_id: str, role: str) -> str:
    """Where a role's shapes come from: its checkpoint folder when it exists, else its `model_id` preset."""
    if path and (pathlib.Path(path) / "config.json").is_file():
        return path
    if model_id:
        return model_id
    if path:
        raise ValueError(f"{role}.path={path!r} holds no config.json here: set --config.{role}.model_id to a preset "
                         f"({', '.join(preset_names())}) or point {role}.path at a folder with config.json")
    raise ValueError(f"{role}.path and {role}.model_id are unset: the planner needs the {role}'s shapes; set "
                     f"--config.{role}.model_id (one of {', '.join(preset_names())}) or --config.{role}.path")
