"""Config problems located in the source file, and the data paths that locate them."""

import json
import re
from dataclasses import dataclass

Segment = str | int
DataPath = tuple[Segment, ...]

# Keys that read unambiguously after a dot; anything else is printed as ["key"] so that
# a path can always be split back into its segments.
_PLAIN_KEY = re.compile(r"[^.\[\]\"\s]+")


def format_path(path: DataPath) -> str:
    """``("routes", 2, "upstream")`` -> ``routes[2].upstream``; the root is ``$``."""
    out: list[str] = []
    for segment in path:
        if isinstance(segment, int):
            out.append(f"[{segment}]")
        elif _PLAIN_KEY.fullmatch(segment):
            out.append(f".{segment}" if out else segment)
        else:
            out.append(f"[{json.dumps(segment)}]")
    return "".join(out) or "$"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a config file, with the place it was found (1-based line/col)."""

    file: str
    line: int
    col: int
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}: {self.path}: {self.message}"


class ConfigError(Exception):
    """A config could not be loaded; ``problems`` lists every problem found, in file order."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line, p.col))
        super().__init__("\n".join(str(p) for p in self.problems))
