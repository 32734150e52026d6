"""(f) Meta-training's checkpoint selection (stream ``select``) scoring the meta-weights on test tasks."""
MUTATION = dict(
    file="learned_opt/meta/trainer.py",
    old='split="val", seed=cfg.seed if seed is None else seed, stream=stream,',
    new='split="test", seed=cfg.seed if seed is None else seed, stream=stream,',
    caught_by="tests/test_guards_protocol.py::test_checkpoint_selection_reads_no_test_task",
)
