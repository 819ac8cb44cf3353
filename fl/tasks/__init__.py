"""Tasks register themselves on import; import the package to get them all."""

from fl.tasks import swap  # noqa: F401  (registers "swap")
from fl.tasks.base import Task, get_task, register_task, task_names

__all__ = ["Task", "get_task", "register_task", "task_names"]
