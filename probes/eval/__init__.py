"""Offline evaluation: the data pool's readers, the default policies' recipes, leave-one-dataset-out
folds, the text-classifier baselines and reports. The server never imports it."""
