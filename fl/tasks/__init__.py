"""Tasks register themselves on import; import the package to get them all."""

from fl.tasks import portrait, swap  # noqa: F401  (they register themselves)
from fl.tasks.base import Task, get_task, register_task, task_names

__all__ = ["Task", "get_task", "register_task", "task_names"]
