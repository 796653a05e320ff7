"""Turning tagger and captioner output into training text, and kohya's fine-tuning metadata.

Tags arrive as Danbooru spells them (``long_hair``, ``saber_(fate)``, rating names, kaomoji
such as ``^_^``); training captions want them readable, filtered, deduplicated and ordered,
with a dataset's trigger words first. The metadata is the JSON kohya's fine-tuning scripts
read (``merge_captions_to_metadata.py`` / ``merge_dd_tags_to_metadata.py`` write it):
``{image_key: {"caption": "...", "tags": "a, b, c"}}``.

Pure Python, no torch. Whether a caption already carries a trigger is
:func:`shared.tagging.has_trigger`, because the training spec's checks must agree with it.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from shared.tagging import has_trigger

# WD14's rating outputs (selected_tags.csv category 9).
WD14_RATINGS = frozenset({"general", "sensitive", "questionable", "explicit"})
# Danbooru tags whose underscore is part of the face, not a word separator.
KAOMOJI = frozenset({
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o",
    "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
})
TAG_SEPARATOR = ", "

# DeepDanbooru-style rating tokens ("rating:safe", "rating_explicit"); bare WD14 rating names
# are only recognised in tag lists, where they cannot be ordinary words.
_RATING_TOKEN = re.compile(r"^rating[:_ ]\s*\w+$", re.IGNORECASE)
_RATING_IN_TEXT = re.compile(r"\brating[:_]\s*\w+\b", re.IGNORECASE)
_UNESCAPED_PAREN = re.compile(r"(?<!\\)([()])")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?])")
_REPEATED_COMMAS = re.compile(r",(\s*,)+")
_COMMA_SPACING = re.compile(r",\s*")

TagLike = str | tuple[str, float]


def normalize_tag(tag: str, *, underscores_to_spaces: bool = True) -> str:
    """Collapse whitespace and, except in kaomoji, turn Danbooru's underscores into spaces."""
    tag = " ".join(tag.split())
    if underscores_to_spaces and tag not in KAOMOJI and len(tag) > 3:
        tag = " ".join(tag.replace("_", " ").split())
    return tag


def _key(tag: str) -> str:
    """What makes two spellings the same tag: case, underscores and spacing do not."""
    return normalize_tag(tag).casefold()


def _name(tag: TagLike) -> str:
    return tag if isinstance(tag, str) else tag[0]


def escape_parentheses(tag: str) -> str:
    """``saber (fate)`` -> ``saber \\(fate\\)``, so prompt parsers do not read a weight."""
    return _UNESCAPED_PAREN.sub(r"\\\1", tag)


def is_rating_tag(tag: str, rating_tags: Collection[str] = WD14_RATINGS) -> bool:
    tag = tag.strip()
    return bool(_RATING_TOKEN.match(tag)) or tag.casefold() in {r.casefold() for r in rating_tags}


def format_tags(
    general: Iterable[TagLike],
    character: Iterable[TagLike] = (),
    rating: Mapping[str, float] | None = None,
    *,
    undesired: Collection[str] = frozenset(),
    underscores_to_spaces: bool = True,
    keep_rating: bool = False,
    prefix: Sequence[str] = (),
    character_first: bool = True,
    escape: bool = False,
) -> list[str]:
    """One image's tags for a training caption, in order: prefix, rating, characters, general.

    ``general``/``character`` are tag names or (name, probability) pairs, already in the
    order wanted (a ``TagResult`` sorts them most likely first). ``prefix`` tokens (trigger
    words) always come first, as given, even when the tagger did not find them, and are
    never filtered. ``undesired`` drops tags whatever their spelling (``long_hair`` also
    drops ``long hair``). With ``keep_rating`` the most likely rating follows the prefix.
    Duplicates are dropped keeping the first. ``escape`` backslash-escapes parentheses in
    detected tags (not in the prefix).
    """
    blocked = {_key(tag) for tag in undesired}
    seen: set[str] = set()
    output: list[str] = []
    for token in prefix:
        token = " ".join(token.split())
        if token and _key(token) not in seen:
            seen.add(_key(token))
            output.append(token)

    detected: list[str] = []
    if keep_rating and rating:
        detected.append(max(rating, key=rating.__getitem__))
    groups = (character, general) if character_first else (general, character)
    for group in groups:
        detected.extend(_name(tag) for tag in group)

    for tag in detected:
        key = _key(tag)
        if not key or key in blocked or key in seen:
            continue
        seen.add(key)
        text = normalize_tag(tag, underscores_to_spaces=underscores_to_spaces)
        output.append(escape_parentheses(text) if escape else text)
    return output


@dataclass(frozen=True)
class TagOptions:
    """``format_tags``' settings as one value, for a dataset or job to carry."""

    undesired: frozenset[str] = frozenset()
    underscores_to_spaces: bool = True
    keep_rating: bool = False
    prefix: tuple[str, ...] = ()
    character_first: bool = True
    escape: bool = False

    def format(
        self, general: Iterable[TagLike], character: Iterable[TagLike] = (),
        rating: Mapping[str, float] | None = None,
    ) -> list[str]:
        return format_tags(
            general, character, rating, undesired=self.undesired,
            underscores_to_spaces=self.underscores_to_spaces, keep_rating=self.keep_rating,
            prefix=self.prefix, character_first=self.character_first, escape=self.escape,
        )


def split_tags(text: str) -> list[str]:
    """``"a, b,,c "`` -> ``["a", "b", "c"]``: a tag file's or metadata entry's tags."""
    return [tag for tag in (" ".join(part.split()) for part in text.split(",")) if tag]


def join_tags(tags: Iterable[str]) -> str:
    """Tags as kohya stores them: one string, comma and space separated."""
    joined: list[str] = []
    for tag in tags:
        if "," in tag:
            raise ValueError(f"tag {tag!r} contains a comma, which separates tags")
        joined.append(tag)
    return TAG_SEPARATOR.join(joined)


def clean_caption(
    text: str, *, replacements: Sequence[tuple[str, str]] = (), strip_rating: bool = True,
) -> str:
    """Tidy a generated caption: replacements (literal, in order), rating tokens, spacing, commas.

    Case is kept. Only explicit rating tokens (``rating:safe``) are removed: in a sentence,
    "general" or "explicit" are words.
    """
    for old, new in replacements:
        if old:
            text = text.replace(old, new)
    if strip_rating:
        text = _RATING_IN_TEXT.sub("", text)
    text = " ".join(text.split())
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _REPEATED_COMMAS.sub(",", text)
    text = _COMMA_SPACING.sub(", ", text)
    return text.strip(" ,")


def clean_tags(
    tags: Iterable[str],
    *,
    replacements: Mapping[str, str] | Sequence[tuple[str, str]] = (),
    strip_rating: bool = True,
    rating_tags: Collection[str] = WD14_RATINGS,
    underscores_to_spaces: bool = True,
) -> list[str]:
    """Tidy a tag list: split stray comma lists, normalise spacing, replace, strip ratings, dedupe.

    Replacements match whole tags whatever their case, underscores and spacing; the new value
    may be empty (drops the tag) or several comma-separated tags. Case is kept; duplicates
    (compared ignoring case, underscores and spacing) keep their first spelling.
    """
    pairs = replacements.items() if isinstance(replacements, Mapping) else replacements
    replace = {_key(old): new for old, new in pairs}
    seen: set[str] = set()
    cleaned: list[str] = []
    for entry in tags:
        for tag in split_tags(entry):
            for result in split_tags(replace[_key(tag)]) if _key(tag) in replace else [tag]:
                if strip_rating and is_rating_tag(result, rating_tags):
                    continue
                key = _key(result)
                if key in seen:
                    continue
                seen.add(key)
                cleaned.append(normalize_tag(result, underscores_to_spaces=underscores_to_spaces))
    return cleaned


def merge_metadata(
    existing: Mapping[str, Mapping[str, str]],
    *,
    captions: Mapping[str, str] | None = None,
    tags: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, dict[str, str]]:
    """kohya fine-tuning metadata with ``captions`` and ``tags`` merged in, as a new dict.

    As kohya's merge scripts do: an image gets an entry when it first has a caption or tags,
    a new value replaces the old one of that kind, other fields and images are kept, and
    tags are stored as one ``"a, b, c"`` string. Keys keep their order, new ones last.
    """
    merged = {key: dict(entry) for key, entry in existing.items()}
    for key, caption in (captions or {}).items():
        merged.setdefault(key, {})["caption"] = caption.strip()
    for key, tag_list in (tags or {}).items():
        if isinstance(tag_list, str):
            raise TypeError(f"tags for {key!r} must be a list of tags, not one string")
        merged.setdefault(key, {})["tags"] = join_tags(tag_list)
    return merged


def with_trigger(text: str, trigger: str) -> str:
    """A caption with a DreamBooth subset's identifier and class first (``sks dog, a dog on
    grass``), as kohya users write them by hand: in kohya a caption file replaces the class
    tokens, so a generated caption without them trains a LoRA its trigger does not trigger.
    A caption that already has the trigger is kept as it is."""
    text = text.strip()
    if has_trigger(text, trigger):
        return text
    trigger = " ".join(trigger.split())
    return f"{trigger}, {text}" if text else trigger
