"""Model files: trained checkpoints (:mod:`.checkpointer`), the model card stored inside them
(:mod:`.card`) and the pretrained CLIP weights the model starts from (:mod:`.pretrained`)."""
