"""One exception type for bad user input, rendered by the CLI as a single line."""


class ConfigError(ValueError):
    """Bad configuration or input. The message names the field and what was expected, on one line."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")


_warned: set[str] = set()


def warn_once(field: str, message: str) -> None:
    """One line ``rlad_pl: warning: <field>: <message>`` on stderr (rank 0 only, once per field and process), for a
    setting that is legal but likely not what was meant."""
    import os
    import sys

    if field in _warned or os.environ.get("RANK", "0") not in ("0", ""):
        return
    _warned.add(field)
    print(f"rlad_pl: warning: {field}: {message}", file=sys.stderr)
