"""The Open Inference Protocol over gRPC (KServe V2 `inference.GRPCInferenceService`)."""
