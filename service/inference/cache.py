"""`ModelCache`: an LRU of loaded checkpoints (size `settings.model_cache_size`).

Keyed by checkpoint id and weights hash, counting hits and misses in the metrics; loads of one
checkpoint by several threads at once are deduplicated.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable

from service.inference.backends import LoadedModel
from service.metrics import MODEL_CACHE_HITS, MODEL_CACHE_MISSES

logger = logging.getLogger(__name__)

Loader = Callable[[str], LoadedModel]


class ModelCache:
    """A bounded LRU of loaded models keyed by checkpoint id; thread-safe, loads deduplicated."""

    def __init__(self, loader: Loader, size: int) -> None:
        self._loader = loader
        self.size = size
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def __contains__(self, ckpt_id: object) -> bool:
        with self._lock:
            return ckpt_id in self._models

    def __len__(self) -> int:
        with self._lock:
            return len(self._models)

    def lookup(self, ckpt_id: str, weights_sha256: str) -> LoadedModel | None:
        """The cached model (refreshed as most recent) if its weights still match, else None."""
        with self._lock:
            loaded = self._models.get(ckpt_id)
            if loaded is None or loaded.weights_sha256 != weights_sha256:
                return None
            self._models.move_to_end(ckpt_id)
        MODEL_CACHE_HITS.inc()
        return loaded

    def load(self, ckpt_id: str, weights_sha256: str) -> LoadedModel:
        """Load (blocking) unless another thread just did; evicts the least recently used."""
        MODEL_CACHE_MISSES.inc()
        with self._lock:
            key_lock = self._loading.setdefault(ckpt_id, threading.Lock())
        with key_lock:
            with self._lock:
                loaded = self._models.get(ckpt_id)
                if loaded is not None and loaded.weights_sha256 == weights_sha256:
                    self._models.move_to_end(ckpt_id)
                    return loaded
            try:
                loaded = self._loader(ckpt_id)
            except BaseException:
                with self._lock:  # a failed load must not leave its lock behind
                    self._loading.pop(ckpt_id, None)
                raise
            with self._lock:
                self._models[ckpt_id] = loaded
                self._models.move_to_end(ckpt_id)
                while len(self._models) > self.size:
                    evicted, _ = self._models.popitem(last=False)
                    logger.info("model cache full: evicted %s", evicted)
                self._loading.pop(ckpt_id, None)
            return loaded

    def evict(self, ckpt_id: str) -> None:
        """Forget a checkpoint (after it was deleted)."""
        with self._lock:
            self._models.pop(ckpt_id, None)
