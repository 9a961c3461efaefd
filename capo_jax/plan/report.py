"""The planner's verdict: memory per device in each phase of a step against HBM, and per program the FLOPs, HBM
bytes and collective bytes with the time bound each implies at the chip's limits."""
from __future__ import annotations

import dataclasses
from typing import Any

from capo_jax.plan import programs as P
from capo_jax.plan.topology import GiB

PHASES = ("train", "rollout", "critic")
SPARE_TARGET = 0.10  # fraction of HBM a plan should leave free (fragmentation, runtime buffers)


@dataclasses.dataclass
class PhaseMemory:
    """Bytes per device while one phase of the RL step runs, on the devices that run it."""

    phase: str
    program: str  # the program of the phase that needs the most
    parts: dict[str, float]
    hbm: float

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def spare(self) -> float:
        return 1.0 - self.total / self.hbm

    @property
    def fits(self) -> bool:
        return self.total <= self.hbm


@dataclasses.dataclass
class Plan:
    """Everything the planner compiled and concluded for one config on one slice."""

    roles: P.Roles
    programs: list[P.Program]
    resident: dict[str, P.Resident]  # "policy", "rollout", "critic"
    phases: list[PhaseMemory]
    notes: list[str] = dataclasses.field(default_factory=list)
    alternatives: list[tuple[str, list[PhaseMemory] | str]] = dataclasses.field(default_factory=list)

    def program(self, name: str) -> P.Program:
        return next(p for p in self.programs if p.name == name)

    @property
    def fits(self) -> bool:
        return all(ph.fits for ph in self.phases)


def phase_memory(plan_programs: list[P.Program], resident: dict[str, P.Resident], roles: P.Roles) -> list[PhaseMemory]:
    """Per phase, the program with the largest footprint and what it is made of."""
    hbm = roles.limits.hbm_bytes
    pol = resident.get("policy", P.Resident())
    critic_weights = resident.get("critic", P.Resident()).params
    out = []
    for phase in PHASES:
        best = None
        for prog in (p for p in plan_programs if p.phase == phase):
            m = prog.memory
            parts: dict[str, float] = {}
            args = float(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)
            if prog.role == "policy":
                parts["policy params"] = pol.params
                parts["optimizer state"] = pol.optimizer
                if prog.holds_resident:  # only the train step also takes the optimizer state (the reshard: params)
                    args -= pol.persistent if phase == "train" else pol.params
                if phase == "rollout":
                    ro = resident.get("rollout", P.Resident())
                    if prog.name == "rollout reshard":
                        parts["rollout copy"] = ro.rollout_copy
                        args -= ro.rollout_copy
                    else:
                        parts["rollout copy"] = ro.rollout_copy
                        parts["KV cache"] = ro.kv_cache
                        args -= ro.rollout_copy + ro.kv_cache
                if roles.critic_shared and critic_weights:
                    parts["critic weights"] = critic_weights
            else:
                cr = resident.get("critic", P.Resident())
                parts["critic weights"] = cr.params
                parts["KV cache"] = cr.kv_cache
                args -= cr.params + cr.kv_cache
                if roles.critic_shared:
                    parts["policy params"] = pol.params
                    parts["optimizer state"] = pol.optimizer
            parts["other arguments"] = max(args, 0.0)
            parts["compiler temp"] = float(m.temp_size_in_bytes)
            candidate = PhaseMemory(phase, prog.name, parts, hbm)
            if best is None or candidate.total > best.total:
                best = candidate
        if best is not None:
            out.append(best)
    return out


# ----------------------------------------------------------------------------- program figures


@dataclasses.dataclass(frozen=True)
class Bounds:
    """Per unit (step / call / token), per device."""

    flops: float
    model_flops: float
    hbm_bytes: float
    model_bytes: float | None
    ici_bytes: float
    compute_s: float
    hbm_s: float
    ici_s: float

    @property
    def bound(self) -> str:
        times = {"compute": self.compute_s, "HBM": self.hbm_s, "ICI": self.ici_s}
        return max(times, key=times.get)

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.hbm_s, self.ici_s)


def bounds(prog: P.Program, roles: P.Roles) -> Bounds:
    lim = roles.limits
    per = max(prog.per, 1)
    flops, hbm_b, ici_b = prog.flops / per, prog.hbm_bytes / per, prog.collective_bytes / per
    return Bounds(flops=flops, model_flops=prog.analytic_flops / per, hbm_bytes=hbm_b,
                  model_bytes=None if prog.analytic_bytes is None else prog.analytic_bytes / per, ici_bytes=ici_b,
                  compute_s=flops / lim.peak_flops, hbm_s=hbm_b / lim.hbm_bandwidth, ici_s=ici_b / lim.ici_bandwidth)


def collectives_line(prog: P.Program) -> str:
    per = max(prog.per, 1)
    parts = []
    for kind, (count, sent) in sorted(prog.collectives.items()):
        parts.append(f"{kind} {count / per:.4g}x {_bytes(sent / per)}")
    return ", ".join(parts) if parts else "none"


# ----------------------------------------------------------------------------- text


def _bytes(b: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(b) >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def _gib(b: float) -> str:
    return f"{b / GiB:.2f}"


def _secs(s: float) -> str:
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def _mesh(mesh: Any) -> str:
    return " x ".join(f"{k}={v}" for k, v in mesh.shape.items()) + f" ({mesh.devices.size} devices)"


def header(plan: Plan, config_name: str) -> list[str]:
    r = plan.roles
    lim = r.limits
    lines = [f"capo_jax.plan: {config_name} on {r.slice.describe()}, {len(r.devices)} devices",
             f"per device: {lim.peak_flops / 1e12:.4g} TFLOP/s bf16, {lim.hbm_bandwidth / 1e9:.4g} GB/s HBM, "
             f"{lim.hbm_bytes / GiB:.4g} GiB HBM, {lim.ici_bandwidth / 1e9:.4g} GB/s ICI (sent)",
             f"policy: {r.policy.num_layers} layers, {r.policy.hidden_size} wide, {r.policy.param_dtype} weights, "
             f"{r.policy.dtype} compute; mesh {_mesh(r.policy_mesh)}"]
    if r.critic is not None:
        where = "sharing the policy's devices" if r.critic_shared else "on its own devices"
        lines.append(f"critic: {r.critic.num_layers} layers, {r.critic.hidden_size} wide, {r.critic.dtype}; "
                     f"mesh {_mesh(r.critic_mesh)}, {where}")
    return lines


def memory_table(phases: list[PhaseMemory]) -> list[str]:
    names: list[str] = []
    for ph in phases:
        names.extend(n for n in ph.parts if n not in names)
    lines = ["", "Memory per device (GiB), the largest program of each phase:",
             f"  {'':26}" + "".join(f"{ph.phase:>16}" for ph in phases)]
    for n in names:
        lines.append(f"  {n:26}" + "".join(f"{_gib(ph.parts[n]) if n in ph.parts else '-':>16}" for ph in phases))
    lines.append(f"  {'total':26}" + "".join(f"{_gib(ph.total):>16}" for ph in phases))
    lines.append(f"  {'HBM':26}" + "".join(f"{_gib(ph.hbm):>16}" for ph in phases))
    lines.append(f"  {f'spare (target {SPARE_TARGET:.0%})':26}" + "".join(f"{ph.spare:>16.0%}" for ph in phases))
    lines.append(f"  {'program':26}" + "".join(f"{ph.program:>16}" for ph in phases))
    verdict = ["fits" if ph.fits and ph.spare >= SPARE_TARGET else "tight" if ph.fits else "DOES NOT FIT"
               for ph in phases]
    lines.append(f"  {'verdict':26}" + "".join(f"{v:>16}" for v in verdict))
    return lines


def program_table(plan: Plan) -> list[str]:
    lines = ["", "Programs per device (per unit: a step, a call, or one decoded token):",
             f"  {'program':18} {'unit':>5} {'FLOPs':>9} {'model':>9} {'ratio':>6} {'HBM':>9} {'model':>9} {'ratio':>6}"
             f" {'ICI':>9} {'compute':>9} {'HBM t':>9} {'ICI t':>9} {'bound':>8} {'compile':>8}"]
    for prog in plan.programs:
        b = bounds(prog, plan.roles)
        ratio = f"{b.flops / b.model_flops:.2f}" if b.model_flops else "-"
        mb = _bytes(b.model_bytes) if b.model_bytes else "-"
        bratio = f"{b.hbm_bytes / b.model_bytes:.2f}" if b.model_bytes else "-"
        lines.append(f"  {prog.name:18} {prog.unit:>5} {b.flops:9.3g} {b.model_flops:9.3g} {ratio:>6} "
                     f"{_bytes(b.hbm_bytes):>9} {mb:>9} {bratio:>6} {_bytes(b.ici_bytes):>9} {_secs(b.compute_s):>9} "
                     f"{_secs(b.hbm_s):>9} {_secs(b.ici_s):>9} {b.bound:>8} {prog.seconds:7.0f}s")
    lines.append("")
    lines.append("Collectives per unit (count x bytes each device sends):")
    for prog in plan.programs:
        lines.append(f"  {prog.name:18} {collectives_line(prog)}")
        loops = prog.undetermined_trips
        if loops:
            lines.append(f"  {'':18} ({len(loops)} loop(s) whose trip count the HLO does not say: counted "
                         f"{int(loops[0])} times)")
    return lines


def render(plan: Plan, config_name: str) -> str:
    lines = header(plan, config_name) + memory_table(plan.phases) + program_table(plan)
    if plan.alternatives:
        lines += ["", "Alternatives tried (the failing phases recompiled):"]
        for desc, result in plan.alternatives:
            if isinstance(result, str):
                lines.append(f"  {desc}: {result}")
            else:
                verdict = "; ".join(f"{ph.phase} {_gib(ph.total)}/{_gib(ph.hbm)} GiB "
                                    f"{f'fits ({ph.spare:.0%} spare)' if ph.fits else 'does not fit'}"
                                    for ph in result)
                lines.append(f"  {desc}: {verdict}")
    for note in plan.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
