"""Text generation for decoder LLMs: onnxruntime-genai generators, sampling parameters, stop strings."""
