"""Reads a directory of TensorBoard event files with TensorBoard's own reader and prints its
scalars as one JSON object, {"files": [names], "scalars": {tag: [[step, value], ...]}}
(trainer-image/tests/tensorboard_oracle.rs compares them with the trainer's step lines).

    --logdir DIR   the directory graft-trainer wrote (<output>/runs)

The reader is the one `tensorboard --logdir s3://...` serves its scalar charts from (the
Python load path; the Rust data server reads only local and gs:// paths):
plugin_event_accumulator.EventAccumulator, every point kept (no reservoir sampling), orphaned
data purged as by default (a SessionLog START drops an earlier attempt's steps from that step
on). A tag counts as a scalar only if TensorBoard's scalars plugin claims it.

    GRAFT_ORACLE_PYTHON=$(bash tests/oracle/venv.sh)
    $GRAFT_ORACLE_PYTHON tests/oracle/tensorboard_scalars.py --logdir DIR
"""

import argparse
import json
import os

from tensorboard.backend.event_processing import io_wrapper, plugin_event_accumulator
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.util import tensor_util

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--logdir", required=True)
args = parser.parse_args()

accumulator = plugin_event_accumulator.EventAccumulator(
    args.logdir,
    size_guidance={plugin_event_accumulator.TENSORS: 0},
    purge_orphaned_data=True,
)
accumulator.Reload()
files = sorted(
    name
    for name in os.listdir(args.logdir)
    if io_wrapper.IsSummaryEventsFile(os.path.join(args.logdir, name))
)
scalars = {
    tag: [
        [event.step, tensor_util.make_ndarray(event.tensor_proto).item()]
        for event in accumulator.Tensors(tag)
    ]
    for tag in accumulator.Tags()[plugin_event_accumulator.TENSORS]
    if accumulator.SummaryMetadata(tag).plugin_data.plugin_name
    == scalar_metadata.PLUGIN_NAME
}
print(json.dumps({"files": files, "scalars": scalars}))
