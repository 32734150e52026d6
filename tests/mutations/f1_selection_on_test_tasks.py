"""(f) Meta-training's checkpoint selection (stream ``select``) scoring the meta-weights on test tasks."""
MUTATION = dict(
    file="learned_opt/meta/trainer.py",
    old='split="val", seed=cfg.seed, stream="select",',
    new='split="test", seed=cfg.seed, stream="select",',
    caught_by="tests/test_guards_protocol.py::test_checkpoint_selection_reads_no_test_task",
)
