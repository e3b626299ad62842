"""Read a shapes-world caption back into the scene it describes: the inverse of ``shapes.caption_of``.

A caption carries no object offsets, so the parsed scene has every ``offset`` at (0, 0); everything else
(objects in caption order, shapes, colours, sizes, cells, background) round-trips exactly.
"""

from __future__ import annotations

import re

from cm_lightning.shapes.world import _PREPOSITIONS, BACKGROUNDS, COLOURS, SHAPES, SIZES, ObjectSpec, SceneSpec
from cm_lightning.errors import UserError


def _alternation(words) -> str:
    # Longest first, so "top left" is tried before "top".
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


# caption_of's own table (position -> "at the top left" etc.), inverted: one source of truth for both.
_POSITION_OF_PHRASE = {phrase: position for position, phrase in _PREPOSITIONS.items()}

_OBJECT = re.compile(
    rf"a ({_alternation(SIZES)}) ({_alternation(COLOURS)}) ({_alternation(SHAPES)}) "
    rf"({_alternation(_POSITION_OF_PHRASE)})"
)
_SCENE = re.compile(rf"(?P<body>.+), on a (?P<background>{_alternation(BACKGROUNDS)}) background")


def parse_caption(text: str) -> SceneSpec | None:
    """The scene a template caption describes, or None if ``text`` is not one of the templates.

    Leading/trailing whitespace is ignored; anything else must match ``caption_of`` exactly
    (lower case, "a" articles, ", " between objects and " and " before the last one). A caption that
    puts two objects in the same cell describes no valid scene and also gives None.
    """
    match = _SCENE.fullmatch(text.strip())
    if match is None:
        return None
    body = match["body"]
    # Object phrases contain neither ", " nor " and ", so the separators are unambiguous.
    if " and " in body:
        head, last = body.rsplit(" and ", 1)
        phrases = head.split(", ") + [last]
    else:
        phrases = [body]
    objects = []
    for phrase in phrases:
        m = _OBJECT.fullmatch(phrase)
        if m is None:
            return None
        size, colour, shape, where = m.groups()
        objects.append(ObjectSpec(shape, colour, size, _POSITION_OF_PHRASE[where]))
    try:
        return SceneSpec(tuple(objects), match["background"])
    except UserError:  # e.g. two objects in one cell
        return None
