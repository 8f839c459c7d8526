"""Sentence-embedding building blocks: pooling, the encoder, teachers, quality metrics, ONNX export, static students."""
