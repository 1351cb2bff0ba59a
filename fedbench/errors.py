"""The one error type a user sees: a bad value, named, with what is allowed."""


class ConfigError(ValueError):
    """Bad user input. The CLI prints ``fedbench: error: <message>`` on one line and exits 2."""


def choice_error(what: str, value, allowed) -> ConfigError:
    allowed = ", ".join(str(a) for a in allowed)
    return ConfigError(f"unknown {what} {value!r}; choose from: {allowed}")
