"""The built-in synthetic sealant beads: the renderer (:mod:`data.synth.render`), a dataset and
sample-grid writer (:mod:`data.synth.writer`) and its command line (``python -m data.synth``)."""

from data.synth.render import VIEWS, Bead, render, render_sample

__all__ = ["VIEWS", "Bead", "render", "render_sample"]
