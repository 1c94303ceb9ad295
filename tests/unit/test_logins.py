"""Failed logins (pacs/core/logins.py): the sliding window per client address and per
user name, its bounds and its log lines, on a clock the tests move."""

from __future__ import annotations

import logging

import pytest

from pacs.core import config
from pacs.core.errors import ConfigError
from pacs.core.logins import Attempt, Lockout, LoginLimiter, client_key
from tests.clock import Clock

LIMIT, WINDOW = 3, 60.0


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(clock: Clock) -> LoginLimiter:
    return LoginLimiter(LIMIT, WINDOW, clock=clock)


def fail(limiter: LoginLimiter, attempt: Attempt, times: int) -> list[Lockout]:
    return [limiter.failed(attempt) for _ in range(times)]


def test_an_address_is_refused_after_the_limit_until_the_window_passes(
        limiter: LoginLimiter, clock: Clock) -> None:
    mallory = Attempt("192.0.2.7", "alice")
    assert fail(limiter, mallory, LIMIT - 1) == [Lockout.NONE] * (LIMIT - 1)
    assert limiter.wait(mallory) == 0  # below the limit: still checked
    clock.now += 10
    assert limiter.failed(mallory) is Lockout.ADDRESS
    # The first failure leaves the window 60 s after it, 10 s ago.
    assert limiter.wait(mallory) == pytest.approx(WINDOW - 10)
    assert limiter.wait(Attempt("192.0.2.7", "bob")) > 0  # any name from that address
    assert limiter.wait(Attempt("192.0.2.7")) > 0         # and a token
    clock.now += WINDOW - 10 - 0.001
    assert limiter.wait(mallory) > 0
    clock.now += 0.002
    assert limiter.wait(mallory) == 0  # the oldest failure has left: one more try


def test_other_addresses_and_users_are_not_touched(limiter: LoginLimiter) -> None:
    fail(limiter, Attempt("192.0.2.7", "alice"), LIMIT)
    assert limiter.wait(Attempt("192.0.2.8", "bob")) == 0
    # The user name reached the limit too, but an address that has not failed is
    # still heard: the user logging in from their own machine.
    assert limiter.wait(Attempt("192.0.2.9", "alice")) == 0


def test_a_user_name_is_refused_to_addresses_that_failed(limiter: LoginLimiter,
                                                         clock: Clock) -> None:
    """A botnet guessing one password gets one try per address past the limit."""
    results = [limiter.failed(Attempt(f"198.51.100.{n}", "alice")) for n in range(LIMIT)]
    assert results == [Lockout.NONE] * (LIMIT - 1) + [Lockout.USER]
    assert limiter.wait(Attempt("198.51.100.0", "alice")) == pytest.approx(WINDOW)
    assert limiter.wait(Attempt("198.51.100.0", "bob")) == 0  # other names: below limit
    assert limiter.wait(Attempt("198.51.100.99", "alice")) == 0  # has not failed
    clock.now += WINDOW
    assert limiter.wait(Attempt("198.51.100.0", "alice")) == 0


def test_a_user_name_counts_per_customer(limiter: LoginLimiter) -> None:
    """Two customers' users named alike are two accounts: guessing at north's
    "reader" from many addresses locks that name at north only; south's "reader",
    who once mistyped from an address, still gets in from it."""
    south = Attempt("192.0.2.50", "reader", known=True, site="south")
    limiter.failed(south)
    for n in range(LIMIT):
        limiter.failed(Attempt(f"198.51.100.{n}", "reader", known=True, site="north"))
    assert limiter.wait(south) == 0
    assert limiter.wait(Attempt("198.51.100.0", "reader", site="north")) > 0
    limiter.failed(Attempt("192.0.2.50", "reader", site="north"))
    assert limiter.wait(Attempt("192.0.2.50", "reader", site="north")) > 0
    assert limiter.wait(south) == 0


def test_a_lockout_starts_once_and_asking_does_not_extend_it(
        limiter: LoginLimiter, clock: Clock) -> None:
    """Only failures count; a lock-out is reported once, when it starts."""
    mallory = Attempt("192.0.2.7", "alice")
    lockouts = fail(limiter, mallory, LIMIT + 2)  # two passed the check before the lock
    assert lockouts.count(Lockout.ADDRESS) == 1
    first = limiter.wait(mallory)
    clock.now += 1
    assert limiter.wait(mallory) == pytest.approx(first - 1)  # asking does not extend it


def test_ipv6_clients_count_per_64_and_mapped_ipv4_as_ipv4(limiter: LoginLimiter) -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9") \
        == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("::1") == "::1"
    for host in range(LIMIT):
        limiter.failed(Attempt(f"2001:db8:1:2::{host + 1}"))
    assert limiter.wait(Attempt("2001:db8:1:2::ffff")) > 0
    assert limiter.wait(Attempt("2001:db8:1:3::1")) == 0


def test_memory_is_bounded_and_the_oldest_are_forgotten(clock: Clock) -> None:
    limiter = LoginLimiter(LIMIT, WINDOW, capacity=100, clock=clock)
    fail(limiter, Attempt("192.0.2.1", "first"), LIMIT)
    assert limiter.wait(Attempt("192.0.2.1")) > 0
    for n in range(1000):
        clock.now += 0.001
        limiter.failed(Attempt(f"10.0.{n // 256}.{n % 256}", f"user{n}"))
    assert limiter.tracked() == (100, 100)
    assert limiter.wait(Attempt("192.0.2.1")) == 0  # forgotten, the oldest


def test_zero_turns_it_off(clock: Clock) -> None:
    limiter = LoginLimiter(0, WINDOW, clock=clock)
    assert not limiter.enabled
    assert set(fail(limiter, Attempt("192.0.2.7", "alice"), 50)) == {Lockout.NONE}
    assert limiter.wait(Attempt("192.0.2.7", "alice")) == 0
    assert limiter.tracked() == (0, 0)


def test_log_lines_are_rate_limited_and_hold_no_password(
        limiter: LoginLimiter, clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "pacs.core.logins")
    for n in range(20):
        limiter.failed(Attempt(f"192.0.2.{n}", "c0rrect-horse"))
    lines = [r.getMessage() for r in caplog.records]
    # One failure line and one lock-out line (the user name's) in the interval.
    assert len(lines) == 2, lines
    assert "192.0.2.0" in lines[0]
    assert "a user name" in lines[1]  # not a configured user's: maybe a password
    assert not any("c0rrect-horse" in line for line in lines)
    caplog.clear()
    clock.now += 10
    limiter.failed(Attempt("192.0.2.50", "alice", known=True))
    limiter.failed(Attempt("192.0.2.50", "alice", known=True))
    limiter.failed(Attempt("192.0.2.50", "alice", known=True))  # the address's lock-out
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "19 more not logged" in lines[0]
    assert "address 192.0.2.50" in lines[1] and "0 more" not in lines[1]


def test_the_settings() -> None:
    settings = config.load(environ={"PACS_AUTH_FAILURES": "5", "PACS_AUTH_WINDOW": "2.5"},
                           env_file=None)
    limiter = LoginLimiter.of(settings)
    assert (limiter.limit, limiter.window) == (5, 2.5)
    assert LoginLimiter.of(config.Settings()).limit == 10
    for name, value in (("PACS_AUTH_FAILURES", "-1"), ("PACS_AUTH_WINDOW", "0")):
        with pytest.raises(ConfigError, match=name):
            config.load(environ={name: value}, env_file=None)
