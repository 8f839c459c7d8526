"""Loading and building models: HF classifiers, the BiLSTM student, layer maps."""
