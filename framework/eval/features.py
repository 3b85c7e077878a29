"""Features of a frozen encoder: pooled features, clean-view pixels and labels of labelled
shards, extracted in parallel over the processes and gathered, sorted by sample key, on every
rank (so N processes see what one process sees); `crop_and_flip`, the train-time augmentation
of the linear protocol's re-extracted features.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather, gather_object, pad_across_processes

from framework.data.pipeline import batch_to_device, clean_x_view
from framework.data.shards import is_local, shard_urls
from framework.data.stream import make_loader
from framework.distributed import all_reduce, process_state
from framework.model import Model
from framework.recipe.schema import DataConfig
from framework.sharding import is_sharded, root_gathered


def crop_and_flip(x: torch.Tensor, pad: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """RandomCrop(size, padding=pad) + RandomHorizontalFlip on a batch (B, C, H, W), per sample.

    Applied to the normalised clean view; zero padding is then the dataset mean.
    """
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def extract(
    model: Model,
    spec: str,
    data: DataConfig,
    batch_size: int,
    num_workers: int = 2,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    max_samples: int | None = None,
    pixels: bool = True,
    key: str | None = None,
    teacher: bool = False,
) -> dict[str, torch.Tensor]:
    """Pooled features `h` (of the student, or with `teacher` of the EMA teacher's encoder), raw pixels of the
    clean view (unless `pixels=False`), and labels of the samples in `spec`, sorted by sample key, on this
    process's device.

    Distributed: each rank encodes its share of the shards (split like training's) and every rank
    receives all of them, so a run on N processes extracts N times faster and fits the same
    classifier as one process. `max_samples` caps the samples (the first of each rank's share; the
    shard order is fixed, so the subset is the same every call). `transform` (e.g. `crop_and_flip`)
    is applied to each batch of the clean view before encoding.

    `key` (the recipe key of `spec`, e.g. `eval.test`) asks for every sample: ValueError naming it if
    the shards gave fewer or more than their manifests list (`listed_samples`), or, without
    manifests, if any shard or record was bad (the stream skips and counts those).
    """
    state = process_state()
    loader = make_loader(
        data,
        {"x": clean_x_view(data)},
        rank=state.process_index,
        world_size=state.num_processes,
        epochs=1,
        shards=spec,
        batch_size=batch_size,
        num_workers=num_workers,
    )
    cap = None if max_samples is None else math.ceil(max_samples / state.num_processes)
    dtype = next(model.parameters()).dtype  # bf16 under DeepSpeed's bf16 mode
    parts: dict[str, list] = {"features": [], "labels": [], "keys": [], **({"pixels": []} if pixels else {})}
    cursors: dict[int, dict[str, Any]] = {}  # each data worker's last: its counts of bad shards and records
    sharded = is_sharded(model)  # FSDP2, in training (the online k-NN): encoder calls are collectives
    batches = in_lockstep(loader, cap, data, state) if sharded else _capped(loader, cap)
    with root_gathered(model):  # the heads, which `encode` may use outside the model's forward
        for batch in batches:  # inference only: no autograd graph, BatchNorm in eval mode (the caller's)
            if "cursor" not in batch:  # a stand-in: this rank is done, the others still encode (FSDP2)
                model.encode(batch["x"].to(dtype), teacher=teacher)
                continue
            cursors[batch["cursor"]["worker"]] = batch["cursor"]
            x = batch_to_device(batch, state.device)[0]["x"]
            if transform is not None:
                x = transform(x)
            parts["features"].append(model.encode(x.to(dtype), teacher=teacher).h.float())
            if pixels:
                parts["pixels"].append(x.flatten(1).float())
            parts["labels"].append(batch["label"].to(state.device))
            parts["keys"] += batch["key"]
    n = len(parts["keys"]) if cap is None else min(cap, len(parts["keys"]))
    local = {k: torch.cat(v)[:n] if v else None for k, v in parts.items() if k != "keys"}
    result = _gather_sorted(local, parts["keys"][:n], state)
    if not len(result["labels"]):
        raise ValueError(f"{spec}: no samples to extract features from")
    if key is not None:
        bad = [(c["bad"], c["last_bad"]) for c in cursors.values()]
        _check_complete(key, spec, len(result["labels"]), gather_object(bad) if state.num_processes > 1 else bad)
    return result


def _capped(loader: Iterable[dict], cap: int | None) -> Iterator[dict]:
    """The loader's batches until `cap` samples (None: all of them)."""
    seen = 0
    for batch in loader:
        yield batch
        seen += len(batch["key"])
        if cap is not None and seen >= cap:
            return


def in_lockstep(loader: Iterable[dict], cap: int | None, data: DataConfig, state: Any) -> Iterator[dict]:
    """`_capped(loader, cap)` on every rank in step: under FSDP2 each encoder call all-gathers the encoder's
    shards, so a rank out of batches goes on with stand-ins (`{"x": one blank image}`, no "cursor") until
    every rank is out. One all-reduce per batch."""
    mine = _capped(loader, cap)
    blank = {"x": torch.zeros(1, data.channels, data.image_size, data.image_size, device=state.device)}
    while True:
        batch = next(mine, None)
        going = all_reduce(torch.tensor([batch is not None], dtype=torch.int32, device=state.device), "max")
        if not int(going.item()):
            return
        yield batch if batch is not None else blank


def _check_complete(key: str, spec: str, read: int, bad: list[tuple[int, str]]) -> None:
    """ValueError naming `key` unless `read` samples are what the manifests of `spec` list (without
    manifests: unless no data worker counted a bad shard or record)."""
    listed = listed_samples(spec)
    bad_count, last = sum(n for n, _ in bad), next((what for n, what in bad if n), "")
    if listed is not None and read == listed:
        return
    if listed is None and not bad_count:
        return
    got = f"read {read} samples" + (f" of the {listed} their manifests list" if listed is not None else "")
    why = f"; {bad_count} bad shard(s) or record(s), last: {last}" if bad_count else ""
    raise ValueError(f"{key}: {got}{why} ({spec}); rewrite the damaged shard (augssl shards), or leave it out of {key}")


def listed_samples(spec: str) -> int | None:
    """The samples that the manifests beside the local shards of `spec` (`write_shards`' `<prefix>.json`
    files) list for those shards; None when a shard is remote or no manifest lists it."""
    urls = [url.removeprefix("file://") for url in shard_urls(spec)]
    if not all(map(is_local, urls)):
        return None
    counts: dict[Path, int] = {}
    for folder in {Path(url).parent for url in urls}:
        for manifest in folder.glob("*.json"):
            try:
                counts.update(
                    {folder / s["url"]: int(s["samples"]) for s in json.loads(manifest.read_text())["shards"]}
                )
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not a manifest
    try:
        return sum(counts[Path(url)] for url in urls)
    except KeyError:
        return None


def _gather_sorted(local: dict[str, torch.Tensor | None], keys: list[str], state: Any) -> dict[str, torch.Tensor]:
    """Every rank's rows, concatenated on every rank and sorted by sample key (an order that does
    not depend on the number of processes or loader workers).

    A rank without rows (`None`: more ranks and workers than samples) takes part in every
    collective with empty tensors of the other ranks' shape and dtype.
    """
    if state.num_processes > 1:
        counts = gather(torch.tensor([len(keys)], device=state.device)).tolist()
        keys = gather_object(keys)
        # each tensor's row shape and dtype, from the ranks that have rows
        like = [s for s in gather_object([{k: (t.shape[1:], t.dtype) for k, t in local.items() if t is not None}]) if s]
        for name, t in local.items() if like else ():
            if t is None:
                shape, dtype = like[0][name]
                t = torch.empty((0, *shape), dtype=dtype, device=state.device)
            padded = gather(pad_across_processes(t, dim=0))  # (num_processes * longest, ...)
            rows = padded.shape[0] // state.num_processes
            local[name] = torch.cat([padded[r * rows : r * rows + c] for r, c in enumerate(counts)])
    if not keys:  # no rank has a sample (extract says so)
        return {name: torch.empty(0, device=state.device) for name in local}
    order = torch.tensor(sorted(range(len(keys)), key=keys.__getitem__), device=state.device)
    gathered: dict[str, torch.Tensor] = {}
    for name, t in local.items():
        assert t is not None  # some rank has samples, and a rank without took their shape above
        gathered[name] = t[order]
    return gathered
