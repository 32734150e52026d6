"""(b) The digits experiment's final-test tasks drawn from the meta-training image pool."""
MUTATION = dict(
    file="experiments/digits.py",
    old='pool = "heldout" if cfg.final else "meta"',
    new='pool = "meta"',
    caught_by="tests/test_guards_protocol.py::test_digits_final_test_tasks_hold_no_meta_training_image",
)
