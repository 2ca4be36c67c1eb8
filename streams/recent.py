"""A bounded map that forgets its oldest entries first."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any


class Recent:
    """A bounded key -> value map that forgets its oldest entries first; the
    analyze actors' threads may write it concurrently."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        return self._items.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._items

    def put(self, key: str, value: Any = None) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
