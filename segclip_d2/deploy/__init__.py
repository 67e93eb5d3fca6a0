"""Deployment: ONNX export (:mod:`.export`, needs torch) and a torch-free onnxruntime predictor
(:mod:`.onnx_predictor`, numpy + onnxruntime only). Importing this package imports neither."""
