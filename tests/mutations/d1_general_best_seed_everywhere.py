"""(d) The general experiment reporting the best meta-training seed's runs in every seed's slot."""
MUTATION = dict(
    file="experiments/general.py",
    old="free = dict(zip(free_specs, out_a[len(tune_specs):]))",
    new="free = dict(zip(free_specs, out_a[len(tune_specs):]))\n"
        "    for f in fams:\n"
        "        for h in (h1, h10):\n"
        "            best = min(seeds, key=lambda s: float(np.mean(\n"
        "                free[('learned', f, s, h)]['at'][h]['train_loss'])))\n"
        "            free.update({('learned', f, s, h): free[('learned', f, best, h)] for s in seeds})",
    caught_by="tests/test_guards_protocol.py::test_general_per_seed_numbers_are_each_seeds_own",
)
