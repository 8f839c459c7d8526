"""Making a model smaller: layer surgery, width pruning, vocabulary pruning and the quantised ONNX variants."""
