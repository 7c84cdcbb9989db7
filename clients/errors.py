"""Errors the clients raise on bad input (tasks, sweeps), each with a message that says what to fix."""


class TaskError(ValueError):
    """A task file, grader name or sweep setting is unusable."""
