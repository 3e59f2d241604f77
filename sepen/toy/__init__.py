"""The toy world: coloured shapes, a tiny text-to-image model trained from scratch on them, and
an exact detector, so that SepEn can be run and judged offline on a CPU."""
