"""Decoder LLMs in onnxruntime-genai folders: teacher-forced scoring, fidelity and weight quantization."""
