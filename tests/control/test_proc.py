"""control/proc.py's settle_heap: what lives at start-up is frozen out of the collector's walks."""
from __future__ import annotations

import gc

from control.proc import settle_heap


def test_settle_heap_freezes_what_lives_now_and_tracks_what_comes_after():
    gc.unfreeze()
    try:
        settle_heap()
        frozen = gc.get_freeze_count()
        assert frozen > 1000  # pytest's own objects, at least
        later = [[i] for i in range(100)]
        # new objects: collected as usual, not frozen (the frozen ones may only die: a thread of the
        # test runner can free some meanwhile)
        assert gc.is_tracked(later) and gc.get_freeze_count() <= frozen
        assert sum(gc.get_count()) < frozen
    finally:
        gc.unfreeze()
