"""A monotonic clock that a test sets, for code that takes its clock as an argument."""


class Clock:
    """Monotonic seconds that the test moves by setting :attr:`now`."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now
