"""The training data pipeline: worker processes, pinned memory, and batches copied to the device
while the previous step computes.

``make_loader`` is the one DataLoader of training (``train.train``) and of the loader benchmark
(``benchmarks/data_speed.py``): ``num_workers`` processes each decode only the two frames an item
needs (``FramesDataset``), stay alive across epochs (``persistent_workers``, so their per-video
caches survive) and keep ``prefetch_factor`` batches ready each; on a GPU the batches are
collated into pinned (page-locked) memory, which the device copies from without a staging copy.

``DevicePrefetcher`` then moves each batch to the device: on CUDA on a side stream, issued one
batch ahead, so the host-to-device copy of batch i+1 overlaps step i; elsewhere a plain move.
"""
import torch
from torch.utils.data import DataLoader

from datasets.frames_dataset import collate_items
from flame.codes import FaceCodes


def make_loader(dataset, batch_size, sampler, num_workers, device, seed=0, prefetch_factor=2):
    """The training DataLoader (see the module docstring); drops the last partial batch."""
    options = {}
    if num_workers > 0:
        # workers live across epochs (and keep their per-video caches)
        options.update(persistent_workers=True, prefetch_factor=prefetch_factor)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                      num_workers=num_workers, collate_fn=collate_items,
                      pin_memory=torch.device(device).type == "cuda",
                      generator=torch.Generator().manual_seed(seed), **options)


def move_to(batch, device):
    """A batch (tensors, FaceCodes, nested dicts; anything else as is) on ``device``; copies from
    pinned memory do not block the host."""
    if torch.is_tensor(batch) or isinstance(batch, FaceCodes):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    return batch


def record_stream(batch, stream):
    """Tell the CUDA caching allocator that ``stream`` uses the batch's tensors (they were made on
    another stream), so their memory is not reused before that stream is done with them."""
    if torch.is_tensor(batch):
        batch.record_stream(stream)
    elif isinstance(batch, FaceCodes):
        for _, value in batch.fields():
            value.record_stream(stream)
    elif isinstance(batch, dict):
        for value in batch.values():
            record_stream(value, stream)


class DevicePrefetcher:
    """Iterate ``loader``'s batches on ``device``, each passed through ``prepare`` (e.g. the
    channels-last conversion) after the copy.

    On CUDA the copy (and ``prepare``) of the next batch is issued on a side stream before the
    current batch is handed out; the compute stream waits for it only when it takes that batch.
    ``len()`` is the loader's.
    """

    def __init__(self, loader, device, prepare=None):
        self.loader = loader
        self.device = torch.device(device)
        self.prepare = prepare or (lambda batch: batch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if self.device.type != "cuda":
            for batch in self.loader:
                yield self.prepare(move_to(batch, self.device))
            return
        side = torch.cuda.Stream(self.device)
        batches = iter(self.loader)

        def load():
            batch = next(batches, None)
            if batch is None:
                return None
            with torch.cuda.stream(side):
                return self.prepare(move_to(batch, self.device))

        upcoming = load()
        while upcoming is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_stream(side)
            record_stream(upcoming, compute)
            batch, upcoming = upcoming, load()
            yield batch
