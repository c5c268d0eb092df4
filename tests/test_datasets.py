"""The benchmark data builders give the same data in any process (pytest included)."""

import hashlib
import subprocess
import sys
from pathlib import Path

from benchmarks import datasets

ROOT = Path(__file__).resolve().parents[1]
DIGEST = (
    "import hashlib; from benchmarks import datasets; "
    "print(hashlib.sha256('|'.join(datasets.docstring_sentences()).encode()).hexdigest())"
)


def test_sentences_do_not_depend_on_the_process():
    """pytest swaps sys's hooks and streams; the sentences (MiniLM's data, and the words
    every rendered page and text line is made of) came out different under it before."""
    here = hashlib.sha256("|".join(datasets.docstring_sentences()).encode()).hexdigest()
    fresh = subprocess.run(
        [sys.executable, "-c", DIGEST], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert here == fresh
    assert len(datasets.docstring_sentences()) > 500
