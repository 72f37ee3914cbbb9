"""One process of the two-process sharded merge in tests/test_merge_sharded.py.

Usage: ``python tests/sharded_merge_worker.py PROCESS_ID PORT WORKDIR``. Joins the job over
loopback, runs every merge listed in ``WORKDIR/jobs.json`` (keyword arguments of
``sharded.merge_checkpoints``) and writes ``WORKDIR/report_PROCESS_ID.json``: the shape of every
piece this process merged, by tensor name, and which devices it had.
"""

import json
import os
import sys

import jax

process, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                           process_id=process)

from research.merge import kernels, sharded  # noqa: E402

pieces = {}
merge_tensor = kernels.merge_tensor


def recording_merge_tensor(name, tensors, base, params, **kwargs):
    pieces.setdefault(name, {})[kwargs["tensor_name"]] = list(tensors[0].shape)
    return merge_tensor(name, tensors, base, params, **kwargs)


kernels.merge_tensor = recording_merge_tensor
with open(os.path.join(workdir, "jobs.json")) as f:
    for job in json.load(f):
        sharded.merge_checkpoints(**job)
with open(os.path.join(workdir, f"report_{process}.json"), "w") as f:
    json.dump({"pieces": pieces, "local_devices": len(jax.local_devices()),
               "devices": len(jax.devices())}, f)
jax.distributed.shutdown()
