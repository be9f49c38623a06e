"""A job's state in Redis: start, batched outcomes, marks, finish, cancel flags, heartbeats, Lua scripts."""
