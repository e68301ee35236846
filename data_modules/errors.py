"""Errors for bad data: one line each, saying what was wrong, where, and how to fix it.

``fix`` (a class attribute, overridable per error) is the remedy the command-line tools print after the
message; it is kept out of ``str(err)`` so that warnings about skipped scenes do not repeat it.
"""


class GQNDataError(ValueError):
    """A problem with the user's data or data configuration (never a bug in this package)."""

    fix: str | None = None


class CorruptRecordError(GQNDataError):
    fix = "set data.skip_corrupt=true to skip damaged scenes (gqn-data verify <dataset dir> lists them all)"

    def __init__(self, path, offset: int, problem: str):
        self.path, self.offset, self.problem = str(path), offset, problem
        super().__init__(f"{path} at byte {offset}: {problem}")

    def __reduce__(self):  # survive the trip from a DataLoader worker, subclass included
        return (type(self), (self.path, self.offset, self.problem))


class FrameSizeError(CorruptRecordError):
    """A frame whose size is not the one the dataset name (DeepMind table or dataset card) says."""

    fix = ("these files do not hold the dataset named by data=: choose the data= config that matches them "
           "(data.image_size only sets the size frames are resized to)")
