"""Metrics on resume and on screen: rows after the restored step dropped (JSONL rewritten atomically, TensorBoard
purged), and every evaluation printed as one line with the bootstrap's numbers as reference."""
import glob
import io
import json
import os
import struct

from capo_jax.metrics import MetricsWriter, eval_line, read_jsonl, truncate_jsonl


def tensorboard_scalars(logdir):
    """{tag: {step: value}} as TensorBoard shows it: event files in name order, and a SessionLog START at step s
    purges what was recorded at steps >= s (TensorBoard's restart rule for file_version 2)."""
    from tensorboardX.proto import event_pb2

    out = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data, i = f.read(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[i + 12:i + 12 + n])
            i += 12 + n + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                out = {tag: {s: v for s, v in by.items() if s < event.step} for tag, by in out.items()}
            for value in event.summary.value:
                out.setdefault(value.tag, {}).setdefault(event.step, []).append(value.simple_value)
    return out


def _read(path):
    with open(path) as f:
        return f.read()


def _rows(path, steps):
    with open(path, "w") as f:
        for s in steps:
            f.write(json.dumps({"step": s, "time": 0.0, "train/loss": float(s)}) + "\n")


def test_truncate_drops_later_rows_and_cut_lines_atomically(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    _rows(path, range(1, 32))
    with open(path, "a") as f:
        f.write('{"step": 32, "train/lo')  # a kill -9 mid-write
    before = _read(path).splitlines(keepends=True)
    assert truncate_jsonl(path, 20) == 12
    assert _read(path).splitlines(keepends=True) == before[:20]  # rows 1..20 byte for byte
    assert os.listdir(tmp_path) == ["metrics.jsonl"]  # no temp file left
    inode = os.stat(path).st_ino
    assert truncate_jsonl(path, 20) == 0 and os.stat(path).st_ino == inode  # nothing to drop: not rewritten
    assert truncate_jsonl(path, -1) == 20 and _read(path) == ""
    assert truncate_jsonl(str(tmp_path / "absent.jsonl"), 3) == 0


def test_a_resumed_writer_logs_each_step_once_in_jsonl_and_tensorboard(tmp_path):
    work = str(tmp_path)
    first = MetricsWriter(work, total_steps=10, progress=False)
    for s in range(1, 8):  # the interrupted run got to step 7; its last checkpoint was step 4
        first.write(s, {"train/loss": 1.0 + s})
    first.close()
    second = MetricsWriter(work, total_steps=10, progress=False, keep_through=4)
    for s in range(5, 11):
        second.write(s, {"train/loss": 100.0 + s})
    second.close()
    rows = read_jsonl(work)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert [r["train/loss"] for r in rows] == [1.0 + s for s in range(1, 5)] + [100.0 + s for s in range(5, 11)]
    tb = tensorboard_scalars(os.path.join(work, "tb"))["train/loss"]
    assert tb == {r["step"]: [r["train/loss"]] for r in rows}
    # without keep_through the interrupted run's tail stays: the check above would see steps 5..7 twice
    third = MetricsWriter(str(tmp_path / "x"), total_steps=3, progress=False)
    third.write(1, {"a": 1.0})
    third.close()
    again = MetricsWriter(str(tmp_path / "x"), total_steps=3, progress=False)
    again.write(1, {"a": 2.0})
    again.close()
    assert tensorboard_scalars(str(tmp_path / "x" / "tb"))["a"] == {1: [1.0, 2.0]}


def test_every_eval_is_printed_with_the_bootstrap_as_reference_also_after_a_resume(tmp_path):
    work, stream = str(tmp_path), io.StringIO()
    w = MetricsWriter(work, total_steps=40, stream=stream, tensorboard=False, keep_through=-1)
    w.write(0, {"eval/accuracy_sampled": 0.375, "eval/accuracy_sampled_se": 0.03, "eval/step_error_rate": 0.2,
                "eval/sampled_pairs": 64.0})
    w.write(1, {"train/loss": 0.5})
    w.write(20, {"train/loss": 0.4, "eval/accuracy_sampled": 0.47, "eval/accuracy_sampled_se": 0.031,
                 "eval/step_error_rate": 0.125, "eval/accuracy_greedy": 0.5, "eval/sampled_pairs": 64.0})
    w.close()
    lines = [line for line in stream.getvalue().splitlines() if line.startswith("eval@")]
    assert lines == ["eval@0 (bootstrap) accuracy_sampled 0.375±0.03 step_error_rate 0.2 sampled_pairs 64",
                     "eval@20 accuracy_sampled 0.47±0.031 (bootstrap 0.375±0.03) step_error_rate 0.125 (bootstrap 0.2) "
                     "accuracy_greedy 0.5 sampled_pairs 64"]
    stream = io.StringIO()  # a resumed run reads the bootstrap row back from metrics.jsonl
    w = MetricsWriter(work, total_steps=40, stream=stream, tensorboard=False, keep_through=20)
    w.write(40, {"eval/accuracy_sampled": 0.5, "eval/step_error_rate": 0.1})
    w.close()
    assert stream.getvalue().splitlines()[-1] == "eval@40 accuracy_sampled 0.5 (bootstrap 0.375±0.03) step_error_rate 0.1 (bootstrap 0.2)"
    quiet = io.StringIO()
    w = MetricsWriter(str(tmp_path / "q"), total_steps=1, stream=quiet, tensorboard=False, progress=False)
    w.write(1, {"eval/accuracy": 0.1})
    w.close()
    assert quiet.getvalue() == ""  # other hosts (progress off) print nothing
    assert eval_line(7, {"eval/x": 1.0}) == "eval@7 x 1"
