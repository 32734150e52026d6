"""(d) The digits experiment reporting the best meta-training seed's numbers in every seed's slot."""
MUTATION = dict(
    file="experiments/digits.py",
    old="per_seed = parallel_map(seed_eval_job, [(cfg, r) for r in records], cfg.workers)",
    new="per_seed = parallel_map(seed_eval_job, [(cfg, r) for r in records], cfg.workers)\n"
        "    best = min(per_seed, key=lambda s: float(s['at'][horizons[0]]['train_loss'].mean()))\n"
        "    per_seed = [{**best, 'seed': s['seed']} for s in per_seed]",
    caught_by="tests/test_guards_protocol.py::test_digits_per_seed_numbers_are_each_seeds_own",
)
