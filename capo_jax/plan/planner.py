"""Plan one config on one slice: compile its programs, account memory per phase, and when a phase does not fit,
recompile it under alternative meshes or batch sizes and report which would."""
from __future__ import annotations

import copy
import sys
from typing import Callable, Sequence

import ml_collections

from capo_jax import config as config_lib
from capo_jax.plan import programs as P
from capo_jax.plan.report import Plan, phase_memory

ALL = ("train", "rollout", "critic")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def compile_phases(roles: P.Roles, which: Sequence[str], log: Callable[[str], None] = _log
                   ) -> tuple[list[P.Program], dict[str, P.Resident]]:
    """Compile the programs of the named phases; the policy's resident state comes from the train program, or from
    the shapes when the train step is not compiled."""
    progs: list[P.Program] = []
    resident: dict[str, P.Resident] = {}
    if "train" in which:
        prog, res = P.compile_train(roles, log)
        progs.append(prog)
        resident["policy"] = res
    elif "rollout" in which or roles.critic_shared:
        resident["policy"] = _policy_resident(roles)
    if "rollout" in which:
        ps, res = P.compile_rollout(roles, log)
        progs.extend(ps)
        resident["rollout"] = res
    if "critic" in which and roles.critic is not None:
        ps, res = P.compile_critic(roles, log)
        progs.extend(ps)
        resident["critic"] = res
    elif roles.critic is not None and roles.critic_shared:
        resident["critic"] = P.critic_resident(roles)
    return progs, resident


def _policy_resident(roles: P.Roles) -> P.Resident:
    """Parameter and optimizer bytes per device without compiling the step (the shardings it would use)."""
    return P.train_program(roles)[2]


def candidates(config: ml_collections.ConfigDict, phase: str, roles: P.Roles) -> list[tuple[str, dict]]:
    """Config overrides that shrink one phase's footprint, most conservative first."""
    out: list[tuple[str, dict]] = []
    m = config.mesh
    if phase == "train":
        dp = roles.policy_mesh.shape["data"] * roles.policy_mesh.shape["fsdp"]
        rows = int(config.rollout.prompts_per_step) * int(config.rollout.group_size)
        minibatch = rows // int(config.rl.num_minibatches)
        micro = int(config.rl.micro_batch_size) // 2
        while micro >= dp and micro % dp == 0 and minibatch % micro == 0 and len(out) < 2:
            out.append((f"rl.micro_batch_size={micro}", {"rl.micro_batch_size": micro}))
            micro //= 2
    if phase in ("train", "rollout") and int(m.tensor) == 1:
        for t in (2, 4):
            if roles.policy.num_heads % t == 0 and roles.policy_mesh.devices.size % t == 0:
                out.append((f"mesh data=1 fsdp=-1 tensor={t}", {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": t}))
    if phase == "critic" and roles.critic is not None:
        size = int(config.critic.batch_size) // 2
        while size >= 1 and len(out) < 2:
            out.append((f"critic.batch_size={size}", {"critic.batch_size": size}))
            size //= 2
        devices = roles.critic_mesh.devices.size
        tensor = roles.critic_mesh.shape["tensor"] * 2
        if devices % tensor == 0 and roles.critic.num_heads % tensor == 0:
            out.append((f"critic.mesh data=-1 fsdp=1 tensor={tensor}",
                        {"critic.mesh.data": -1, "critic.mesh.fsdp": 1, "critic.mesh.tensor": tensor}))
    return out


def with_overrides(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    new = copy.deepcopy(config)
    for key, value in overrides.items():
        config_lib.apply_override(new, key, str(value))
    return new


def make_plan(config: ml_collections.ConfigDict, slice_name: str, *, which: Sequence[str] = ALL,
              layers: int | None = None, critic_layers: int | None = None, alternatives: int = 2,
              log: Callable[[str], None] = _log) -> Plan:
    """Compile the phases `which` of `config` for `slice_name` and account their memory; for each phase that does
    not fit, try up to `alternatives` overrides (each a recompilation of that phase) and record the results.
    `layers` / `critic_layers` plan a shrunk model as it is (layers are scanned: compile time hardly depends on
    depth, so shrinking is for tests that check layouts, not for speed)."""
    roles = P.build_roles(config, slice_name, layers=layers, critic_layers=critic_layers)
    progs, resident = compile_phases(roles, which, log)
    plan = Plan(roles=roles, programs=progs, resident=resident, phases=phase_memory(progs, resident, roles))
    if layers is not None or critic_layers is not None:
        plan.notes.append(f"depth shrunk for this plan (policy {roles.policy.num_layers} layers"
                          + (f", critic {roles.critic.num_layers}" if roles.critic is not None else "") + "): "
                          "per-layer memory, FLOPs and bytes scale with depth")
    tries = 0
    for ph in plan.phases:
        if ph.fits:
            continue
        for desc, overrides in candidates(config, ph.phase, roles):
            if tries >= alternatives:
                break
            tries += 1
            try:
                alt_roles = P.build_roles(with_overrides(config, overrides), slice_name, layers=layers,
                                          critic_layers=critic_layers)
                alt_progs, alt_res = compile_phases(alt_roles, [ph.phase], log)
                result = [p for p in phase_memory(alt_progs, alt_res, alt_roles) if p.phase == ph.phase]
            except Exception as exc:  # noqa: BLE001 - an alternative that cannot be built is reported, not fatal
                plan.alternatives.append((desc, f"not buildable ({type(exc).__name__}: {str(exc)[:160]})"))
                continue
            plan.alternatives.append((desc, result))
            if all(r.fits for r in result):
                break
    return plan
