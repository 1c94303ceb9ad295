"""Failed logins, counted so that a client guessing passwords is stopped before it
costs the node a password hash (protocol-free; the HTTP edges ask it,
:mod:`adapters.http.auth`).

A wrong password costs the node one scrypt (tens of milliseconds of CPU,
:data:`pacs.core.access.SCRYPT_N`).  :class:`LoginLimiter` counts failed logins in a
sliding window of ``PACS_AUTH_WINDOW`` seconds:

- **per client address**: after ``PACS_AUTH_FAILURES`` failures in the window, every
  further request with credentials from that address is refused (HTTP 429 with
  Retry-After) without looking at them, until the oldest failure leaves the window.
  IPv6 clients count per /64 network (:func:`client_key`), the block one host
  usually holds;
- **per user name**: after as many failures for one name (from any addresses) in the
  window, further attempts for that name are refused from every address that failed
  in the window itself.  A botnet guessing one user's password gets one try per
  address, while the user, logging in from an address that has not failed, still
  gets in.

A successful login resets nothing: a client holding one account could otherwise clear
its count between guesses at others.  Requests refused so are not counted (they cost
nothing): a client is heard again once its oldest counted failure leaves the window,
so a client that keeps guessing gets ``PACS_AUTH_FAILURES`` tries per window.

The counts are kept in each process (a gunicorn worker; its customers share the
counts per address, and each has its own per user name: one name at two customers is
two accounts, and guessing at one must not lock the other out) and bounded: at most
:data:`MAX_TRACKED` addresses and as many user names, the ones whose last failure is
oldest forgotten first.  ``PACS_AUTH_FAILURES=0`` turns the limit off.

Failures are logged at WARNING at most once per :data:`LOG_INTERVAL` (with the count
of those not logged), and each lock-out, as often, with the address (and the user name
when it is a configured user's: a name typed wrong may be a password): never a password.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from pacs.core.access import ip_of
from pacs.core.config import Settings

log = logging.getLogger(__name__)

#: Most client addresses (and, apart, user names) whose failures are kept.
MAX_TRACKED = 10_000
#: Seconds between two WARNING lines about failed logins (and about lock-outs).
LOG_INTERVAL = 10.0
#: IPv6 clients count per network of this prefix length (a site's or a host's /64).
IPV6_PREFIX = 64
#: Longest user name kept as a key (longer names are cut: still one key per name).
_MAX_NAME = 128

Clock = Callable[[], float]


def client_key(address: str | None) -> str:
    """The key a client address counts under: the IP address (an IPv4-mapped IPv6
    address as its IPv4 address), an IPv6 address's /64 network, or the text as given
    when it is no IP address."""
    ip = ip_of(address)
    if ip is None:
        return address or ""
    if ip.version == 6 and not ip.is_loopback:
        return str(ipaddress.ip_network(f"{ip}/{IPV6_PREFIX}", strict=False))
    return str(ip)


class Lockout(Enum):
    """What a failure locked (:meth:`LoginLimiter.failed`)."""

    NONE = "none"
    ADDRESS = "address"  # this address reached the limit
    USER = "user"        # this user name reached the limit


class Window:
    """Times of the latest failures per key, within a sliding window, for at most
    ``capacity`` keys (the key whose last failure is oldest is forgotten first).

    Only the latest ``limit`` times of a key are kept: enough to tell whether it
    reached the limit, and when its oldest counted failure leaves the window.
    """

    def __init__(self, limit: int, seconds: float, capacity: int) -> None:
        self.limit = limit
        self.seconds = seconds
        self.capacity = capacity
        self._times: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._times)

    def count(self, key: str, now: float) -> int:
        """Failures of ``key`` within the window ending ``now``."""
        times = self._times.get(key)
        if times is None:
            return 0
        while times and times[0] <= now - self.seconds:
            times.popleft()
        if not times:
            del self._times[key]
            return 0
        return len(times)

    def add(self, key: str, now: float) -> int:
        """Count a failure of ``key`` at ``now``; its failures within the window."""
        times = self._times.get(key)
        if times is None:
            times = self._times[key] = deque(maxlen=self.limit)
            while len(self._times) > self.capacity:
                self._times.popitem(last=False)
        else:
            self._times.move_to_end(key)
        times.append(now)
        return self.count(key, now)

    def first_expiry(self, key: str) -> float:
        """When the oldest counted failure of ``key`` leaves the window (call after
        :meth:`count` found some)."""
        return self._times[key][0] + self.seconds

    def last_expiry(self, key: str) -> float:
        """When the newest failure of ``key`` leaves the window (as
        :meth:`first_expiry`)."""
        return self._times[key][-1] + self.seconds


class Every:
    """Lets one thing through per ``interval`` seconds, and counts the others."""

    def __init__(self, interval: float, clock: Clock) -> None:
        self.interval = interval
        self.clock = clock
        self._next = -math.inf
        self.skipped = 0

    def due(self) -> int | None:
        """The number skipped since the last one let through, when this one may go;
        ``None`` (and counted) when not."""
        now = self.clock()
        if now < self._next:
            self.skipped += 1
            return None
        skipped, self.skipped, self._next = self.skipped, 0, now + self.interval
        return skipped


@dataclass(frozen=True)
class Attempt:
    """One request's credentials, as the limiter sees them.

    Attributes
    ----------
    address :
        The peer address (``REMOTE_ADDR``).
    user :
        The user name an HTTP Basic header claims (``None``: a bearer token, or no
        name); as claimed, never checked.
    known :
        ``user`` names a configured user (only then is it logged).
    site :
        The customer whose users ``user`` is looked up among: a name counts per
        customer (two customers' users of one name are two accounts).
    """

    address: str
    user: str | None = None
    known: bool = False
    site: str = ""


class LoginLimiter:
    """Failed logins per client address and per user name (module docstring).

    Parameters
    ----------
    limit :
        Failures in the window after which a client is refused
        (``PACS_AUTH_FAILURES``); 0 turns the limiter off.
    window :
        The window in seconds (``PACS_AUTH_WINDOW``).
    capacity :
        Most addresses (and user names) kept.
    clock :
        Monotonic seconds (tests give their own).
    """

    def __init__(self, limit: int, window: float, *, capacity: int = MAX_TRACKED,
                 clock: Clock = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._addresses = Window(max(limit, 1), window, capacity)
        self._users = Window(max(limit, 1), window, capacity)
        self._lock = threading.Lock()
        self._failures_logged = Every(LOG_INTERVAL, clock)
        self._lockouts_logged = Every(LOG_INTERVAL, clock)

    @classmethod
    def of(cls, settings: Settings) -> LoginLimiter:
        """The limiter of ``PACS_AUTH_FAILURES`` and ``PACS_AUTH_WINDOW``."""
        return cls(settings.auth_failures, settings.auth_window)

    @property
    def enabled(self) -> bool:
        """True when failures are counted and clients refused."""
        return self.limit > 0

    def wait(self, attempt: Attempt) -> float:
        """Seconds until the credentials of ``attempt`` are looked at again; 0: now."""
        if not self.enabled:
            return 0.0
        address, user = client_key(attempt.address), _user_key(attempt)
        with self._lock:
            now = self.clock()
            failed_here = self._addresses.count(address, now)
            if failed_here >= self.limit:
                return self._addresses.first_expiry(address) - now
            if user is None or not failed_here or self._users.count(user, now) < self.limit:
                return 0.0
            # The name is locked for addresses that failed: until either forgets.
            return min(self._users.first_expiry(user),
                       self._addresses.last_expiry(address)) - now

    def failed(self, attempt: Attempt) -> Lockout:
        """Count a failed login of ``attempt``; what it locked, if anything (logged)."""
        if not self.enabled:
            return Lockout.NONE
        address, user = client_key(attempt.address), _user_key(attempt)
        with self._lock:
            now = self.clock()
            # A lock-out starts when a count reaches the limit, not again when requests
            # that passed before it began fail too.
            was_here = self._addresses.count(address, now)
            here = self._addresses.add(address, now)
            was_named = self._users.count(user, now) if user is not None else 0
            named = self._users.add(user, now) if user is not None else 0
            lockout = (Lockout.ADDRESS if was_here < self.limit <= here
                       else Lockout.USER if was_named < self.limit <= named
                       else Lockout.NONE)
            lines = self._lines(attempt, lockout)
        for line in lines:  # written outside the lock: no thread waits on the log
            log.warning("%s", line)
        return lockout

    def tracked(self) -> tuple[int, int]:
        """How many addresses and user names are kept (bounded by the capacity)."""
        with self._lock:
            return len(self._addresses), len(self._users)

    def _lines(self, attempt: Attempt, lockout: Lockout) -> list[str]:
        """The WARNING lines due for a failure (called under the lock)."""
        lines = []
        skipped = self._failures_logged.due()
        if skipped is not None:
            lines.append(f"Failed DICOMweb login from {attempt.address or '?'}"
                         + (f" ({skipped} more not logged)" if skipped else ""))
        skipped = self._lockouts_logged.due() if lockout is not Lockout.NONE else None
        if skipped is not None:
            who = (f"user {attempt.user}" if lockout is Lockout.USER and attempt.known
                   else "a user name" if lockout is Lockout.USER
                   else f"address {attempt.address or '?'}")
            lines.append(f"DICOMweb logins of {who} refused for up to {self.window:g} s: "
                         f"{self.limit} failed logins in {self.window:g} s"
                         + (f" ({skipped} more lock-outs not logged)" if skipped else ""))
        return lines


def _user_key(attempt: Attempt) -> str | None:
    """The key a user name is counted under: its customer's name (which holds no NUL,
    :func:`pacs.core.config.validate_customer`), a NUL, and the name (cut)."""
    return f"{attempt.site}\0{attempt.user[:_MAX_NAME]}" if attempt.user else None
