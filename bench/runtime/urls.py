"""Store URLs (MLflow tracking URIs, Optuna and SQLAlchemy database URLs): what may be shown of them, and
which database they name.

A URL can carry a password (``postgresql://user:secret@host/db``). Whatever is printed, logged to MLflow,
written to a file or put on a command line shows it :func:`masked` (``postgresql://user:***@host/db``); the
real URL stays in memory and in the environment of the processes that connect with it.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlencode

MASK = "***"
SECRET_KEYS = ("password", "passwd", "pwd", "secret", "token")  # query parameters whose value is a secret


def _split(url: str) -> tuple[str, str, str, str] | None:
    """(scheme, userinfo, rest of the authority and path, query) of ``scheme://…``, else None."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    return scheme, userinfo if at else "", host + slash + path, query


def masked(url: str) -> str:
    """``url`` with its password (``user:***@host``) and secret query parameters (``password=***``) masked,
    for everything that is shown or stored; the user name, host, database and other parameters stay."""
    parts = _split(url)
    if parts is None:
        return url
    scheme, userinfo, rest, query = parts
    user, colon, _password = userinfo.partition(":")
    auth = f"{user}{':' + MASK if colon else ''}@" if userinfo else ""
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_KEYS for k, _ in pairs):
            query = urlencode([(k, MASK if k.lower() in SECRET_KEYS else v) for k, v in pairs], safe="*")
    return f"{scheme}://{auth}{rest}" + (f"?{query}" if query else "")


def _secrets(url: str) -> list[str]:
    """The password and the secret query values in ``url`` (raw and percent-decoded)."""
    parts = _split(url)
    if parts is None:
        return []
    found = [parts[1].partition(":")[2]] + [v for k, v in parse_qsl(parts[3], keep_blank_values=True)
                                            if k.lower() in SECRET_KEYS]
    return [s for v in found if v and v != MASK for s in dict.fromkeys((v, unquote(v)))]


def scrubbed(text: str, url: str) -> str:
    """``text`` (an error message, say) with every secret of ``url`` in it masked."""
    for secret in sorted(_secrets(url), key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def hides_secret(url: str) -> bool:
    """Whether ``url`` was recorded :func:`masked` with a secret in it (so it cannot connect as it is)."""
    parts = _split(url)
    if parts is None:
        return False
    userinfo, query = parts[1], parts[3]
    return userinfo.partition(":")[2] == MASK or any(
        k.lower() in SECRET_KEYS and v == MASK for k, v in parse_qsl(query, keep_blank_values=True))


def database_name(url: str) -> str:
    """The name of the database a server URL (``postgresql://…/NAME?…``) opens, percent-decoded; '' for none."""
    parts = _split(url)
    if parts is None:
        return ""
    path = parts[2].partition("/")[2]
    return unquote(path)
