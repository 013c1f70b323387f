"""Fixed benchmark text (so every engine sees the same prompt tokens)."""

SAMPLE = (
    "It is a truth universally acknowledged, that a single man in possession of a good "
    "fortune, must be in want of a wife. However little known the feelings or views of such a "
    "man may be on his first entering a neighbourhood, this truth is so well fixed in the minds "
    "of the surrounding families, that he is considered as the rightful property of some one or "
    "other of their daughters. The garden was quiet in the early light, and the river beyond "
    "the hedges ran slow and brown after the rains of the week before. "
)


def sample_text() -> str:
    return SAMPLE
