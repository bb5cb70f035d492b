"""Bridges to other interpretability tools, each imported on its own (its tool is optional).

- `relprop.integrations.inseq`: importing it registers "relprop" as an Inseq attribution
  method, so `inseq.load_model(model, "relprop", tokenizer=...)` explains generation with
  relprop and Inseq's viewers show the result.
"""
