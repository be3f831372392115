"""The prompt filter: does a text contain a blocklisted phrase, as the text encoder would read it?

A text encoder does not see the characters a person typed. Its tokenizer applies NFKC (fullwidth
and mathematical letters become ASCII), drops format characters (zero-width spaces, soft
hyphens) and splits words into sub-word pieces, so "ｄｅｅｐ<soft hyphen>fakes" reaches the model
as "deepfakes". Matching lower-cased whole words of the raw text misses all of that. Here a text
is matched after the folds a tokenizer applies plus the ones a person uses to dodge a word list:

  normalise  NFKC; drop format characters (category Cf) and invisible Hangul fillers; drop
             combining marks (accents, strike-through overlays); fold look-alike letters
             (Cyrillic, Greek, Armenian, small capitals) to Latin; casefold.
  tokens     runs of letters and digits. A separator without a space ("deep-fake", "d.e.e.p")
             may be joined anywhere; a spaced one only where a phrase has a word break
             ("non consensual"). Single letters in a run of two or more ("d e e p") are a word
             spelt out and join their neighbours.
  leetspeak  digits and @ $ ! | + * stand for the letters they look like (0 o, 3 e, $ s, ...);
             the text is read twice, with the symbols as letters ("c$am") and as separators
             ("d*e*e*p").
  phrases    every word of an entry also matches its inflections (plural, -ed, -ing, -er, -ly,
             irregular plurals such as "children"); an entry's words match with any separator
             or none between them ("revenge-porn", "revengeporn", tag-style "nude, child");
             a one-word entry of COMPOUND_MIN_LETTERS or more also matches at the start of a
             compound ("deepfakevideo": the tokenizer splits it back into pieces).

A match starts and ends at token boundaries, so words that merely contain a blocked word's
letters ("skin", "nudibranch", "Sussex", "therapist") never match. The price of matching across
any separator: "a deep, fake smile" is refused by the entry "deep fake". Not covered: reversed or
upside-down text, stretched letters ("deeeepfake"), a word inserted inside a phrase ("nude young
child") and synonyms; a deployment lists those phrases itself.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

from dit_video.errors import PromptRefused

# A one-word entry at least this long also matches as the start of a compound. Short words have
# innocent extensions ("rape" -> "rapeseed", "anal" -> "analysis"); long ones rarely do.
COMPOUND_MIN_LETTERS = 8

# Look-alike letters -> Latin. Chosen from Unicode's confusables list (UTS #39, confusables.txt):
# the Cyrillic, Greek, Armenian, small-capital and stroked Latin letters whose prototype is one
# Latin letter. Upper case maps to upper case because casefolding first would lose the shape
# (Greek capital eta looks like H, its lower case like n). Fullwidth and mathematical letters
# need no entry: NFKC folds them.
_CONFUSABLE_PAIRS = (
    # Cyrillic lower and upper case
    "аa вb сc ԁd еe һh іi јj кk ӏl мm нh оo рp ԛq гr ѕs тt уy үy хx ԝw пn ьb"
    " АA ВB СC ԀD ЕE НH ІI ЈJ КK ӀI МM ОO РP ԚQ ЅS ТT УY ҮY ХX ԜW"
    # Greek lower and upper case (micro sign U+00B5 becomes mu under NFKC)
    " αa βb γy εe ηn ιi κk μu νv οo ρp τt υu χx ωw"
    " ΑA ΒB ΕE ΖZ ΗH ΙI ΚK ΜM ΝN ΟO ΡP ΤT ΥY ΧX"
    # Armenian
    " օo սu ոn հh զq ցg"
    # Latin look-alikes that NFKC and accent stripping leave alone: dotless i, script a and g,
    # stroked letters, small capitals
    " ıi ȷj ɑa ɡg ɩi øo đd łl ħh ŧt ƀb ɨi"
    " ᴀa ʙb ᴄc ᴅd ᴇe ꜰf ɢg ʜh ɪi ᴊj ᴋk ʟl ᴍm ɴn ᴏo ᴘp ʀr ꜱs ᴛt ᴜu ᴠv ᴡw ʏy ᴢz"
)
_CONFUSABLES = str.maketrans({pair[0]: pair[1] for pair in _CONFUSABLE_PAIRS.split()})
# Invisible characters that are letters (category Lo), not format characters: the Hangul fillers
# (NFKC maps U+3164 and U+FFA0 onto U+1160).
_INVISIBLE_LETTERS = frozenset("\u115f\u1160")

# What a letter of a blocked word may be written as. "*" masks a vowel ("p*rn"); capital I and
# small l look alike, so each stands for the other.
_LEET = {"a": "4@*", "b": "8", "e": "3*", "g": "9", "i": "1!|*l", "l": "1|i", "o": "0*", "s": "5$",
         "t": "7+", "u": "*", "z": "2"}
_LEET_SYMBOLS = "@$!|+*"
# Tokens: runs of letters and digits, or (second reading) of letters, digits and leet symbols.
_TOKEN_PLAIN = re.compile(r"[^\W_]+")
_TOKEN_LEET = re.compile(r"(?:[^\W_]|[" + re.escape(_LEET_SYMBOLS) + r"])+")
# In the token skeleton a text is matched against: joinable anywhere / joinable at a word break.
TIGHT, SPACED = "-", " "
# What may stand between two letters of a word, and between two words of an entry. A leet symbol
# may be a separator even where the symbols are read as letters ("d*e*e*p*f*@*k*e").
_IN_WORD = "[" + re.escape(TIGHT + _LEET_SYMBOLS) + "]?"
_WORD_BREAK = "[" + re.escape(TIGHT + SPACED + _LEET_SYMBOLS) + "]?"

_IRREGULAR = {"child": ("children",), "man": ("men",), "woman": ("women",), "person": ("people",)}
_VOWELS = "aeiou"


def normalize(text: str) -> str:
    """The text as the filter reads it: NFKC, format characters and combining marks dropped,
    look-alike letters folded to Latin, casefolded."""
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf" and ch not in _INVISIBLE_LETTERS)
    text = unicodedata.normalize("NFD", text)  # accents become separate combining marks ...
    text = "".join(ch for ch in text if unicodedata.category(ch) not in ("Mn", "Me"))  # ... and go
    # Fold before casefolding (upper-case shapes), and after (lower case of an unlisted capital).
    return text.translate(_CONFUSABLES).casefold().translate(_CONFUSABLES)


def skeleton(text: str, symbols_are_letters: bool) -> str:
    """Tokens of a normalised text joined by TIGHT (may be joined anywhere) or SPACED (a word
    break). With symbols_are_letters, leet symbols count as letters ("c$am" is one token)."""
    pattern = _TOKEN_LEET if symbols_are_letters else _TOKEN_PLAIN
    tokens, gaps, end = [], [], 0
    for m in pattern.finditer(text):
        if tokens:
            gaps.append(SPACED if any(ch.isspace() for ch in text[end:m.start()]) else TIGHT)
        tokens.append(m.group())
        end = m.end()
    single = [len(t) == 1 for t in tokens]
    spelt = [s and ((k > 0 and single[k - 1]) or (k + 1 < len(tokens) and single[k + 1]))
             for k, s in enumerate(single)]
    gaps = [TIGHT if spelt[k] or spelt[k + 1] else gap for k, gap in enumerate(gaps)]
    return "".join(g + t for g, t in zip(["", *gaps], tokens, strict=False))  # no tokens: ""


def inflections(word: str) -> list[str]:
    """A word and its regular inflections and agent/adverb forms (generous: a form nobody writes
    costs nothing, since a match must cover whole tokens)."""
    forms = {word, word + "s", word + "es", word + "ly", *_IRREGULAR.get(word, ())}
    if word.endswith("e"):
        forms |= {word + "d", word + "r", word + "rs", word + "ry", word[:-1] + "ing"}
    else:
        forms |= {word + "ed", word + "ing", word + "er", word + "ers"}
    if len(word) > 1 and word.endswith("y") and word[-2] not in _VOWELS:
        forms |= {word[:-1] + "ies", word[:-1] + "ied"}
    if len(word) > 2 and word[-1] not in _VOWELS + "wxy" and word[-2] in _VOWELS:  # stop -> stopped
        forms |= {word + word[-1] + suffix for suffix in ("ed", "ing", "er", "ers")}
    return sorted(forms, key=len, reverse=True)


def _letter(ch: str) -> str:
    spellings = ch + _LEET.get(ch, "")
    return "[" + re.escape(spellings) + "]" if len(spellings) > 1 else re.escape(ch)


def _word(word: str) -> str:
    forms = (_IN_WORD.join(_letter(ch) for ch in form) for form in inflections(word))
    return "(?:" + "|".join(forms) + ")"


def phrase_pattern(phrase: str) -> re.Pattern | None:
    """The regex that finds a blocklist entry in a skeleton; None if the entry has no letters."""
    words = _TOKEN_PLAIN.findall(normalize(phrase))
    if not words:
        return None
    body = _WORD_BREAK.join(_word(w) for w in words)
    if len(words) == 1 and len(words[0]) >= COMPOUND_MIN_LETTERS:
        stem = _IN_WORD.join(_letter(ch) for ch in words[0])
        body = f"(?:{body}|{stem}[^{re.escape(TIGHT + SPACED)}]*)"
    boundary = "[^" + re.escape(TIGHT + SPACED) + "]"
    return re.compile(f"(?<!{boundary}){body}(?!{boundary})")


class PromptFilter:
    """A compiled blocklist. `match(text)` -> the first entry found in it (or None); `check`
    raises PromptRefused naming the prompt, the entry and `source` (where the list came from)."""

    def __init__(self, phrases: Iterable[str], source: str = "the blocklist"):
        self.source = source
        self.patterns = [(p, pattern) for p in phrases if (pattern := phrase_pattern(p)) is not None]

    def match(self, text: str) -> str | None:
        normal = normalize(text)
        readings = [skeleton(normal, symbols_are_letters=False), skeleton(normal, symbols_are_letters=True)]
        for phrase, pattern in self.patterns:
            if any(pattern.search(reading) for reading in readings):
                return phrase
        return None

    def check(self, prompts: Sequence[str], negative_prompt: str | None = None) -> None:
        """Raise PromptRefused for the first prompt (then the negative prompt) that matches."""
        named = [(f"prompt {i}", p) for i, p in enumerate(prompts)]
        named += [("negative_prompt", negative_prompt)] if negative_prompt else []
        for name, text in named:
            phrase = self.match(str(text))
            if phrase is not None:
                raise PromptRefused(f"{name} ({text!r}) is refused: it contains the blocked phrase {phrase!r} "
                                    f"from {self.source}; nothing was generated")


@lru_cache(maxsize=16)
def compile_phrases(phrases: tuple[str, ...], source: str = "the blocklist") -> PromptFilter:
    """PromptFilter(phrases, source), compiled once per list (ingest checks one caption at a time)."""
    return PromptFilter(phrases, source)


def read_blocklist(path: str | Path) -> list[str]:
    """Entries of a blocklist file (lower case, whitespace collapsed): one per line, blank lines
    and '#' comments skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"provenance.blocklist: no file at '{path}' (one phrase per line)")
    lines = (line.split("#", 1)[0].strip().lower() for line in path.read_text(encoding="utf-8").splitlines())
    return [" ".join(line.split()) for line in lines if line]
