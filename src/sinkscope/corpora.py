"""Text corpora shipped inside the package (see ``sinkscope/data/README.md`` for sources and licences).

Every default that needs ordinary text resolves here, so it works from a clone, an installed wheel or any
working directory.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from sinkscope.errors import InputError

#: corpus name -> file inside ``sinkscope/data``
CORPORA: dict[str, str] = {"wikitext2-valid": "wikitext2-valid.txt"}
DEFAULT_CORPUS_NAME = "wikitext2-valid"


def corpus_path(name: str = DEFAULT_CORPUS_NAME) -> Path:
    """Path of a shipped corpus file.

    >>> corpus_path().name
    'wikitext2-valid.txt'

    Raises:
        InputError: unknown corpus name, or the package was installed without its data.
    """
    if name not in CORPORA:
        raise InputError(f"unknown corpus {name!r}; shipped: {', '.join(sorted(CORPORA))}")
    path = Path(str(resources.files("sinkscope").joinpath("data", CORPORA[name])))
    if not path.is_file():
        raise InputError(f"shipped corpus {name!r} is missing from the installed package ({path})")
    return path
