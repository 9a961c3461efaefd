"""The HLO reader of the planner, against counts derived by hand (handwritten and CPU-compiled modules)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from capo_jax.plan import hlo

# A TPU-style module written by hand: an outer loop (i < 3, from 0, step 1) around an inner loop whose condition
# wraps its compare in a fusion (j <= 4 from 1: 4 trips); a dot in the inner body; collectives of the forms the
# TPU compiler prints (mesh replica groups, an async start/done pair, explicit groups, a permute); a fusion that
# slices a big operand and updates a buffer in place; a buffer in memory space 1 (on chip, no HBM cost).
HANDWRITTEN = """HloModule handwritten, is_scheduled=true

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%dot_fusion (p0: bf16[16,64], p1: bf16[64,32]) -> f32[16,32] {
  %p0 = bf16[16,64]{1,0} parameter(0)
  %p1 = bf16[64,32]{1,0} parameter(1)
  ROOT %d = f32[16,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%wrapped_le (x: s32[], y: s32[]) -> pred[] {
  %x = s32[] parameter(0)
  %y = s32[] parameter(1)
  ROOT %c = pred[] compare(%x, %y), direction=LE
}

%inner_cond (t: (s32[], f32[16,32])) -> pred[] {
  %t = (s32[], f32[16,32]{1,0}) parameter(0)
  %j = s32[] get-tuple-element(%t), index=0
  %four = s32[] constant(4)
  ROOT %le = pred[] fusion(%j, %four), kind=kLoop, calls=%wrapped_le
}

%inner_body (t.1: (s32[], f32[16,32])) -> (s32[], f32[16,32]) {
  %t.1 = (s32[], f32[16,32]{1,0}) parameter(0)
  %j.1 = s32[] get-tuple-element(%t.1), index=0
  %one = s32[] constant(1)
  %j.2 = s32[] add(%j.1, %one)
  %lhs = bf16[16,64]{1,0} constant({...})
  %rhs = bf16[64,32]{1,0} constant({...})
  %prod = f32[16,32]{1,0} fusion(%lhs, %rhs), kind=kOutput, calls=%dot_fusion
  %ar = f32[16,32]{1,0} all-reduce(%prod), channel_id=1, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%add
  ROOT %out = (s32[], f32[16,32]{1,0}) tuple(%j.2, %ar)
}

%update_fusion (buf: f32[8,1024], upd: f32[8,1], idx: s32[], big: f32[4096,256]) -> f32[8,1024] {
  %buf = f32[8,1024]{1,0} parameter(0)
  %upd = f32[8,1]{1,0} parameter(1)
  %idx = s32[] parameter(2)
  %big = f32[4096,256]{1,0} parameter(3)
  %zero = s32[] constant(0)
  %row = f32[1,256]{1,0} dynamic-slice(%big, %idx, %zero), dynamic_slice_sizes={1,256}
  ROOT %dus = f32[8,1024]{1,0} dynamic-update-slice(%buf, %upd, %zero, %idx)
}

%outer_cond (s: (s32[], f32[8,1024], f32[4096,256])) -> pred[] {
  %s = (s32[], f32[8,1024]{1,0}, f32[4096,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%s), index=0
  %three = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %three), direction=LT
}

%outer_body (s.1: (s32[], f32[8,1024], f32[4096,256])) -> (s32[], f32[8,1024], f32[4096,256]) {
  %s.1 = (s32[], f32[8,1024]{1,0}, f32[4096,256]{1,0}) parameter(0)
  %i.1 = s32[] get-tuple-element(%s.1), index=0
  %buf.1 = f32[8,1024]{1,0} get-tuple-element(%s.1), index=1
  %big.1 = f32[4096,256]{1,0} get-tuple-element(%s.1), index=2
  %one.1 = s32[] constant(1)
  %i.2 = s32[] add(%i.1, %one.1)
  %start = s32[] constant(1)
  %acc = f32[16,32]{1,0} constant({...})
  %init = (s32[], f32[16,32]{1,0}) tuple(%start, %acc)
  %loop = (s32[], f32[16,32]{1,0}) while(%init), condition=%inner_cond, body=%inner_body
  %upd.1 = f32[8,1]{1,0:T(8,128)S(1)} constant({...})
  %buf.2 = f32[8,1024]{1,0} fusion(%buf.1, %upd.1, %i.1, %big.1), kind=kLoop, calls=%update_fusion
  %ag = (bf16[128,256]{1,0}, bf16[1024,256]{1,0}, u32[]{:S(2)}) all-gather-start(%w), channel_id=2, replica_groups=[1,8]<=[8], dimensions={0}
  %w = bf16[128,256]{1,0} constant({...})
  %agd = bf16[1024,256]{1,0} all-gather-done(%ag)
  ROOT %out.1 = (s32[], f32[8,1024]{1,0}, f32[4096,256]{1,0}) tuple(%i.2, %buf.2, %big.1)
}

ENTRY %main (arg: f32[8,1024], big.2: f32[4096,256]) -> f32[8,1024] {
  %arg = f32[8,1024]{1,0} parameter(0)
  %big.2 = f32[4096,256]{1,0} parameter(1)
  %zero.1 = s32[] constant(0)
  %t0 = (s32[], f32[8,1024]{1,0}, f32[4096,256]{1,0}) tuple(%zero.1, %arg, %big.2)
  %w0 = (s32[], f32[8,1024]{1,0}, f32[4096,256]{1,0}) while(%t0), condition=%outer_cond, body=%outer_body
  %res = f32[8,1024]{1,0} get-tuple-element(%w0), index=1
  %perm = f32[8,1024]{1,0} collective-permute(%res), channel_id=3, source_target_pairs={{0,1},{1,0}}
  %rs = f32[1,1024]{1,0} reduce-scatter(%perm), channel_id=4, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%add
  ROOT %cp = f32[8,1024]{1,0} copy(%perm)
}
"""


def test_handwritten_loops_flops_and_collectives():
    a = hlo.analyze(HANDWRITTEN)
    assert sorted(t for _, t, _ in a.loops) == [3.0, 4.0] and a.undetermined_loops == 0
    # the dot runs 3 x 4 times: 2 * 16 * 32 * 64 each
    assert a.flops == 12 * 2 * 16 * 32 * 64
    kinds = a.by_kind()
    assert kinds["all-reduce"] == (12.0, 12 * 2 * (3 / 4) * 16 * 32 * 4)  # group of 4 ('axis_1'), f32[16,32]
    assert kinds["all-gather"] == (3.0, 3 * (7 / 8) * 1024 * 256 * 2)  # iota groups of 8, the gathered bf16 result
    assert kinds["collective-permute"] == (1.0, 8 * 1024 * 4)
    assert kinds["reduce-scatter"] == (1.0, (7 / 8) * 8 * 1024 * 4)


def test_handwritten_hbm_estimate():
    comps = hlo.parse_module(HANDWRITTEN)
    body = comps["outer_body"]
    fusion = body.by_name["buf.2"]
    # reads one 256-float row of `big` (not all of it) and the scalar index; the update lives on chip (S(1)) and
    # is written in place: 8 floats, not the whole [8, 1024] buffer
    assert hlo.instruction_hbm_bytes(comps, body, fusion) == 256 * 4 + 4 + 8 * 4
    entry = comps["main"]
    assert hlo.instruction_hbm_bytes(comps, entry, entry.by_name["cp"]) == 2 * 8 * 1024 * 4
    assert hlo.instruction_hbm_bytes(comps, entry, entry.by_name["w0"]) == 0


def test_shapes_and_memory_space():
    shapes = hlo.parse_shapes("(bf16[2,8]{1,0:T(8,128)(2,1)S(1)}, f32[3]{0}, /*index=2*/pred[], s32[4,4])")
    assert [(s.dtype, s.dims, s.memory_space) for s in shapes] == [
        ("bf16", (2, 8), 1), ("f32", (3,), 0), ("pred", (), 0), ("s32", (4, 4), 0)]
    assert [s.bytes for s in shapes] == [32, 12, 1, 64]


def _scan_program():
    def f(x, w):
        def body(c, wi):
            return jnp.tanh(c @ wi), None
        return jax.lax.scan(body, x, w)[0]
    return jax.jit(f).lower(jnp.ones((8, 16)), jnp.ones((5, 16, 16))).compile().as_text()


def test_cpu_compiled_scan_counts_every_iteration():
    text = _scan_program()
    expected = 5 * 2 * 8 * 16 * 16
    a = hlo.analyze(text)
    assert a.flops == expected and [t for _, t, _ in a.loops] == [5.0]
    # without the compiler's known_trip_count the count comes from the condition (a fused i < 5)
    stripped = text.replace('"known_trip_count":{"n":"5"}', '"unknown":{}')
    assert "known_trip_count" not in stripped
    b = hlo.analyze(stripped)
    assert b.flops == expected and b.loops[0][2] is True


def test_default_trip_for_a_loop_that_stops_early():
    def f(x):
        def cond(c):
            return (c[0] < 7) & (jnp.sum(c[1]) < 1e9)
        def body(c):
            return c[0] + 1, c[1] @ c[1]
        return jax.lax.while_loop(cond, body, (0, x))[1]
    text = jax.jit(f).lower(jnp.ones((4, 4))).compile().as_text()
    a = hlo.analyze(text, default_trip=7)
    assert a.undetermined_loops == 1 and a.flops == 7 * 2 * 4 * 4 * 4


def test_cpu_sharded_contraction_all_reduce():
    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,))
    x = jax.ShapeDtypeStruct((8, 16), jnp.float32, sharding=NamedSharding(mesh, P(None, "d")))
    w = jax.ShapeDtypeStruct((16, 32), jnp.float32, sharding=NamedSharding(mesh, P("d", None)))
    text = jax.jit(lambda x, w: x @ w, out_shardings=NamedSharding(mesh, P())).lower(x, w).compile().as_text()
    a = hlo.analyze(text, num_devices=8)
    assert a.flops == 2 * 8 * 32 * 2  # each device contracts its 2 columns
    reduces = list(hlo.iter_collectives(a, "all-reduce"))
    assert len(reduces) == 1 and reduces[0].group == 8 and reduces[0].array_bytes == 8 * 32 * 4
    assert np.isclose(a.collective_bytes(), 2 * (7 / 8) * 8 * 32 * 4)


def test_bad_text_is_refused():
    with pytest.raises(ValueError, match="ENTRY"):
        hlo.analyze("HloModule empty\n")


def test_batched_matmul_written_as_dilated_convolution():
    # the TPU compiler's form of q.k^T per (row, kv head): the batch dims are a 16x2 window dilated so that each
    # output sees one real input element; FLOPs are those of the batched matmul, not of a 16x2 window
    text = """HloModule conv
ENTRY %main (a: bf16[16,2,3583,128], b: bf16[16,2,6,128]) -> f32[16,2,3583,6] {
  %a = bf16[16,2,3583,128]{3,2,1,0} parameter(0)
  %b = bf16[16,2,6,128]{3,2,1,0} parameter(1)
  ROOT %c = f32[16,2,3583,6]{2,3,1,0} convolution(%a, %b), window={size=16x2 stride=15x1 lhs_dilate=16x2}, dim_labels=01bf_01oi->01bf
}
"""
    assert hlo.analyze(text).flops == 2 * (16 * 2 * 3583 * 6) * 128


def test_sliced_reads_are_seen_through_nested_fusions():
    # the TPU compiler hands a dot fusion the whole stacked [layers, ...] weight and slices one layer inside a
    # nested fusion: one layer's bytes are read, not the stack's
    text = """HloModule nested
%slice_layer (w: bf16[28,1024,256], i: s32[]) -> bf16[1024,256] {
  %w = bf16[28,1024,256]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %z = s32[] constant(0)
  %ds = bf16[1,1024,256]{2,1,0} dynamic-slice(%w, %i, %z, %z), dynamic_slice_sizes={1,1024,256}
  ROOT %b = bf16[1024,256]{1,0} bitcast(%ds)
}
%matmul (x: bf16[8,256], w.1: bf16[28,1024,256], i.1: s32[]) -> f32[8,1024] {
  %x = bf16[8,256]{1,0} parameter(0)
  %w.1 = bf16[28,1024,256]{2,1,0} parameter(1)
  %i.1 = s32[] parameter(2)
  %layer = bf16[1024,256]{1,0} fusion(%w.1, %i.1), kind=kLoop, calls=%slice_layer
  ROOT %d = f32[8,1024]{1,0} dot(%x, %layer), lhs_contracting_dims={1}, rhs_contracting_dims={1}
}
ENTRY %main (x.1: bf16[8,256], w.2: bf16[28,1024,256], i.2: s32[]) -> f32[8,1024] {
  %x.1 = bf16[8,256]{1,0} parameter(0)
  %w.2 = bf16[28,1024,256]{2,1,0} parameter(1)
  %i.2 = s32[] parameter(2)
  ROOT %f = f32[8,1024]{1,0} fusion(%x.1, %w.2, %i.2), kind=kOutput, calls=%matmul
}
"""
    a = hlo.analyze(text)
    assert a.flops == 2 * 8 * 1024 * 256
    assert a.hbm_bytes == 8 * 256 * 2 + 1024 * 256 * 2 + 4 + 8 * 1024 * 4  # x, one layer, the index, the result
