"""The ONNX-to-torch training bridge: `module.OnnxModule` runs a graph as a trainable torch module, and
`coverage` says without torch what it can run, so a recipe is checked at submission."""
