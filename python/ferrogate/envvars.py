"""``${VAR}`` / ``${VAR:-default}`` substitution in config strings."""

import re
from collections.abc import Mapping

_REFERENCE = re.compile(r"\$\{([^}]*)\}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def interpolate(text: str, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """Return ``text`` with every reference replaced, and one message per bad reference.

    Like the shell, ``${VAR:-default}`` also uses the default when VAR is set but empty.
    A bad reference is replaced by an empty string so the caller can keep going.
    """
    errors: list[str] = []

    def replace(match: re.Match[str]) -> str:
        inner = match.group(1)
        name, sep, default = inner.partition(":-")
        if not _NAME.fullmatch(name):
            errors.append(
                f"malformed variable reference '{match.group(0)}': "
                "expected ${NAME} or ${NAME:-default}"
            )
            return ""
        value = env.get(name)
        if sep:
            return value if value else default
        if value is None:
            errors.append(
                f"environment variable '{name}' is not set "
                f"(write ${{{name}:-default}} to give a default)"
            )
            return ""
        return value

    return _REFERENCE.sub(replace, text), errors
