"""(a) A baseline's learning rate chosen on test tasks: tuning runs the final-test split instead of validation."""
MUTATION = dict(
    file="learned_opt/evaluate/tuning.py",
    old='kw = dict(num_tasks=num_tasks, steps=runs[0], split="val", seed=seed, stream=stream,',
    new='kw = dict(num_tasks=num_tasks, steps=runs[0], split="test", seed=seed, stream=stream,',
    caught_by="tests/test_guards_protocol.py::"
              "test_tuned_rate_is_the_argmin_of_validation_scores_and_tuning_runs_no_test_task",
)
