"""Fake: A1111 reports hook exceptions instead of raising them; tests record them."""

reported: list[str] = []


def report(message: str, *, exc_info: bool = False) -> None:
    reported.append(message)


def display(e: Exception, task: str, *, full_traceback: bool = False) -> None:
    reported.append(f"{task}: {e}")
