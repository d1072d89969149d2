"""The built-in small world: tasks and annotators, the build of its models, the gold judge.
Run with python -m world.build and python -m world.judge."""
