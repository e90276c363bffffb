"""Training examples streamed from WebDataset shards.

Each rank (Ray Train worker / torch.distributed process) and each DataLoader worker reads its
own disjoint share of the data (WebDataset's node and worker splitters): whole shards when there
are at least as many shards as readers, otherwise every reader walks all shards and keeps every
``n``-th sample (so a one-shard sample pipeline still trains on two workers without
duplicates). Epochs repeat forever by default (resampling across epochs, shard order and a
sample buffer reshuffled per epoch), so ranks never run dry at different steps. Everything
random derives from ``seed``: same seed, same batches.

A model that reads an external identity embedding (``identity_embedder``: dlib / arcface) gets
it in every example (``identity_embedding``, the shard's ``identity.npy``). A shard made with
another embedder or none stops the run with an error naming it (nothing in it could train that
model: preprocess again); a clip whose frames showed the embedder no face has no embedding and
is skipped, counted in a warning per epoch (a few such clips are a data gap, not a mistake).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from itertools import count, islice
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset

from durian.data.clip_codec import Clip, decode_clip
from durian.data.masks import BankExpander, MaskBank, MaskExpander
from durian.data.pairs import NoAttributeError, PairConfig, collate_examples, make_example, to_torch

log = logging.getLogger(__name__)

ShardSpec = str | Path | Sequence[str | Path]


def expand_shards(shards: ShardSpec) -> list[str]:
    """Shard paths from a list or a brace pattern (``data/shards/train-{000000..000003}.tar``)."""
    if isinstance(shards, str | Path):
        return list(wds.shardlists.expand_urls(str(shards)))
    out: list[str] = []
    for s in shards:
        out.extend(wds.shardlists.expand_urls(str(s)))
    return out


def _default_rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    dist = torch.distributed
    if rank is None:
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    return rank, world_size


def _buffer_shuffle(
    items: Iterator[dict[str, Any]], bufsize: int, rng: np.random.Generator
) -> Iterator[dict[str, Any]]:
    """Yield ``items`` in a random order seen through a buffer of ``bufsize`` raw samples."""
    if bufsize <= 1:
        yield from items
        return
    buf: list[dict[str, Any]] = []
    for item in items:
        buf.append(item)
        if len(buf) >= bufsize:
            i = int(rng.integers(len(buf)))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    for i in rng.permutation(len(buf)):
        yield buf[int(i)]


class ShardExamples(IterableDataset):
    """An iterable of :func:`durian.data.pairs.to_torch` examples from clip shards."""

    def __init__(
        self,
        shards: ShardSpec,
        pair_config: PairConfig,
        *,
        rank: int | None = None,
        world_size: int | None = None,
        seed: int = 0,
        expander: MaskExpander | None = None,
        shuffle_buffer: int = 16,
        epochs: int | None = None,
        examples_per_clip: int = 1,
        skip_errors: bool = False,
        identity_embedder: str | None = None,
    ) -> None:
        super().__init__()
        self.shards = expand_shards(shards)
        if not self.shards:
            raise ValueError(f"no shards in {shards!r}")
        self.pair_config = pair_config
        self.rank, self.world_size = _default_rank_world(rank, world_size)
        self.seed = int(seed)
        self.expander = expander
        self.shuffle_buffer = int(shuffle_buffer)
        self.epochs = epochs
        self.examples_per_clip = int(examples_per_clip)
        self.skip_errors = skip_errors
        self.identity_embedder = identity_embedder

    def _reader(self) -> tuple[int, int]:
        """(slot, slots): this reader's index among all ranks × dataloader workers."""
        # The worker as WebDataset's split_by_worker sees it, so slot and split agree.
        _, _, worker, workers = wds.utils.pytorch_worker_info()
        return self.rank * workers + worker, self.world_size * workers

    def _split_by_rank(self, src: Iterator[Any]) -> Iterator[Any]:
        """WebDataset's node splitter with this dataset's rank (which may be given explicitly,
        where ``wds.split_by_node`` reads torch.distributed's)."""
        return islice(src, self.rank, None, self.world_size)

    def raw_samples(self, epoch: int) -> Iterator[dict[str, Any]]:
        """This reader's raw (undecoded) shard samples for ``epoch``, in shuffled order."""
        slot, slots = self._reader()
        # One shard order per epoch, the same on every reader, so the splits stay disjoint.
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        urls = wds.SimpleShardList([self.shards[int(i)] for i in order])
        read = wds.tarfile_to_samples()
        if len(self.shards) >= slots:  # whole shards per reader
            stages = [urls, self._split_by_rank, wds.split_by_worker, read]
        else:  # every reader walks all shards and keeps every slots-th sample
            stages = [urls, read, self._split_by_rank, wds.split_by_worker]
        rng = np.random.default_rng([self.seed, epoch, slot, 1])
        return _buffer_shuffle(iter(wds.DataPipeline(*stages)), self.shuffle_buffer, rng)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, _ = self._reader()
        epochs = count() if self.epochs is None else range(self.epochs)
        for epoch in epochs:
            rng = np.random.default_rng([self.seed, epoch, slot, 2])
            produced = no_face = 0
            for sample in self.raw_samples(epoch):
                key = str(sample.get("__key__", ""))
                where = f"shard {sample.get('__url__', '?')}, sample {key}"
                try:
                    clip = decode_clip(sample)
                    if self.identity_embedder and not has_identity(
                        clip, self.identity_embedder, where
                    ):
                        no_face += 1
                        continue
                    examples = [
                        make_example(clip, self.pair_config, rng, self.expander, key)
                        for _ in range(self.examples_per_clip)
                    ]
                except NoAttributeError:
                    log.debug("skipping %s: no attribute present", key)
                    continue
                except IdentityEmbeddingError:
                    raise  # the data do not fit the model: never a sample to skip
                except Exception:
                    if not self.skip_errors:
                        raise
                    log.warning("skipping sample %s", key, exc_info=True)
                    continue
                for example in examples:
                    produced += 1
                    if self.identity_embedder:
                        example["identity_embedding"] = clip.identity
                    yield to_torch(example)
            if no_face:
                log.warning(
                    "reader %d, epoch %d: skipped %d clips without a %s identity embedding "
                    "(no face found in preprocessing)", slot, epoch, no_face,
                    self.identity_embedder,
                )  # fmt: skip
            if produced == 0 and self.epochs is None:
                # An endless loop over shards that never yield would hang the trainer silently.
                raise RuntimeError(
                    f"reader {slot}: an epoch over {len(self.shards)} shards yielded no example"
                )


class IdentityEmbeddingError(ValueError):
    """A shard lacks the identity embedding the model reads (made with another or none)."""


def has_identity(clip: Clip, embedder: str, where: str) -> bool:
    """Whether ``clip`` carries ``embedder``'s identity embedding: False when its clip showed
    no face (skip it), :class:`IdentityEmbeddingError` when it was made without ``embedder``."""
    made_with = clip.meta.get("identity_embedder")
    if made_with != embedder:
        raise IdentityEmbeddingError(
            f"{where}: the model reads a {embedder} identity embedding but the shard was "
            f"preprocessed with {made_with or 'no'} identity embedder: run preprocess with "
            f"preprocess.identity_embedder {embedder if embedder == 'dlib' else 'arcface:<onnx>'}"
        )
    return clip.identity is not None


def _worker_init(_: int) -> None:
    cv2.setNumThreads(1)  # each loader worker is one process; avoid oversubscribing the cores


def make_loader(
    shards: ShardSpec,
    pair_config: PairConfig,
    batch_size: int,
    num_workers: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    seed: int = 0,
    mask_bank: MaskBank | str | Path | None = None,
    *,
    expander: MaskExpander | None = None,
    shuffle_buffer: int = 16,
    epochs: int | None = None,
    examples_per_clip: int = 1,
    skip_errors: bool = False,
    identity_embedder: str | None = None,
) -> DataLoader:
    """A DataLoader of collated training batches (the model contract of :mod:`durian.data.pairs`).

    ``rank``/``world_size`` default to torch.distributed's when it is initialised (Ray Train).
    ``mask_bank`` (a :class:`MaskBank` or the path of its ``.npz``) drives mask expansion; with
    none, expansion is the random dilation only. ``expander`` overrides both (e.g. a generative
    one). ``epochs=None`` streams forever. ``identity_embedder``: the face embedder the model
    reads (``durian.models.config.identity_embedder_of(model.config)``), whose embedding each
    batch then carries (see the module docstring); None for a model that embeds with CLIP."""
    if expander is None:
        bank = MaskBank.load(mask_bank) if isinstance(mask_bank, str | Path) else mask_bank
        expander = BankExpander(bank, pair_config.expansion_n_union, pair_config.expansion_dilation)
    dataset = ShardExamples(
        shards,
        pair_config,
        rank=rank,
        world_size=world_size,
        seed=seed,
        expander=expander,
        shuffle_buffer=shuffle_buffer,
        epochs=epochs,
        examples_per_clip=examples_per_clip,
        skip_errors=skip_errors,
        identity_embedder=identity_embedder,
    )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_examples,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )
