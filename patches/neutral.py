"""Gender-neutral rewriting: the base model's own answer with every gender attribution replaced.

The ``fairness`` teacher's target for a prompt about a person of unspecified gender is the base model's
answer rewritten by :func:`neutralise` and then checked by :func:`patches.bias.judge_neutral`:

* pronouns: he/she → they (with the verb after it made plural: is → are, was → were, has → have,
  does → do, works → work, …, skipping one adverb such as "often"), him → them, his → their (theirs
  when it stands alone), hers → theirs, himself/herself → themselves, her → their before a noun and
  them otherwise (after a verb like "help" or "let", before a preposition, determiner or punctuation);
* gendered nouns and job titles: man/woman/guy/lady/gentleman → person, boy/girl → kid,
  husband/wife → partner, waitress → server, policeman → police officer, …; Mr/Mrs/Ms/Miss → Mx;
* common gendered first names (:data:`patches.bias.MALE_NAMES` and ``FEMALE_NAMES``) → gender-neutral
  names, the same name for every mention.

Capitalisation is kept. The rewrite is word-level, so it can be clumsy ("they works" is avoided, rarer
verbs are not); the teacher drops any rewrite in which the measure still finds a gender.

``degender-pronoun`` (PyPI) was looked at: sdist only, no verb agreement, no nouns or names.
"""

from __future__ import annotations

import re

from patches.bias import FEMALE_NAMES, MALE_NAMES

NEUTRAL_NAMES = ("Alex", "Sam", "Jordan", "Taylor", "Casey", "Riley", "Morgan", "Jamie", "Avery", "Robin")
_NOUNS = {
    "man": "person", "woman": "person", "guy": "person", "lady": "person", "gentleman": "person", "gal": "person",
    "men": "people", "women": "people", "guys": "people", "ladies": "people", "gentlemen": "people",
    "boy": "kid", "girl": "kid", "boys": "kids", "girls": "kids",
    "husband": "partner", "wife": "partner", "husbands": "partners", "wives": "partners",
    "boyfriend": "partner", "girlfriend": "partner",
    "waitress": "server", "actress": "actor", "stewardess": "flight attendant", "hostess": "host",
    "policeman": "police officer", "policewoman": "police officer", "fireman": "firefighter",
    "businessman": "businessperson", "businesswoman": "businessperson", "salesman": "salesperson",
    "saleswoman": "salesperson", "chairman": "chair", "chairwoman": "chair", "spokesman": "spokesperson",
    "spokeswoman": "spokesperson", "mailman": "mail carrier", "cameraman": "camera operator",
    "handyman": "handyperson", "craftsman": "craftsperson", "foreman": "supervisor", "weatherman": "meteorologist",
    "congressman": "representative", "congresswoman": "representative", "headmaster": "head teacher",
    "headmistress": "head teacher", "housewife": "homemaker",
}  # fmt: skip
_IRREGULAR = {"is": "are", "was": "were", "has": "have", "does": "do", "goes": "go", "isn't": "aren't",
              "wasn't": "weren't", "hasn't": "haven't", "doesn't": "don't", "'s": "'re"}  # fmt: skip
_ADVERBS = {
    "always", "often", "usually", "also", "never", "really", "still", "just", "sometimes", "then", "now",
    "finally", "quickly", "carefully", "soon", "already", "even", "only", "rarely", "truly", "clearly",
}  # fmt: skip
_NOT_VERBS = {
    "always",
    "sometimes",
    "perhaps",
    "this",
    "his",
    "its",
    "us",
    "as",
    "plus",
    "thus",
    "less",
    "unless",
    "across",
    "was",
    "is",
    "has",
    "does",
    "yes",
    "afterwards",
    "towards",
    "nervous",
    "famous",
    "serious",
}
# "her" is "them" (object) before these words or after these verbs, otherwise "their" (possessive)
_AFTER_OBJECT = {
    "a", "an", "the", "to", "for", "with", "and", "or", "but", "that", "in", "on", "at", "up", "down", "out", "off",
    "about", "from", "into", "over", "back", "again", "so", "as", "if", "when", "how", "what", "why", "because",
    "by", "of", "too", "very", "well", "now", "then", "today", "yesterday", "soon", "this", "some", "any", "all",
    "more", "feel", "know", "see", "go", "come", "do", "be", "home", "away", "something", "anything", "everything",
}  # fmt: skip
_BEFORE_OBJECT = {
    "let", "lets", "make", "makes", "made", "help", "helps", "helped", "watch", "watched", "see",
    "saw", "hear", "heard", "have", "had", "told", "asked", "gave", "give", "thank", "thanked",
}  # fmt: skip
_REFLEXIVE = {"himself", "herself", "themselves"}
_OBJECT_START = {"her", "his", "their", "them", "the", "a", "an", "to", "with", "at", "on", "in", "up", "out", "it",
                 "every", "all", "early", "late", "home", "back", "some", "many", "for", "about", "over"}  # fmt: skip
_TOKEN = re.compile(r"[A-Za-z]+(?:'[a-z]+)?|[^A-Za-z]+")


def _case(word: str, like: str) -> str:
    if like.isupper() and len(like) > 1:
        return word.upper()
    return word[:1].upper() + word[1:] if like[:1].isupper() else word


def _plural_verb(word: str) -> str | None:
    """The plural form of a third-person singular verb, or ``None`` when ``word`` does not look like one."""
    low = word.lower()
    if low in _IRREGULAR:
        return _IRREGULAR[low]
    if low in _NOT_VERBS or len(low) < 3 or not low.endswith("s") or low.endswith("ss") or low.endswith("'s"):
        return None
    if low.endswith("ies") and len(low) > 4:
        return low[:-3] + "y"
    if re.search(r"(?:ch|sh|x|z|o)es$", low):
        return low[:-2]
    return low[:-1]


def _words(tokens: list[str], start: int) -> list[int]:
    """Indices of the word tokens from ``start`` on, stopping at punctuation other than spaces/apostrophes."""
    out = []
    for i in range(start, len(tokens)):
        if tokens[i][0].isalpha():
            out.append(i)
        elif tokens[i].strip():
            break
    return out


def _pluralise_predicate(tokens: list[str], following: list[int]) -> None:
    """Make the verb after a new "they" plural (one adverb or "themselves" may come first), and verbs joined to
    it by "and" in the same sentence when an object-like word follows them ("… and greets her patients")."""
    verbs = following[:2] if following and tokens[following[0]].lower() in _ADVERBS | _REFLEXIVE else following[:1]
    for j in verbs[-1:]:
        plural = _plural_verb(tokens[j])
        if plural is not None:
            tokens[j] = _case(plural, tokens[j])
    for a, b, c in zip(following, following[1:], following[2:], strict=False):
        if tokens[a].lower() == "and" and b == a + 2 and c == b + 2 and tokens[c].lower() in _OBJECT_START:
            plural = _plural_verb(tokens[b])
            if plural is not None:
                tokens[b] = _case(plural, tokens[b])


def neutralise(text: str) -> str:
    """``text`` with gendered pronouns, nouns, titles and common gendered names made neutral (see above)."""
    text = re.sub(r"\b(?:Mr|Mrs|Ms|Miss)(\.?)(?=\s+[A-Z])", r"Mx\1", text)
    have = r"\b(he|she)'s(?=\s+(?:been|got|gotten|had)\b)"
    text = re.sub(have, lambda m: _case("they've", m.group(1)), text, flags=re.IGNORECASE)
    text = re.sub(r"\b(he|she)'s\b", lambda m: _case("they're", m.group(1)), text, flags=re.IGNORECASE)
    tokens = _TOKEN.findall(text)
    names: dict[str, str] = {}
    for i, token in enumerate(tokens):
        low = token.lower()
        following = _words(tokens, i + 1)
        nxt = tokens[following[0]].lower() if following else ""
        before = [t for t in tokens[:i] if t[0].isalpha()]
        prev = before[-1].lower() if before else ""
        if low in ("he", "she"):
            tokens[i] = _case("they", token)
            _pluralise_predicate(tokens, following)
        elif low == "him":
            tokens[i] = _case("them", token)
        elif low == "his":
            tokens[i] = _case("theirs" if not following or nxt in _AFTER_OBJECT else "their", token)
        elif low == "hers":
            tokens[i] = _case("theirs", token)
        elif low in ("himself", "herself"):
            tokens[i] = _case("themselves", token)
        elif low == "her":
            is_object = not following or nxt in _AFTER_OBJECT or prev in _BEFORE_OBJECT
            tokens[i] = _case("them" if is_object else "their", token)
        elif low in _NOUNS:
            tokens[i] = _case(_NOUNS[low], token)
        elif token in MALE_NAMES or token in FEMALE_NAMES:
            free = [n for n in NEUTRAL_NAMES if n not in names.values() and n not in text]
            tokens[i] = names.setdefault(token, free[0] if free else NEUTRAL_NAMES[len(names) % len(NEUTRAL_NAMES)])
    return "".join(tokens)
