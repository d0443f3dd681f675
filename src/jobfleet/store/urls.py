"""Store URLs: fit to print (any password masked) and fit to connect with."""

from __future__ import annotations

from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

#: what a masked password reads; a URL carrying it reopens with the password from the
#: environment (PGPASSWORD or ~/.pgpass) instead, so a printed URL can be passed on
MASK = "***"


def masked(url: str) -> str:
    """`url` with any password replaced by `***`, fit to print."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:{MASK}@{host}"
    query = urlencode([(k, MASK if k == "password" else v) for k, v in parse_qsl(parts.query)],
                      safe="*/:")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def conninfo(url: str) -> str:
    """The URL libpq connects with: a masked password is dropped (libpq then looks for one in
    PGPASSWORD or ~/.pgpass)."""
    parts = urlsplit(url)
    if parts.password is not None and unquote(parts.password) == MASK:
        user, _, host = parts.netloc.rpartition("@")
        parts = parts._replace(netloc=f"{quote(unquote(user.partition(':')[0]))}@{host}")
    return urlunsplit(parts)
