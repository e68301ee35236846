"""Errors for bad data: one line each, saying what was wrong, where, and how to fix it."""


class GQNDataError(ValueError):
    """A problem with the user's data or data configuration (never a bug in this package)."""


class CorruptRecordError(GQNDataError):
    def __init__(self, path, offset: int, problem: str):
        self.path, self.offset, self.problem = str(path), offset, problem
        super().__init__(f"{path} at byte {offset}: {problem}")

    def __reduce__(self):  # survive the trip from a DataLoader worker
        return (CorruptRecordError, (self.path, self.offset, self.problem))
