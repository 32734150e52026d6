"""(c) The held-out CNN family registered in the suite on the meta-training image pool."""
MUTATION = dict(
    file="learned_opt/tasks/suite.py",
    old='DigitsCNNFamily(pool="heldout")',
    new='DigitsCNNFamily(pool="meta")',
    caught_by="tests/test_guards_protocol.py::test_heldout_suite_families_hold_no_meta_training_image",
)
