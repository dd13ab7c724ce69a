"""A/B Movie File In swap: show a new clip only once it is loaded (Text DAT module ``ab_swap``).

Owns the playback side of the example: two Movie File In TOPs feed a Switch TOP; a new result
is loaded into the hidden one, pre-read in the background with ``preload()``, and the Switch
flips only when ``isFullyPreRead`` says the first frames are ready. The visible clip is never
touched while it plays, so there is no black or half-loaded frame, and a file is never
overwritten while a player holds it open.

Use from an Execute DAT (main thread only, like everything that touches operators)::

    swap = op('ab_swap').module.ABSwap(op('moviefilein_a'), op('moviefilein_b'), op('result_switch'))
    swap.load(path)     # when a result arrived
    swap.update()       # every frame (onFrameStart)

Suggested Movie File In TOP settings: Play Mode "Sequential", Extend Right "Hold" (keep the last
frame instead of looping) or "Cycle" (loop), Pre-Read Frames ≥ 5.
"""

import time


class ABSwap:
    """Double-buffered playback of result files through two Movie File In TOPs and a Switch TOP.

    Args:
        movie_a, movie_b: Movie File In TOPs; ``movie_a`` is input 0 of the switch, ``movie_b`` input 1.
        switch: a Switch TOP (or anything with an ``index`` parameter) choosing what is shown.
        preload_timeout: seconds to wait for ``isFullyPreRead`` before switching anyway (as long
            as the movie opened), so one slow disk read cannot stall the loop forever.
    """

    def __init__(self, movie_a, movie_b, switch, preload_timeout=10.0):
        self.movies = (movie_a, movie_b)
        self.switch = switch
        self.preload_timeout = preload_timeout
        self.live = int(switch.par.index.eval()) if hasattr(switch.par.index, "eval") else int(switch.par.index)
        self.live = 1 if self.live == 1 else 0
        self.live_path = None
        self.pending_path = None
        self.pending_since = None
        self.last_error = None
        self.swaps = 0

    @property
    def status(self):
        """'preloading', 'playing', 'error' or 'idle' — for a status display."""
        if self.pending_path is not None:
            return "preloading"
        if self.last_error:
            return "error"
        return "playing" if self.live_path else "idle"

    @property
    def clip_finished(self):
        """True when the visible clip shows its last frame (or nothing plays yet)."""
        if self.live_path is None:
            return True
        return bool(getattr(self.movies[self.live], "isLastFrame", False))

    def load(self, path):
        """Starts loading ``path`` into the hidden player; the switch happens in ``update()``.

        A newer ``load()`` before the switch simply replaces the pending file.
        """
        movie = self.movies[1 - self.live]
        movie.par.play = False  # hold the first frame while hidden
        movie.par.file = path
        movie.preload(0)
        self.pending_path = path
        self.pending_since = time.monotonic()
        self.last_error = None

    def update(self):
        """Call every frame. Switches when the pending clip is ready; returns True on a switch."""
        if self.pending_path is None:
            return False
        movie = self.movies[1 - self.live]
        if getattr(movie, "isInvalid", False):
            self.last_error = f"cannot open {self.pending_path}"
            self.pending_path = None
            return False
        waited = time.monotonic() - self.pending_since
        ready = movie.isFullyPreRead or (waited > self.preload_timeout and getattr(movie, "isOpen", False))
        if not ready:
            return False
        old = self.movies[self.live]
        self.switch.par.index = 1 - self.live
        movie.par.cuepulse.pulse()  # start from the cue point (frame 0 by default)
        movie.par.play = True
        old.par.play = False
        # Release the old file handle so the pipeline can delete old results (Windows keeps
        # open files locked). The TOP reopens it by itself should it cook again.
        old.unload()
        self.live = 1 - self.live
        self.live_path = self.pending_path
        self.pending_path = None
        self.swaps += 1
        return True
