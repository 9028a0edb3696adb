"""The bottom layer every method and the harness build on: engine, KV cache, token trees,
acceptance, the decode loop, typed options, timing and the user-error type.

Nothing here imports a method, a task, a report or the harness.
"""
