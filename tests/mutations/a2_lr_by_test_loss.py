"""(a) The held-out row's learning rate chosen by test means: the rate tuned for the validation loss is scored by
the tasks' test-split loss."""
MUTATION = dict(
    file="learned_opt/evaluate/tuning.py",
    old='got[f"{hh}/{m}"] = -float(np.mean(v)) if m == "accuracy" else robust_mean(v)',
    new='got[f"{hh}/{m}"] = -float(np.mean(v)) if m == "accuracy" else robust_mean(\n'
        '                            res.at[hh]["test_loss" if m == "val_loss" else m])',
    caught_by="tests/test_guards_protocol.py::"
              "test_tuned_rate_is_the_argmin_of_validation_scores_and_tuning_runs_no_test_task",
)
