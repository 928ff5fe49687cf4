"""Reads a run's tb/ directory with TensorBoard's own readers and prints JSON
for crates/ddppo-cli/tests/tensorboard.rs.

Two views: every event of every file in file order, read with TensorBoard's
record reader, which raises on a bad CRC or a truncated record (its file
loaders would stop quietly); and what TensorBoard's EventAccumulator, the
reader behind its scalar dashboard, makes of the directory.

Usage: python read_tensorboard.py RUN/tb
"""
import json
import os
import sys

from tensorboard.backend.event_processing import event_accumulator
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow


def events(path):
    reader = pywrap_tensorflow.PyRecordReader_New(path)
    while True:
        try:
            reader.GetNext()
        except errors.OutOfRangeError:
            return
        event = event_pb2.Event.FromString(reader.record())
        if event.HasField("file_version"):
            yield {"wall_time": event.wall_time, "file_version": event.file_version}
        else:
            values = {v.tag: v.simple_value for v in event.summary.value}
            yield {"wall_time": event.wall_time, "step": event.step, "values": values}


def main():
    tb = sys.argv[1]
    files = sorted(f for f in os.listdir(tb) if "tfevents" in f)
    out = {"files": files, "events": []}
    for name in files:
        out["events"].extend(events(os.path.join(tb, name)))
    # 0: keep every scalar (the default keeps a sample of 10,000).
    acc = event_accumulator.EventAccumulator(tb, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    out["scalars"] = {tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    print(json.dumps(out))


main()
