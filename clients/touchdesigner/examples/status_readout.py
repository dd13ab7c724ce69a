"""Status/progress readout for the pipeline (Text DAT module ``status_readout``).

Owns turning pipeline events and ``FramePipeline.stats()`` into a few lines of text for a Text
DAT, a Text TOP or a Table DAT, written only when something changed (writing a DAT every frame
would make everything downstream of it cook every frame).

Use from an Execute DAT::

    readout = op('status_readout').module.StatusReadout()
    for event in pipeline.pump():
        readout.add(event)
    readout.write(op('status'), pipeline)       # Text DAT, Text TOP or Table DAT
"""


class StatusReadout:
    """Keeps the latest state of the pipeline as text."""

    def __init__(self, bar_width=20):
        self.bar_width = bar_width
        self.progress = None
        self.phase = "idle"
        self.last_message = ""
        self.last_error = ""
        self.last_result = ""
        self._written = None

    def add(self, event):
        """Feeds one PipelineEvent (from ``pipeline.pump()``)."""
        self.last_message = event.message
        if event.kind == "submitted":
            self.phase = "queued"
            self.progress = 0.0
        elif event.kind == "started":
            self.phase = "running"
        elif event.kind == "progress":
            self.phase = "running"
            self.progress = event.progress
        elif event.kind == "done":
            self.phase = "done"
            self.progress = 1.0
            self.last_result = event.path or ""
        elif event.kind == "error":
            self.phase = "error"
            self.last_error = str(event.error)
        elif event.kind == "cancelled":
            self.phase = "cancelled"

    def rows(self, stats):
        """The readout as (label, value) rows, from ``pipeline.stats()``."""
        progress = self.progress if self.progress is not None else 0.0
        filled = int(round(progress * self.bar_width))
        bar = "#" * filled + "-" * (self.bar_width - filled)
        return [
            ("state", self.phase),
            ("progress", f"[{bar}] {progress:.0%}"),
            ("in flight", f"{stats.get('in_flight', 0)} (+{stats.get('waiting', 0)} waiting)"),
            ("done", str(stats.get("done", 0))),
            ("errors", str(stats.get("errors", 0))),
            ("skipped", str(stats.get("skipped", 0) + stats.get("dropped", 0))),
            ("last", self.last_message),
            ("result", self.last_result),
            ("error", self.last_error),
        ]

    def text(self, stats):
        """The readout as one string, one ``label: value`` line per row."""
        return "\n".join(f"{label}: {value}" for label, value in self.rows(stats))

    def write(self, target, pipeline):
        """Writes to a Text DAT (``.text``), Table DAT (rows) or Text TOP (``par.text``) if changed.

        Returns True when it wrote.
        """
        stats = pipeline.stats()
        rows = self.rows(stats)
        if rows == self._written or target is None:
            return False
        self._written = rows
        if getattr(target, "isTable", False):
            target.clear()
            for label, value in rows:
                target.appendRow([label, value])
        elif not getattr(target, "isDAT", False) and hasattr(target, "par") and hasattr(target.par, "text"):
            target.par.text = self.text(stats)  # a Text TOP
        else:
            target.text = self.text(stats)  # a Text DAT
        return True
