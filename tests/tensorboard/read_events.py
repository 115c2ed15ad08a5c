"""A run directory's TensorBoard event files as TensorBoard itself reads them (the `tensorboard`
package from PyPI, its EventAccumulator), as JSON on stdout: every scalar tag with its (step, value)
pairs, and the text summaries. Used by tests/train.rs.

  python tests/tensorboard/read_events.py RUN/tensorboard
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "tensors": 0})
acc.Reload()
tags = acc.Tags()
scalars = {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags.get("scalars", [])}
texts = {}
for t in tags.get("tensors", []):
    texts[t] = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(t)]
print(json.dumps({"scalars": scalars, "texts": texts}))
