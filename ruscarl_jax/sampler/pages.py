"""Host-side bookkeeping of the paged KV cache: which pages each slot holds, and which are free.

The device cache is split into G page groups (one per data-parallel shard of this process); a slot
belongs to one group (slot s of S to group s // (S / G)) and takes pages from that group only. A
sequence's pages are freed when it ends or is preempted.
"""
from __future__ import annotations

import math


class PageTable:
    """Free lists per page group and the ordered page list of every slot."""

    def __init__(self, groups: int, slots: int, pages_per_group: int, page_size: int) -> None:
        if slots % groups:
            raise ValueError(f"{slots} slots do not split over {groups} page groups")
        self.groups, self.slots, self.pages_per_group, self.page_size = groups, slots, pages_per_group, page_size
        self.free: list[list[int]] = [list(range(pages_per_group - 1, -1, -1)) for _ in range(groups)]
        self.held: list[list[int]] = [[] for _ in range(slots)]

    def group_of(self, slot: int) -> int:
        return slot // (self.slots // self.groups)

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)

    def free_count(self, group: int) -> int:
        return len(self.free[group])

    def extra_needed(self, slot: int, tokens: int) -> int:
        """Pages slot `slot` still needs to hold `tokens` tokens."""
        return max(0, self.pages_for(tokens) - len(self.held[slot]))

    def grow(self, slot: int, tokens: int) -> bool:
        """Give `slot` pages for `tokens` tokens; False (and nothing taken) if its group has too few free."""
        extra = self.extra_needed(slot, tokens)
        free = self.free[self.group_of(slot)]
        if extra > len(free):
            return False
        self.held[slot].extend(free.pop() for _ in range(extra))
        return True

    def release(self, slot: int) -> None:
        """Return all of the slot's pages to its group's free list."""
        self.free[self.group_of(slot)].extend(reversed(self.held[slot]))
        self.held[slot] = []

    def rows(self, slots: list[int], width: int, fill: int) -> list[list[int]]:
        """The page lists of `slots`, each cut / padded to `width` entries with `fill`."""
        return [(self.held[s] + [fill] * width)[:width] for s in slots]
