"""Read an optimised HLO module's text (`compiled.as_text()`): collectives with their bytes, FLOPs of dots and
convolutions, and an estimate of HBM traffic, each multiplied by the trip counts of the loops around it.

Why: `compiled.cost_analysis()` counts a while-loop body once, so a 28-layer scan or a 1024-token decode loop
reports one iteration. Here every computation gets a multiplicity (how often it runs per call of the entry):
a while body runs `trip` times its caller, its trip count read from the loop's backend config
(`known_trip_count`) or derived from its condition (`i < N` on an induction variable that starts at a constant and
steps by one); a loop whose count cannot be read takes `default_trip` (the caller knows it, e.g. a decode loop
that stops early runs at most max_new_tokens - 1 times).

HBM traffic is an estimate: each top-level op (outside fusions) reads its operands and writes its result, except
that buffers the compiler placed in another memory space (`S(1)`: on-chip memory on TPU) cost nothing, a fusion
reads only the slices it takes of a sliced operand and writes only the update of an in-place
dynamic-update-slice, and async copies between memory spaces count on their HBM side.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Iterable, Iterator

DTYPE_BITS = {
    "pred": 8, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32, "u32": 32, "s64": 64, "u64": 64,
    "f16": 16, "bf16": 16, "f32": 32, "f64": 64, "c64": 64, "c128": 128, "f8e4m3fn": 8, "f8e5m2": 8,
    "f8e4m3b11fnuz": 8, "f8e4m3fnuz": 8, "f8e5m2fnuz": 8, "token": 0, "opaque": 0,
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute",
               "collective-broadcast", "ragged-all-to-all")
# Ops that move or name data without touching HBM themselves (their cost is counted elsewhere or is nil).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call", "conditional",
         "after-all", "partition-id", "replica-id", "opt-barrier", "iota", "get-dimension-size", "domain",
         "add-dependency", "copy-done", "slice-done", "send-done", "recv-done", "async-done", "async-update"}
_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^{}]*\})?")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")


@dataclasses.dataclass(frozen=True)
class Shape:
    """One array: element type, dimensions and memory space (0 = HBM; the `S(n)` of its layout)."""

    dtype: str
    dims: tuple[int, ...]
    memory_space: int = 0

    @property
    def elements(self) -> int:
        return math.prod(self.dims)

    @property
    def bytes(self) -> int:
        return self.elements * DTYPE_BITS.get(self.dtype, 32) // 8


@dataclasses.dataclass
class Instruction:
    """One HLO instruction: its result shapes (a tuple flattened), opcode, operand names and attribute text."""

    name: str
    opcode: str
    shapes: list[Shape]
    operands: list[str]
    attrs: str
    root: bool = False
    literal: str = ""  # a constant's value text

    def attr(self, key: str) -> str | None:
        """The text of attribute `key` (balanced over braces), or None."""
        return _attribute(self.attrs, key)

    def called(self) -> list[tuple[str, str]]:
        """(role, computation) pairs this instruction calls: body / condition / calls / branch / to_apply."""
        out = []
        for key in ("body", "condition", "calls", "to_apply", "true_computation", "false_computation"):
            value = self.attr(key)
            if value:
                out.extend((key, name) for name in _names(value))
        for key in ("branch_computations", "called_computations"):
            value = self.attr(key)
            if value:
                out.extend(("branch" if key == "branch_computations" else "calls", name) for name in _names(value))
        return out

    @property
    def result_bytes(self) -> int:
        return sum(s.bytes for s in self.shapes)


@dataclasses.dataclass
class Computation:
    name: str
    instructions: list[Instruction]
    entry: bool = False

    def __post_init__(self):
        self.by_name = {i.name: i for i in self.instructions}

    @property
    def root(self) -> Instruction:
        for i in self.instructions:
            if i.root:
                return i
        return self.instructions[-1]

    def parameter(self, index: int) -> Instruction | None:
        for i in self.instructions:
            if i.opcode == "parameter" and i.literal == str(index):
                return i
        return None


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective op as it runs: kind, bytes of the (per-device) array it moves, group size, how many times
    it runs per call of the program, and the bytes each device sends per run (ring algorithms)."""

    kind: str
    name: str
    dtype: str
    array_bytes: int  # all-gather: the gathered result; the others: the operand
    group: int
    count: float  # runs per call of the entry computation
    op_name: str = ""
    dims: tuple[int, ...] = ()  # shape of the array it moves (as `array_bytes` counts it)

    @property
    def sent_bytes(self) -> float:
        """Bytes one device sends per run: (n-1)/n of the array for gathers/scatters/all-to-all, twice that for
        an all-reduce (reduce-scatter + all-gather), the whole operand for a permute."""
        n = max(self.group, 1)
        frac = (n - 1) / n
        if self.kind == "all-reduce":
            return 2 * frac * self.array_bytes
        if self.kind in ("collective-permute", "collective-broadcast"):
            return float(self.array_bytes)
        return frac * self.array_bytes

    @property
    def total_sent(self) -> float:
        return self.sent_bytes * self.count


@dataclasses.dataclass
class Analysis:
    """What one compiled program does per call, per device."""

    flops: float
    hbm_bytes: float
    collectives: list[Collective]
    loops: list[tuple[str, float, bool]]  # (while name, trip count, derived?) outermost first in text order
    undetermined_loops: int
    hbm_top: list[tuple[float, str, str]] = dataclasses.field(default_factory=list)  # (bytes, instruction, op_name)

    def collective_bytes(self, kinds: Iterable[str] | None = None) -> float:
        kinds = set(COLLECTIVES if kinds is None else kinds)
        return sum(c.total_sent for c in self.collectives if c.kind in kinds)

    def by_kind(self) -> dict[str, tuple[float, float]]:
        """kind -> (runs per call, bytes sent per call)."""
        out: dict[str, tuple[float, float]] = {}
        for c in self.collectives:
            n, b = out.get(c.kind, (0.0, 0.0))
            out[c.kind] = (n + c.count, b + c.total_sent)
        return out


# ----------------------------------------------------------------------------- text -> computations


def _balanced(text: str, start: int, open_ch: str, close_ch: str) -> int:
    """Index just past the bracket that closes the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == open_ch:
            depth += 1
        elif ch == close_ch:
            depth -= 1
            if depth == 0:
                return i + 1
        elif ch == '"':  # skip string literals (backend configs hold braces)
            j = i + 1
            while j < len(text) and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
    raise ValueError(f"unbalanced {open_ch}{close_ch} in HLO text: {text[start:start + 80]!r}")


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside (), {} or [] (or strings)."""
    parts, depth, cur, in_str = [], 0, [], False
    i = 0
    while i < len(text):
        ch = text[i]
        if in_str:
            cur.append(ch)
            if ch == "\\" and i + 1 < len(text):
                cur.append(text[i + 1])
                i += 1
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
            cur.append(ch)
        elif ch in "({[":
            depth += 1
            cur.append(ch)
        elif ch in ")}]":
            depth -= 1
            cur.append(ch)
        elif ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
        i += 1
    if "".join(cur).strip():
        parts.append("".join(cur).strip())
    return parts


def _attribute(attrs: str, key: str) -> str | None:
    for part in _split_top(attrs):
        if part.startswith(key + "="):
            return part[len(key) + 1:]
    return None


def _names(value: str) -> list[str]:
    return [n.lstrip("%") for n in re.findall(r"%?[\w.\-]+", value.strip("{}")) if n.strip()]


def parse_shapes(text: str) -> list[Shape]:
    """Every array shape in a (possibly tuple) HLO type, flattened, with its memory space."""
    out = []
    for dtype, dims, layout in _SHAPE.findall(text):
        if dtype not in DTYPE_BITS:
            continue
        space = 0
        if layout:
            m = re.search(r"S\((\d+)\)", layout)
            space = int(m.group(1)) if m else 0
        out.append(Shape(dtype, tuple(int(d) for d in dims.split(",") if d), space))
    return out


def _parse_instruction(line: str) -> Instruction | None:
    text = line.strip()
    root = text.startswith("ROOT ")
    if root:
        text = text[5:]
    if " = " not in text:
        return None
    name, rest = text.split(" = ", 1)
    name = name.strip().lstrip("%")
    if rest.startswith("("):
        end = _balanced(rest, 0, "(", ")")
    else:
        m = re.match(r"[a-z0-9]+\[[0-9,]*\](\{[^ ]*\})?", rest)
        if m is None:
            return None
        end = m.end()
    type_text, rest = rest[:end], rest[end:].strip()
    m = re.match(r"([a-z][a-z0-9\-]*)\(", rest)
    if m is None:
        return None
    opcode = m.group(1)
    close = _balanced(rest, m.end() - 1, "(", ")")
    inner = rest[m.end():close - 1]
    attrs = rest[close:].lstrip(", ")
    operands, literal = [], ""
    if opcode in ("constant", "parameter"):
        literal = inner.strip()
    else:
        for part in _split_top(inner):
            refs = re.findall(r"%([\w.\-]+)", part)
            if refs:
                operands.append(refs[-1])
    return Instruction(name=name, opcode=opcode, shapes=parse_shapes(type_text), operands=operands, attrs=attrs,
                       root=root, literal=literal)


def parse_module(text: str) -> dict[str, Computation]:
    """Computations of an HLO module text by name (the entry one has `entry=True`)."""
    comps: dict[str, Computation] = {}
    current: list[Instruction] | None = None
    name, entry = "", False
    for line in text.splitlines():
        if current is None:
            m = _HEADER.match(line.strip())
            if m and not line.startswith(" "):
                name, entry, current = m.group(2), bool(m.group(1)), []
            continue
        if line.strip() == "}":
            comps[name] = Computation(name, current, entry)
            current = None
            continue
        inst = _parse_instruction(line)
        if inst is not None:
            current.append(inst)
    if not any(c.entry for c in comps.values()):
        raise ValueError("no ENTRY computation in the HLO text: pass compiled.as_text() of a compiled program")
    return comps


# ----------------------------------------------------------------------------- loops


def _int_literal(inst: Instruction | None) -> int | None:
    if inst is None or inst.opcode != "constant":
        return None
    try:
        return int(float(inst.literal))
    except ValueError:
        return None


def _through(comp: Computation, name: str) -> Instruction | None:
    """The instruction `name` names, looking through copies, converts and bitcasts."""
    inst = comp.by_name.get(name)
    while inst is not None and inst.opcode in ("copy", "convert", "bitcast") and inst.operands:
        inst = comp.by_name.get(inst.operands[0])
    return inst


def _compare_in(comps: dict[str, Computation], comp: Computation, inst: Instruction):
    """(direction, lhs, rhs) of the compare that decides a loop condition: each side as ('gte', index) or
    ('const', value), looking into a fusion that wraps the compare; None if it is anything else."""
    if inst.opcode == "fusion":
        called = [c for role, c in inst.called() if role == "calls"]
        if not called or called[0] not in comps:
            return None
        inner = comps[called[0]]
        root = inner.root
        if root.opcode != "compare" or len(root.operands) != 2:
            return None
        return (_direction(root), _side(inner, root.operands[0], comp, inst),
                _side(inner, root.operands[1], comp, inst))
    if inst.opcode != "compare" or len(inst.operands) != 2:
        return None
    return _direction(inst), _side(comp, inst.operands[0]), _side(comp, inst.operands[1])


def _side(comp: Computation, name: str, outer: Computation | None = None, fusion: Instruction | None = None):
    """One side of a loop condition's compare: ('const', value), ('gte', tuple index) or None; a fused compare's
    parameter is followed out to the `fusion`'s operand in `outer`."""
    p = _through(comp, name)
    if p is None:
        return None
    if p.opcode == "constant":
        return ("const", _int_literal(p))
    if p.opcode == "parameter" and fusion is not None:
        return _side(outer, fusion.operands[int(p.literal)])
    if p.opcode == "get-tuple-element":
        src = _through(comp, p.operands[0])
        if src is not None and src.opcode == "parameter":
            return ("gte", int(p.attr("index") or 0))
    return None


def _direction(inst: Instruction) -> str:
    return (inst.attr("direction") or "").strip()


def trip_count(comps: dict[str, Computation], caller: Computation, loop: Instruction) -> int | None:
    """Iterations of a while loop: its `known_trip_count`, else derived from `i < N` (or <=, >, >=, !=) on a
    tuple element that starts at a constant and steps by one in the body; None when neither applies."""
    config = loop.attr("backend_config")
    if config:
        try:
            known = json.loads(config).get("known_trip_count", {}).get("n")
            if known is not None:
                return int(known)
        except (ValueError, AttributeError):
            pass
    roles = dict(loop.called())
    cond, body = comps.get(roles.get("condition", "")), comps.get(roles.get("body", ""))
    if cond is None or body is None or not loop.operands:
        return None
    found = _compare_in(comps, cond, cond.root)
    if found is None or None in found:
        return None
    direction, lhs, rhs = found
    if lhs[0] == "const" and rhs[0] == "gte":  # N > i  is  i < N
        lhs, rhs = rhs, lhs
        direction = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(direction, direction)
    if lhs[0] != "gte" or rhs[0] != "const" or rhs[1] is None:
        return None
    index, limit = lhs[1], rhs[1]
    init = _init_value(caller, loop.operands[0], index)
    step = _step(comps, body, index)
    if init is None or step is None or step == 0:
        return None
    if direction == "LT" and step > 0:
        return max(0, -(-(limit - init) // step))
    if direction == "LE" and step > 0:
        return max(0, (limit - init) // step + 1)
    if direction == "GT" and step < 0:
        return max(0, -(-(init - limit) // -step))
    if direction == "GE" and step < 0:
        return max(0, (init - limit) // -step + 1)
    if direction == "NE" and (limit - init) % step == 0 and (limit - init) // step >= 0:
        return (limit - init) // step
    return None


def _init_value(comp: Computation, tuple_name: str, index: int) -> int | None:
    tup = _through(comp, tuple_name)
    if tup is None or tup.opcode != "tuple" or index >= len(tup.operands):
        return None
    return _int_literal(_through(comp, tup.operands[index]))


def _step(comps: dict[str, Computation], body: Computation, index: int) -> int | None:
    """The constant the body adds to tuple element `index` each iteration (None if it is not `i + c`)."""
    root = body.root
    if root.opcode != "tuple" or index >= len(root.operands):
        return None
    upd = _through(body, root.operands[index])
    if upd is None:
        return None
    if upd.opcode == "fusion":  # a wrapped add (XLA:CPU)
        called = [c for role, c in upd.called() if role == "calls"]
        return _fused_step(comps.get(called[0]) if called else None, body, upd)
    return _add_step(body, upd)


def _fused_step(inner: Computation | None, body: Computation, fusion: Instruction) -> int | None:
    if inner is None or inner.root.opcode not in ("add", "subtract") or len(inner.root.operands) != 2:
        return None
    consts, outers = [], []
    for operand in inner.root.operands:
        p = _through(inner, operand)
        if p is None:
            return None
        if p.opcode == "constant":
            consts.append(_int_literal(p))
        elif p.opcode == "parameter":
            outers.append(fusion.operands[int(p.literal)])
        else:
            return None
    if len(outers) == 2:  # both from outside the fusion: one of them must be a constant there
        known = [v for v in (_int_literal(_through(body, o)) for o in outers) if v is not None]
        consts, outers = known, outers[:1]
    if len(consts) != 1 or consts[0] is None or len(outers) != 1:
        return None
    return consts[0] if inner.root.opcode == "add" else -consts[0]


def _add_step(body: Computation, upd: Instruction) -> int | None:
    if upd.opcode not in ("add", "subtract") or len(upd.operands) != 2:
        return None
    sides = [_through(body, o) for o in upd.operands]
    consts = [_int_literal(s) for s in sides if s is not None and s.opcode == "constant"]
    if len(consts) != 1 or consts[0] is None:
        return None
    return consts[0] if upd.opcode == "add" else -consts[0]


# ----------------------------------------------------------------------------- multiplicities


def multiplicities(comps: dict[str, Computation], default_trip: int | None = None
                   ) -> tuple[dict[str, float], list[tuple[str, float, bool]], set[str]]:
    """How many times each computation runs per call of the entry; the loops seen (name, trip, derived); and the
    names of computations that are fusion bodies (their ops are not separate HBM round trips)."""
    entry = next(c for c in comps.values() if c.entry)
    mult: dict[str, float] = {entry.name: 1.0}
    loops: list[tuple[str, float, bool]] = []
    fused: set[str] = set()
    order = [entry.name]
    seen = {entry.name}
    i = 0
    edges: dict[str, list[tuple[str, float]]] = {}
    while i < len(order):
        comp = comps[order[i]]
        i += 1
        for inst in comp.instructions:
            calls = inst.called()
            if not calls:
                continue
            factor = {}
            if inst.opcode == "while":
                trip = trip_count(comps, comp, inst)
                derived = trip is not None
                if trip is None:
                    trip = default_trip if default_trip is not None else 1
                loops.append((inst.name, float(trip), derived))
                factor = {"body": float(trip), "condition": float(trip) + 1}
            for role, callee in calls:
                if callee not in comps or role == "to_apply" and inst.opcode != "call":
                    continue  # reduction computations: scalar, no dots, no collectives
                if inst.opcode == "fusion" or role == "calls" and inst.opcode not in ("call", "async-start"):
                    fused.add(callee)
                edges.setdefault(comp.name, []).append((callee, factor.get(role, 1.0)))
                if callee not in seen:
                    seen.add(callee)
                    order.append(callee)
    # computations form a DAG: accumulate in topological order (callers before callees)
    indeg = {n: 0 for n in order}
    for src, outs in edges.items():
        for dst, _ in outs:
            indeg[dst] += 1
    ready = [n for n in order if indeg[n] == 0]
    while ready:
        n = ready.pop()
        for dst, f in edges.get(n, []):
            mult[dst] = mult.get(dst, 0.0) + mult.get(n, 0.0) * f
            indeg[dst] -= 1
            if indeg[dst] == 0:
                ready.append(dst)
    return mult, loops, fused


# ----------------------------------------------------------------------------- FLOPs, collectives, bytes


def _operand_shapes(comp: Computation, inst: Instruction) -> list[list[Shape]]:
    out = []
    for name in inst.operands:
        src = comp.by_name.get(name)
        out.append(src.shapes if src is not None else [])
    return out


def _dims_attr(inst: Instruction, key: str) -> list[int]:
    value = inst.attr(key)
    if not value:
        return []
    return [int(v) for v in re.findall(r"\d+", value)]


def instruction_flops(comp: Computation, inst: Instruction) -> float:
    """2 x multiply-adds of a dot or convolution (0 for anything else)."""
    if inst.opcode == "dot":
        ops = _operand_shapes(comp, inst)
        if not ops or not ops[0] or not inst.shapes:
            return 0.0
        lhs = ops[0][0]
        contracted = math.prod(lhs.dims[d] for d in _dims_attr(inst, "lhs_contracting_dims"))
        return 2.0 * inst.shapes[0].elements * contracted
    if inst.opcode == "convolution":
        return _convolution_flops(comp, inst)
    return 0.0


def _window(window: str, key: str, spatial: int, default: int) -> list[int]:
    found = re.search(rf"\b{key}=([\d_x-]+)", window)
    if not found:
        return [default] * spatial
    return [int(v.split("_")[0]) for v in found.group(1).split("x")]


def _convolution_flops(comp: Computation, inst: Instruction) -> float:
    """2 x (output batch x output features) x input features x, per spatial dim, the (output, tap) pairs that land
    on real input: not padding, not a hole that lhs dilation inserts. The TPU compiler writes batched and
    collective matmuls as convolutions whose windows mostly touch padding or holes, so a plain window product
    would overcount them."""
    ops = _operand_shapes(comp, inst)
    if len(ops) < 2 or not ops[0] or not ops[1] or not inst.shapes:
        return 0.0
    lhs, kernel, out = ops[0][0], ops[1][0], inst.shapes[0]
    m = re.match(r"([^_]*)_([^-]*)->(.*)", inst.attr("dim_labels") or "")
    if m is None:
        return 0.0
    lhs_l, ker_l, out_l = m.groups()
    features = kernel.dims[ker_l.index("i")] if "i" in ker_l else 1
    spatial = sorted(ch for ch in out_l if ch.isdigit())
    window = inst.attr("window") or ""
    sizes = _window(window, "size", len(spatial), 1)
    strides = _window(window, "stride", len(spatial), 1)
    lhs_dil = _window(window, "lhs_dilate", len(spatial), 1)
    rhs_dil = _window(window, "rhs_dilate", len(spatial), 1)
    pads = [0] * len(spatial)
    found = re.search(r"\bpad=([\d_x-]+)", window)
    if found:
        pads = [int(v.split("_")[0]) for v in found.group(1).split("x")]
    pairs = 1
    out_spatial = 1
    for k, ch in enumerate(spatial):
        n_in, n_out = lhs.dims[lhs_l.index(ch)], out.dims[out_l.index(ch)]
        out_spatial *= n_out
        hits = 0
        for o in range(n_out):
            for t in range(sizes[k]):
                pos = o * strides[k] + t * rhs_dil[k] - pads[k]
                if 0 <= pos <= (n_in - 1) * lhs_dil[k] and pos % lhs_dil[k] == 0:
                    hits += 1
        pairs *= hits
    return 2.0 * (out.elements // max(out_spatial, 1)) * features * pairs


def _group_size(inst: Instruction, num_devices: int | None) -> int:
    groups = inst.attr("replica_groups")
    if groups is None:
        pairs = inst.attr("source_target_pairs")
        return 2 if pairs else (num_devices or 1)
    groups = groups.strip()
    m = re.match(r"mesh\[(.*?)\]\s*\{(.*?)\}", groups)
    if m:
        sizes = dict((k.strip().strip("'"), int(v)) for k, v in re.findall(r"('?[\w]+'?)=(\d+)", m.group(1)))
        axes = [a.strip().strip("'") for a in m.group(2).split(",") if a.strip()]
        return math.prod(sizes.get(a, 1) for a in axes)
    m = re.match(r"\[([\d,]+)\]<=\[", groups)  # iota form [groups, size]<=[N]
    if m:
        dims = [int(v) for v in m.group(1).split(",")]
        return dims[-1]
    m = re.match(r"\{\{([^}]*)\}", groups)
    if m:
        return len([v for v in m.group(1).split(",") if v.strip()])
    return num_devices or 1


def _collective(comp: Computation, inst: Instruction, count: float, num_devices: int | None) -> Collective | None:
    kind = inst.opcode.removesuffix("-start")
    if kind not in COLLECTIVES:
        return None
    operands = [s for shapes in _operand_shapes(comp, inst) for s in shapes]
    results = [s for s in inst.shapes if s.dims or s.dtype not in ("u32", "s32")]
    if inst.opcode.endswith("-start") and len(inst.shapes) >= 2:
        results = [inst.shapes[1]] if kind != "collective-permute" else [inst.shapes[0]]
    arrays = results if kind == "all-gather" or not operands else operands
    size = sum(s.bytes for s in arrays)
    meta = re.search(r'op_name="([^"]*)"', inst.attrs)
    return Collective(kind=kind, name=inst.name, dtype=arrays[0].dtype if arrays else "", array_bytes=size,
                      group=_group_size(inst, num_devices), count=count, op_name=meta.group(1) if meta else "",
                      dims=arrays[0].dims if arrays else ())


def _hbm(shapes: Iterable[Shape]) -> int:
    return sum(s.bytes for s in shapes if s.memory_space == 0)


def _read_bytes(comps: dict[str, Computation], inner: Computation, param: Instruction, full: float,
                in_place: set[str], depth: int = 0) -> float:
    """Bytes a fused computation reads of its parameter `param` (whose whole array is `full` bytes): the slices it
    takes when every use slices it (looking into nested fusions), nothing for an in-place update's base, else all."""
    users = [u for u in inner.instructions if param.name in u.operands]
    total = 0.0
    for u in users:
        position = u.operands.index(param.name)
        if u.opcode == "dynamic-update-slice" and position == 0 and param.name in in_place:
            continue
        if u.opcode in ("dynamic-slice", "slice", "gather") and position == 0:
            total += u.result_bytes
        elif u.opcode == "fusion" and depth < 4:
            called = [c for role, c in u.called() if role == "calls"]
            nested = comps.get(called[0]) if called else None
            p = nested.parameter(position) if nested is not None else None
            total += full if p is None else _read_bytes(comps, nested, p, full, set(), depth + 1)
        else:
            return full
    return min(total, full)


def _fusion_bytes(comps: dict[str, Computation], comp: Computation, inst: Instruction) -> float:
    """HBM bytes of one fusion: operands it reads (a sliced operand: just its slices) and the result it writes
    (an in-place dynamic-update-slice root: just the update)."""
    called = [c for role, c in inst.called() if role == "calls"]
    inner = comps.get(called[0]) if called else None
    operand_shapes = _operand_shapes(comp, inst)
    if inner is None:
        return _hbm(s for shapes in operand_shapes for s in shapes) + _hbm(inst.shapes)
    root = inner.root
    in_place = set()
    write = 0.0
    roots = [inner.by_name.get(o) for o in root.operands] if root.opcode == "tuple" else [root]
    outs = inst.shapes if root.opcode == "tuple" else inst.shapes[:1]
    for r, out in zip(roots, outs if len(outs) == len(roots) else [None] * len(roots)):
        if r is not None and r.opcode == "dynamic-update-slice" and len(r.operands) > 1:
            base = _through(inner, r.operands[0])
            if base is not None and base.opcode == "parameter":
                in_place.add(base.name)
            upd = inner.by_name.get(r.operands[1])
            if out is None or out.memory_space == 0:
                write += sum(s.bytes for s in (upd.shapes if upd else []))
        elif out is not None:
            write += _hbm([out])
    if len(outs) != len(roots):
        write = _hbm(inst.shapes)
    read = 0.0
    for i in inner.instructions:
        if i.opcode != "parameter":
            continue
        k = int(i.literal)
        shapes = operand_shapes[k] if k < len(operand_shapes) else []
        if not shapes or all(s.memory_space != 0 for s in shapes):
            continue
        read += _read_bytes(comps, inner, i, float(_hbm(shapes)), in_place)
    return read + write


def instruction_hbm_bytes(comps: dict[str, Computation], comp: Computation, inst: Instruction) -> float:
    """Estimated HBM bytes one run of a top-level instruction reads and writes (see the module docstring)."""
    op = inst.opcode
    if op in _FREE:
        return 0.0
    if op == "fusion":
        return _fusion_bytes(comps, comp, inst)
    if op in ("copy-start", "slice-start"):
        if len(inst.shapes) < 2:
            return 0.0
        ops = [s for shapes in _operand_shapes(comp, inst) for s in shapes]
        src_hbm = any(s.memory_space == 0 for s in ops) if ops else inst.shapes[0].memory_space == 0
        dst = inst.shapes[1]
        return float((dst.bytes if src_hbm else 0) + (dst.bytes if dst.memory_space == 0 else 0))
    if op == "dynamic-update-slice":
        ops = _operand_shapes(comp, inst)
        upd = ops[1] if len(ops) > 1 else []
        return 2.0 * _hbm(upd)
    if op in ("dynamic-slice", "slice"):
        return 2.0 * _hbm(inst.shapes)
    ops = [s for shapes in _operand_shapes(comp, inst) for s in shapes]
    if op.endswith("-start") or op.endswith("-done"):
        return 0.0 if op.endswith("-done") else float(_hbm(ops) + _hbm(inst.shapes[1:2]))
    return float(_hbm(ops) + _hbm(inst.shapes))


def analyze(text: str, *, default_trip: int | None = None, num_devices: int | None = None) -> Analysis:
    """FLOPs, collectives and estimated HBM bytes of one call of the program in `text`, per device."""
    comps = parse_module(text)
    mult, loops, fused = multiplicities(comps, default_trip)
    flops = 0.0
    hbm = 0.0
    collectives: list[Collective] = []
    by_channel: dict[str, Collective] = {}
    items: list[tuple[float, str, str]] = []
    for name, comp in comps.items():
        m = mult.get(name, 0.0)
        if m == 0.0:
            continue
        for inst in comp.instructions:
            flops += m * instruction_flops(comp, inst)
            if name not in fused:
                b = m * instruction_hbm_bytes(comps, comp, inst)
                hbm += b
                if b:
                    meta = re.search(r'op_name="([^"]*)"', inst.attrs)
                    items.append((b, inst.name, meta.group(1) if meta else ""))
            c = _collective(comp, inst, m, num_devices)
            if c is None:
                continue
            # TPU splits one async collective over a start, several continuation fusions (overlapping compute)
            # and a done fusion, each holding the op with the same channel id: count each channel once.
            channel = inst.attr("channel_id")
            if channel is None:
                collectives.append(c)
            elif channel not in by_channel or by_channel[channel].count < c.count:
                by_channel[channel] = c
    collectives.extend(by_channel.values())
    undetermined = sum(1 for _, _, derived in loops if not derived)
    return Analysis(flops=flops, hbm_bytes=hbm, collectives=collectives, loops=loops,
                    undetermined_loops=undetermined, hbm_top=sorted(items, reverse=True)[:20])


def iter_collectives(analysis: Analysis, kind: str | None = None, min_bytes: int = 0) -> Iterator[Collective]:
    """The collectives of `analysis` of one kind (or all) moving at least `min_bytes` per run."""
    for c in analysis.collectives:
        if (kind is None or c.kind == kind) and c.array_bytes >= min_bytes:
            yield c
