"""(a) A baseline's learning rate chosen on test tasks: tuning runs the final-test split instead of validation."""
MUTATION = dict(
    file="learned_opt/evaluate/tuning.py",
    old='res = evaluate(family, opt, ctrl_fn, num_tasks=num_tasks, steps=runs[0], split="val", seed=seed,',
    new='res = evaluate(family, opt, ctrl_fn, num_tasks=num_tasks, steps=runs[0], split="test", seed=seed,',
    caught_by="tests/test_guards_protocol.py::"
              "test_tuned_rate_is_the_argmin_of_validation_scores_and_tuning_runs_no_test_task",
)
