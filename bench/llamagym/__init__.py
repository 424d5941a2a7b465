"""LlamaGym 0.1.1 side by side with llamagym_pl: ``python bench/llamagym/side_by_side.py``."""
