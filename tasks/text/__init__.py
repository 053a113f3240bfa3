"""Text for language models: tokenizers, tokenization while staging, text sources.

``options``    the staging options of text (fields of :class:`tasks.staging.StageConfig`)
``tokenizer``  loading, inspecting, fitting and storing Hugging Face ``tokenizer.json`` files
``tokenize``   the worker side: a table of documents into packed or unpacked token rows
``plan``       the driver side: what staging of text records and checks (its hooks)
``corpus``     the documents of any staging source, read in order (for fitting a tokenizer)
``train``      ``swarm tokenizer train``: fit a byte-level BPE on a source

The manifest contract these produce is written down in README.md ("Text and language models").
"""
