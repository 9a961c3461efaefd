"""Hugging Face hub ids as model paths: `owner/name` or `owner/name@revision` becomes a local snapshot folder.

A value that exists on disk (or is a gs:// path) is a path and stays as it is. A hub id is resolved with
huggingface_hub's `snapshot_download`, fetching only weights (safetensors), configs and tokenizer files
into the Hugging Face cache (HF_HUB_CACHE, or HF_HOME/hub); with HF_HUB_OFFLINE set it is read from that
cache or fails naming the id. Several processes on one host resolve the same snapshot: huggingface_hub
takes a file lock per downloaded file, so they share one copy and each reads it when complete.
"""
from __future__ import annotations

import copy
import os
import re
from typing import Callable

import ml_collections

from capo_jax.config import ConfigError, uses_llm_critic

# The files a model needs here: weights, configs, tokenizer (no PyTorch .bin, no ONNX, no README images).
ALLOW_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)

# A hub repo name part: letters, digits, '-', '_', '.'; no leading/trailing '-' or '.', no '--' or '..'.
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"(?P<repo>{_PART}/{_PART})(?:@(?P<revision>[^\s@]+))?")


def parse_hub_id(value: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `value` reads as `owner/name[@revision]` and is not an existing path; else None."""
    value = str(value).strip()
    if not value or "://" in value or os.path.exists(value):
        return None
    match = _HUB_ID.fullmatch(value)
    if match is None or "--" in match["repo"] or ".." in match["repo"]:
        return None
    return match["repo"], match["revision"]


def is_hub_id(value: str) -> bool:
    """Whether `value` is a hub id (owner/name[@revision]) rather than a local or gs:// path."""
    return parse_hub_id(value) is not None


def _truthy(text: str | None) -> bool:
    return str(text or "").strip().lower() in ("1", "true", "yes", "on")


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as set now, not as it was when huggingface_hub was imported."""
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def cache_dir() -> str:
    """The Hugging Face hub cache as the environment sets it now: HF_HUB_CACHE, HF_HOME/hub, ~/.cache/huggingface/hub."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(name):
            return os.path.expanduser(os.environ[name])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def resolve(value: str, *, key: str = "path") -> str:
    """A local folder for `value`: itself when it is not a hub id, else the hub snapshot (downloaded unless offline).

    `key` names the config key in error messages.
    """
    parsed = parse_hub_id(value)
    if parsed is None:
        return value
    repo, revision = parsed
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache, local_only = cache_dir(), offline()
    try:
        folder = snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=local_only,
                                   allow_patterns=list(ALLOW_PATTERNS))
    except IncompleteSnapshotError:
        raise ConfigError(f"{key}={value!r}: the cached snapshot of {repo!r} in {cache} is incomplete (an interrupted "
                          f"download?): download it again with network access{' (unset HF_HUB_OFFLINE)' if local_only else ''}") from None
    except LocalEntryNotFoundError as exc:
        if local_only:
            raise ConfigError(f"{key}={value!r}: hub id {repo!r}{f' at {revision!r}' if revision else ''} is not in the "
                              f"Hugging Face cache {cache} and HF_HUB_OFFLINE is set: download it once with network access "
                              f"(or unset HF_HUB_OFFLINE), or point {key} at a local folder") from None
        raise ConfigError(f"{key}={value!r}: the Hugging Face hub could not be reached and {repo!r} is not in the cache "
                          f"{cache} ({_first_line(exc)}): check the network, or point {key} at a local folder") from None
    except GatedRepoError:
        raise ConfigError(f"{key}={value!r}: {repo!r} is gated: accept its licence on the hub and log in "
                          "(`hf auth login` or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{key}={value!r} is neither a local folder nor a model on the Hugging Face hub "
                          "(private ones need `hf auth login` or HF_TOKEN): fix the path or the id") from None
    except RevisionNotFoundError:
        raise ConfigError(f"{key}={value!r}: {repo!r} has no revision {revision!r}: give a branch, tag or commit "
                          "after '@', or drop it for main") from None
    except (HfHubHTTPError, OSError) as exc:
        raise ConfigError(f"{key}={value!r}: downloading {repo!r} failed ({_first_line(exc)}): retry, or point {key} "
                          "at a local folder") from None
    if not any(name.endswith(".safetensors") for name in os.listdir(folder)):
        raise ConfigError(f"{key}={value!r}: the snapshot {folder} holds no .safetensors weights (capo_jax reads "
                          "safetensors only): pick a repository that publishes them or convert the weights")
    return folder


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def model_roles(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The sections whose `path` this run loads: the policy, the GenPRM critic and the KL reference when used."""
    roles = ["policy"]
    if uses_llm_critic(config):
        roles.append("critic")
    if float(config.rl.kl_coef) > 0:
        roles.append("reference")
    return tuple(roles)


def resolve_model_paths(config: ml_collections.ConfigDict, log: Callable[[str], None] | None = None) -> ml_collections.ConfigDict:
    """A copy of `config` whose loaded model paths that are hub ids point at local snapshots; `config` keeps the ids."""
    out = copy.deepcopy(config)
    for role in model_roles(config):
        value = str(config[role].path)
        if is_hub_id(value):
            out[role].path = resolve(value, key=f"{role}.path")
            if log is not None:
                log(f"[hub] {role}.path={value} -> {out[role].path}")
    return out
