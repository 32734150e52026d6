"""(d) The general experiment reporting the best meta-training seed's runs in every seed's slot."""
MUTATION = dict(
    file="experiments/general_jobs.py",
    old="runs = Runs(cfg, seeds, tuned, single, {s: out[s] for s in learned})",
    new="runs = Runs(cfg, seeds, tuned, single, {s: out[s] for s in learned})\n"
        "    for s in learned:\n"
        "        best = min(seeds, key=lambda k: float(np.mean(out[(s[0], s[1], k, *s[3:])]['at'][s[3]]['train_loss'])))\n"
        "        runs.results[s] = out[(s[0], s[1], best, *s[3:])]",
    caught_by="tests/test_guards_protocol.py::test_general_per_seed_numbers_are_each_seeds_own",
)
