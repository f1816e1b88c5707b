"""Cost as the volume grows: a 100 TB volume that exists nowhere (``tests/virtual_store.py``).

Nothing here is timed: the tests count what the store is asked for and what
the graphs hold, which grows with the volume when something touches every
chunk.
"""

import numpy as np
import pytest
import virtual_store as vs
from helpers import make_model_dir

from n2v_chunked.io.sources import open_image
from n2v_chunked.prediction import predict
from n2v_chunked.prediction.blocks import batch_prediction, get_model, model_token
from n2v_chunked.prediction.plan import batches, plan
from n2v_chunked.sampling.dataset import ZarrPatchDataset, batches as patch_batches

CHUNKS = (1, 512, 512)
HUGE = 100e12  # bytes: 1.9e8 chunks of 512 KiB


@pytest.fixture
def huge():
    vs.COUNTS.reset()
    yield vs.add_volume("huge", vs.shape_for(HUGE, CHUNKS), CHUNKS, axes="tyx")
    vs.STOP_AFTER = None
    vs.clear_discarded()


def test_opening_a_huge_volume_lists_and_reads_nothing(huge):
    x = open_image(huge)
    assert x.nbytes > 0.9 * HUGE and x.data.npartitions > 10**8
    assert (vs.COUNTS.listings, vs.COUNTS.chunk_reads) == (0, 0)  # the stored size was a listing of every chunk
    # no old-style layer: dask would list every chunk's key to cull any graph built on it
    assert not any(layer.has_legacy_tasks for layer in x.data.__dask_graph__().layers.values())


def test_predicting_a_huge_volume_touches_only_what_its_first_blocks_need(huge, tmp_path):
    model = make_model_dir(tmp_path / "m", depth=1, features=1)
    vs.STOP_AFTER = 2  # two blocks written, then the store stops the run
    with pytest.raises(vs.Enough):
        predict(huge, "discard://huge-out", model, chunks=CHUNKS, progress=False, pyramid=False,
                scheduler="threads", batch_blocks=4)
    # the store stops the run at its second write; writes of the batch's other blocks may be in flight then
    assert 2 <= vs.COUNTS.chunk_writes <= 4 and vs.COUNTS.listings == 0
    # the input statistics' 256 sampled regions, and the chunks (with halos) of the blocks that ran
    assert vs.COUNTS.chunk_reads <= 256 + 4 * 9


def test_a_batch_graph_holds_only_the_batch(tmp_path):
    """Keys in one batch's graph: bounded by the batch, not by the 1.9 million chunks of the source."""
    model = make_model_dir(tmp_path / "m", depth=1, features=1)
    trained = get_model(str(model), model_token(str(model)), "cpu")
    x = open_image(vs.add_volume("tera", vs.shape_for(1e12, CHUNKS), CHUNKS, axes="tyx"))
    p = plan(trained, x, CHUNKS)
    lo, hi = next(batches(p.numblocks, 8))
    y = batch_prediction(x.data, p, lo, hi, trained=trained, model_dir=str(model))
    assert x.data.npartitions > 10**6 and len(y.__dask_graph__().get_all_external_keys()) < 1000


def largest_table(obj, seen=None) -> int:
    """Longest array or container reachable from ``obj`` through the sampler's own objects."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return obj.size
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif type(obj).__module__.startswith("n2v_chunked.sampling") and hasattr(obj, "__dict__"):
        items = list(vars(obj).values())
    else:
        return 0
    return max([len(items), *(largest_table(x, seen) for x in items)])


@pytest.mark.timeout(120)  # the per-block tables took 6 minutes and 1.1 GB here (issue 15)
def test_the_sampler_of_a_huge_volume_keeps_nothing_per_block(huge):
    x = open_image(huge)
    ds = ZarrPatchDataset(x, (64, 64), ("y", "x"), val_fraction=0.1, io_threads=0, buffer_bytes=16 * 2**20)
    n = ds.grid.n_blocks
    assert n > 2 * 10**7 and len(ds.val_blocks) == round(0.1 * n) and len(ds.train_blocks) == n - len(ds.val_blocks)
    state = {k: v for k, v in vars(ds).items() if k not in ("_source", "mask")}
    assert largest_table(state) <= max(len(e) for e in ds.grid.edges)  # per dim at most, never per block
    batch = next(patch_batches(ds, 64, prefetch=0))
    assert batch.shape == (64, 1, 64, 64)
    assert ds.validation_patches(4).shape == (4, 1, 64, 64)
    # resuming 2.5 passes in is arithmetic too
    ds.load_state_dict({"seed": 0, "epoch": 0, "patches_served": 5 * ds._pass_quota // 2})
    epoch, index = ds._start_position(0, 1)
    assert epoch == 2 and abs(index - len(ds.train_blocks) / 2) <= 1
    assert vs.COUNTS.listings == 0 and vs.COUNTS.chunk_reads < 200
