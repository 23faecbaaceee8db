"""Floor 4, the stages: each reads and writes one run folder and its ``run.json``, and can run alone.

``quantize`` (SOURCE -> int4 variants -> exports), ``compare`` (prompts at int4 and 16-bit; ``prompts``),
``evaluate`` (tasks; ``tasks``, ``metrics``), ``card`` (from the record alone; ``evaltable``,
``card_template``, ``revisions``) and ``hub`` (upload, dry run and verification; it knows nothing of
quantizing). ``hubtool.pipeline`` chains them for ``hubtool publish``.
"""
