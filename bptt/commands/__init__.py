"""The ``bptt`` commands, one module each: its parser, help and examples, and the call it makes. Each
module imports torch, Lightning, Ray or MLflow only when its command runs, so ``--help`` answers at once;
``bptt.cli`` is the registry."""
