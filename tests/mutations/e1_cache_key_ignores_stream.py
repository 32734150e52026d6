"""(e) The tuning cache key ignoring the tuning tasks' stream: scores of one task set served for another."""
MUTATION = dict(
    file="learned_opt/evaluate/tuning.py",
    old="ident = repr((name, repr(family), num_tasks, seed, stream, val_every,",
    new="ident = repr((name, repr(family), num_tasks, seed, val_every,",
    caught_by="tests/test_guards_protocol.py::test_tuning_cache_is_not_reused_when_the_tuning_tasks_change[stream]",
)
