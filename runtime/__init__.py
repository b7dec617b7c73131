"""The device runtime: bundle → answers, with numpy, onnxruntime, tokenizers and pillow only.

Never imports torch or transformers (a Jetson runtime image must not need them).
"""
