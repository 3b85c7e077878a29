"""The data pipeline, one module per stage:

- `sources`: readers of datasets on disk (Fashion-MNIST idx, CIFAR pickles, STL-10 binaries, image
  folders) as streams of `Sample`s;
- `shards`: `Sample`s written to WebDataset tar shards (`write_shards`), shard specs expanded
  (`shard_urls`) and checked (`check_shards`), one shard read back as records (`tar_records`);
- `stream`: the shards split over ranks and workers, shuffled and read into batches with a
  resumable cursor (`ShardStream`, `StreamPosition`, `make_loader`), faults counted or one line
  (`DataError`);
- `pipeline`: in the workers, a record -> its views (`SampleToViews`) -> a batch (`collate`); in
  the trainer, the batch -> the device, normalised there (`batch_to_device`), the photometric steps
  of the views that split applied there (`DeviceViews`, `data.augment_on`).

`shards` builds on `sources`, `stream` on `shards` and `pipeline`; none imports the recipe layer
(which imports `shards`): `make_loader` takes any object with the `data` section's fields.
Code inside `framework/` imports from the submodules; this package re-exports their public names.
"""

from framework.data.pipeline import (
    BadRecord,
    DeviceViews,
    SampleToViews,
    Split,
    augments_on_device,
    batch_to_device,
    clean_x_view,
    collate,
    split_views,
)
from framework.data.shards import (
    BadShard,
    brace_pattern,
    check_shards,
    encode_image,
    is_local,
    open_shard,
    shard_urls,
    tar_records,
    write_shards,
)
from framework.data.sources import Sample
from framework.data.stream import (
    Cursor,
    DataError,
    DataSection,
    ShardStream,
    StreamPosition,
    make_loader,
)

__all__ = [
    "BadRecord",
    "BadShard",
    "Cursor",
    "DataError",
    "DataSection",
    "DeviceViews",
    "Sample",
    "SampleToViews",
    "ShardStream",
    "Split",
    "StreamPosition",
    "augments_on_device",
    "batch_to_device",
    "brace_pattern",
    "check_shards",
    "clean_x_view",
    "collate",
    "encode_image",
    "is_local",
    "make_loader",
    "open_shard",
    "shard_urls",
    "split_views",
    "tar_records",
    "write_shards",
]
