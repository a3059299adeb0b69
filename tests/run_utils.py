"""Reading a training run's checkpoints in tests, whatever process layout wrote them."""
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp


def checkpoint_params(workdir, step=None) -> dict[str, np.ndarray]:
    """The parameters saved at `step` (default: the latest) as a flat {path: numpy array} dict."""
    ckpt = pathlib.Path(workdir) / "checkpoints"
    step = step or max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    path = ckpt / str(step) / "state"
    checkpointer = ocp.StandardCheckpointer()
    metadata = checkpointer.metadata(path)
    tree = metadata.item_metadata if hasattr(metadata, "item_metadata") else metadata
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
    restored = checkpointer.restore(path, target)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(restored["params"])[0]}
