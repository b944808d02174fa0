"""Model-backed image preparation: the libraries behind the rembg, WD14, BLIP and dedup
plugins and ``charfw collect`` (ONNX sessions, model files and their cache, batched image
pre-processing, the Bing client). Heavy imports (onnxruntime, rembg, transformers, torch)
happen inside functions, so importing these modules stays cheap."""
