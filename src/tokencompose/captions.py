"""Caption wording shared by the shapes world and MultiGen prompts (pure string functions)."""

from __future__ import annotations

from collections.abc import Sequence

# Words whose first letter misleads: a vowel letter with a consonant sound, or a silent h.
_A_EXCEPTIONS = ("one", "once", "uni", "use", "usu", "euro", "ewe", "ufo", "uk", "ukulele", "uran", "ure", "uten")
_AN_EXCEPTIONS = ("hour", "honest", "honor", "honour", "heir", "herb")


def article(phrase: str) -> str:
    """``"a"`` or ``"an"`` for a noun phrase, by its first word's sound (a spelling rule with exceptions)."""
    word = phrase.strip().lower()
    if word.startswith(_AN_EXCEPTIONS):
        return "an"
    if word.startswith(_A_EXCEPTIONS):
        return "a"
    return "an" if word[:1] in "aeiou" else "a"


def multigen_text(cats: Sequence[str], prefix: str = "a photo of ") -> str:
    """The paper's sentence with correct articles: "a photo of an A, a B, and a C." (Oxford comma for K >= 3)."""
    parts = [f"{article(c)} {c}" for c in cats]
    if len(parts) == 1:
        body = parts[0]
    elif len(parts) == 2:
        body = f"{parts[0]} and {parts[1]}"
    else:
        body = ", ".join(parts[:-1]) + f", and {parts[-1]}"
    return f"{prefix}{body}."
