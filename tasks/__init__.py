"""Task suites: one module per suite, registered by name and imported on first use."""

from tasks.base import Example, TaskOptions, available_tasks, load_task, register_task, task_hash

__all__ = ["Example", "TaskOptions", "available_tasks", "load_task", "register_task", "task_hash"]
