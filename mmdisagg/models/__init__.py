"""The two halves of a vision-language model, each loading only its own weights.

``base`` states the interfaces (EncoderHalf, LanguageHalf); ``qwen2_vl`` implements them for
Qwen2-VL and Qwen2.5-VL. The rest are the parts they are built from: ``prompts`` (chat
messages), ``images`` (fetching and decoding), ``positions`` (M-RoPE), ``weights``
(selective safetensors loading), ``kv_cache`` (the paged KV memory); ``tiny`` writes random test
checkpoints. Importing this package imports neither torch nor transformers.
"""
