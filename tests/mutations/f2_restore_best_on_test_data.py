"""(f) The inner loop's validation checks (early stopping, restore-best) reading the task's test data."""
MUTATION = dict(
    file="learned_opt/unroll.py",
    old='val = task.loss(params, task.sample_batch(generator, "val"))',
    new='val = task.loss(params, task.sample_batch(generator, "test"))',
    caught_by="tests/test_guards_protocol.py::test_restore_best_reads_only_validation_data",
)
