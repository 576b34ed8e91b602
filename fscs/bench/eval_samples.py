"""The images an evaluation's episodes read: manifest entries, the shared shard-bytes cache, per-batch decoding."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from fscs.data.episodes import EpisodeSpec
from fscs.data.shards import EncodedSample, ShardIndex, load_encoded
from fscs.data.types import Sample
from fscs.errors import FSCSError


def spec_from_dict(d: Mapping[str, Any]) -> EpisodeSpec:
    """Inverse of EpisodeSpec.to_dict (a manifest entry)."""
    support = tuple(tuple(str(k) for k in shots) for shots in d["support"])
    return EpisodeSpec(int(d["index"]), str(d["query"]), int(d["query_class"]),
                       tuple(int(c) for c in d["classes"]), support)


def _check_support_masks(where: str, specs: Sequence[EpisodeSpec], samples: Mapping[str, EncodedSample]
                         ) -> None:
    """The full regime scores with ground-truth support masks: one-line error naming a support without one."""
    for spec in specs:
        for key in (k for shots in spec.support for k in shots):
            if not samples[key].has_mask:
                raise FSCSError(f"{where}: the full regime uses ground-truth support masks, but support "
                                f"image {key!r} (episode {spec.index}) has none; add masks for the test "
                                "classes' images, or test with pseudo-masks (fscs bench --regime weak; "
                                "suites: eval_regimes: [weak])")


def _image_keys(specs: Iterable[EpisodeSpec]) -> set[str]:
    """The keys of every image (query and supports) the episodes read."""
    return {k for s in specs for k in (s.query, *(x for shots in s.support for x in shots))}


def _load(index: ShardIndex, specs: Sequence[EpisodeSpec], samples: dict[str, EncodedSample] | None
          ) -> dict[str, EncodedSample]:
    """The samples the episodes need, added to (and returned as) `samples` when given: their shard bytes
    (each decoded once as it is read, so an unreadable one fails before the first episode; see
    EncodedSample), not the decoded arrays, which for COCO-20i's 5,000 2-way 5-shot episodes could reach tens
    of GB."""
    keys = _image_keys(specs)
    have = samples if samples is not None else {}
    missing = keys - have.keys()
    if missing:
        have.update(load_encoded(index, missing))
    return have


def _decode_batch(specs: Sequence[EpisodeSpec], samples: Mapping[str, EncodedSample], support_masks: bool
                  ) -> dict[str, Sample]:
    """The decoded samples of one batch of episodes, each image once however many of its episodes use it.
    Query masks are always decoded (the metric's truth); support masks only with `support_masks` (only the
    full regime reads them)."""
    queries = {s.query for s in specs}
    return {k: samples[k].decode(masks=support_masks or k in queries) for k in sorted(_image_keys(specs))}
