"""The model runtime: load a Hugging Face causal LM and run it fast and batch-invariant.

It knows nothing of probes: loading and fingerprint (``model``), where the decoder layers are
(``layers``), forward hooks (``hooks``), chat rendering (``render``), the lean decode and prefill step
(``step``), its attention kernel (``attention``), the shared batch's cache and the buffers it lives in
(``batch``, ``room``), the int8 path (``quantize``) and the ``guard::``
torch operators (``ops``).
"""
