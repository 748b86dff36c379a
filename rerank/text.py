"""Caption cleaning: the authors' ``pre_caption`` = open_clip's ``canonicalize_text(basic_clean(text))``.

The EDJE authors clean every caption this way before training and before
scoring (``data/utils.py``), so a query must be cleaned the same way for the
joint encoder to see what it was trained on:

1. ``ftfy.fix_text`` (mojibake repair) when ftfy is installed (optional here;
   it changes only broken text),
2. HTML entities unescaped, twice (``&amp;amp;`` -> ``&``), then stripped,
3. ``_`` -> space, ASCII punctuation (``string.punctuation``) removed,
4. lower case, runs of whitespace collapsed to one space, stripped.

Written from that description (open_clip is not a dependency).
"""

from __future__ import annotations

import html
import string

_PUNCTUATION = str.maketrans("", "", string.punctuation)

try:  # optional, as in open_clip's basic_clean
    import ftfy as _ftfy
except ImportError:  # pragma: no cover - depends on the environment
    _ftfy = None


def basic_clean(text: str) -> str:
    if _ftfy is not None:
        text = _ftfy.fix_text(text)
    return html.unescape(html.unescape(text)).strip()


def canonicalize_text(text: str) -> str:
    text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    return " ".join(text.split())


def clean_caption(text: str) -> str:
    """``canonicalize_text(basic_clean(text))``: what the authors' model reads instead of ``text``."""
    return canonicalize_text(basic_clean(text))


# name -> function, for EdjeJointEncoder.caption_cleaning (recorded in a saved model's config.json)
CAPTION_CLEANINGS = {"open_clip": clean_caption}
