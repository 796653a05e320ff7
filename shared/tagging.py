"""Whether a caption carries a trigger word, as the tagger and the training spec both decide it.

The tagger puts a DreamBooth subset's trigger in front of generated captions unless it is
already there, and the training checks count the captions that lack it; one rule for both, so
a caption the tagger leaves alone is never one those checks call untriggered. The rest of the
tag text cleaning is the tagger's own (``services/tagger/text.py``).
"""

from __future__ import annotations

import re


def has_trigger(text: str, trigger: str) -> bool:
    """Whether ``trigger`` is in a caption as whole words (``sks dog`` is in "a sks  Dog, run",
    not in "sks doggy"), whatever its case and spacing: what the text encoder will see."""
    words = " ".join(trigger.split())
    if not words:
        return False
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words.split(" ")) + r"(?!\w)"
    return re.search(pattern, text, re.IGNORECASE) is not None
