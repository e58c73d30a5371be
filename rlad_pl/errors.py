"""One exception type for bad user input, rendered by the CLI as a single line."""


class ConfigError(ValueError):
    """Bad configuration or input. The message names the field and what was expected, on one line."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}")
