"""`kdpipe search` (issue 19): the space of candidate students (space), the cost-before-training filter and its
measurement cache (costs), and the Pareto front / best / closest candidate (pareto). Pure library code; the CLI,
the recipe's `search:` section and the Optuna study are wired elsewhere."""
